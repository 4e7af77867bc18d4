"""Speculative decoding: draft proposers (:mod:`ember.spec_decode.ngram` on the
host, :mod:`ember.spec_decode.draft_model` on the worker) and settings
(:mod:`ember.spec_decode.config`); verification is in the model runner with
:mod:`ember.sample.rejection_sampler`."""
