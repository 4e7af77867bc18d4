"""Speculative decoding: draft proposers (:mod:`ember.spec_decode.ngram` on the
host; on the worker :mod:`ember.spec_decode.draft_model` and the proposers
conditioned on the target's hidden states, :mod:`ember.spec_decode.hidden_states`)
and settings (:mod:`ember.spec_decode.config`); verification is in the model
runner with :mod:`ember.sample.rejection_sampler`."""

from __future__ import annotations

import importlib

# speculative_config.method -> (module, class) of its proposer on the worker.
_WORKER_PROPOSERS: dict[str, tuple[str, str]] = {
    "draft_model": ("ember.spec_decode.draft_model", "DraftModelProposer"),
    "eagle3": ("ember.spec_decode.hidden_states", "HiddenStateProposer"),
    "mtp": ("ember.spec_decode.mtp", "MTPProposer"),
}


def worker_proposer_class(method: str) -> type:
    """The proposer class a model runner builds for ``method`` (one whose
    :attr:`~ember.spec_decode.config.SpeculativeConfig.proposes_on_worker`), as
    ``cls(runner, speculative_config)``.

    Raises:
        KeyError: a method without a proposer on the worker.
    """
    module, name = _WORKER_PROPOSERS[method]
    return getattr(importlib.import_module(module), name)
