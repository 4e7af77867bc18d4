"""Drafting for the running requests after each engine step: n-gram lookup
on the host, or the count of a worker proposer's proposals returned by the
step (their ids stay on the worker's device: ``DRAFT_ON_WORKER``)."""

from __future__ import annotations

from collections.abc import Sequence

from ember.core.sched_output import DRAFT_ON_WORKER
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
        # A draft model, EAGLE-3 head or MTP layer proposes on the worker
        # (ModelRunnerOutput.num_draft_tokens); n-gram lookup here.
        self.proposer = None if config.proposes_on_worker else NgramProposer(
            config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        # Whether the last call proposed for its batch (speculation is on at this batch size).
        self.active = False

    def propose(self, running: Sequence[Request], num_draft_tokens: dict[str, int] | None = None) -> None:
        """After a step's update: set the drafts of ``running`` for the next
        step, and :attr:`active` (whether speculation is on: at this batch size,
        and with no grammar-constrained request running).

        Args:
            running: the running requests.
            num_draft_tokens: with a proposer on the worker, how many tokens
                the step proposed per request (``ModelRunnerOutput.num_draft_tokens``);
                requests without any get none.
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
                req.spec_token_ids = [DRAFT_ON_WORKER] * min(room, (num_draft_tokens or {}).get(req.request_id, 0))
            else:
                req.spec_token_ids = self.proposer.propose(req.all_token_ids, room)
