"""Drafting for the running requests after each engine step: n-gram lookup
on the host, or a draft model's proposals returned by the step."""

from __future__ import annotations

from collections.abc import Sequence

from ember.request import Request
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.ngram import NgramProposer


class DraftScheduler:
    """Gives each running request that decodes next (all its tokens but the
    last computed, no token in flight) up to k draft tokens in
    ``Request.spec_token_ids``, unless more requests run than
    ``disable_by_batch_size``. Requests with structured outputs get none
    (their grammar masks are computed one sampled token at a time).

    Args:
        config: the speculative decoding settings.
    """

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        # A draft model or MTP layer proposes on the worker (ModelRunnerOutput.draft_token_ids); n-gram lookup here.
        self.proposer = None if config.proposes_on_worker else NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        # Whether the last call proposed for its batch (speculation is on at this batch size).
        self.active = False

    def propose(self, running: Sequence[Request], draft_token_ids: dict[str, list[int]] | None = None) -> None:
        """After a step's update: set the drafts of ``running`` for the next
        step, and :attr:`active` (whether speculation is on: at this batch size,
        and with no grammar-constrained request running).

        Args:
            running: the running requests.
            draft_token_ids: with a draft model, the step's proposals
                (``ModelRunnerOutput.draft_token_ids``); requests without any get none.
        """
        limit = self.config.disable_by_batch_size
        was_active = self.active
        # NOTE: no drafts while a grammar-constrained request runs: a step with
        # drafts is sampled by the verifier, which takes no grammar masks (those
        # reach the runner after the launch, see EngineCore).
        self.active = (bool(running) and (limit is None or len(running) <= limit)
                       and not any(r.sampling_params.structured_outputs is not None for r in running))
        if not self.active:
            if was_active:
                # NOTE: drafts left unscheduled must not reach a step scheduled
                # ahead (the runner verifies drafts only with no step in flight).
                for req in running:
                    req.spec_token_ids = []
            return
        k = self.config.num_speculative_tokens
        for req in running:
            if req.num_output_placeholders or req.num_computed_tokens != req.num_tokens - 1:
                continue
            room = min(k, req.max_tokens - req.num_output_tokens - 1)
            if room <= 0:
                continue
            if self.proposer is None:
                req.spec_token_ids = (draft_token_ids or {}).get(req.request_id, [])[:room]
            else:
                req.spec_token_ids = self.proposer.propose(req.all_token_ids, room)
