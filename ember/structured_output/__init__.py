"""Structured output: grammar-constrained decoding with xgrammar (JSON schema,
JSON object, regex, choice, EBNF grammar). Specs and validation in
:mod:`.grammar`; compilation and per-sequence matchers in :mod:`.manager`; the
masks reach the sampler through :mod:`ember.sample.logits_processor`."""
