"""Request: one generation request as the engine core sees it."""

from __future__ import annotations

import enum
import time
from typing import Any

from ember.outputs import SampleLogprob
from ember.pooling_params import PoolingParams
from ember.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Life cycle: WAITING -> RUNNING <-> PREEMPTED | SWAPPED -> FINISHED_*.

    PREEMPTED: its blocks were freed; it is recomputed (cheaply when its
    blocks are still in the prefix cache). SWAPPED: its blocks were copied to
    host memory; it resumes with ``num_computed_tokens`` intact.
    Every status at or past FINISHED_STOPPED is final.
    """

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    SWAPPED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH_CAPPED = 5
    FINISHED_ABORTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """A request inside the engine core.

    Attributes:
        request_id: unique id.
        prompt_token_ids: the prompt, tokenized.
        sampling_params: validated parameters (EOS ids attached).
        output_token_ids: tokens generated so far.
        num_computed_tokens: tokens whose KV is in the cache. The scheduler gives
            a request ``num_tokens - num_computed_tokens`` more tokens to compute;
            prefill, chunked prefill and decode are all this one rule.
        max_tokens: output tokens allowed (capped by the context window).
        stop_reason: the stop token id that ended the request, if one did.
        priority: scheduling priority under the ``priority`` policy; lower
            runs first, ties by ``arrival_time``.
        cache_salt: isolates prefix-cache sharing: only requests with the same
            salt (or both None) share KV blocks.
        block_hashes: chained hashes of its full blocks (filled by the KV cache
            manager when prefix caching is on; see ``ember.core.kv_cache_utils``).
        waiting_since: when it last entered the waiting queue
            (``time.monotonic`` seconds; the fairness guard reads it).
        promoted: the fairness guard lifted it above every priority because it
            waited longer than ``max_waiting_time_s``.
        first_scheduled_time: when a step first scheduled it
            (``time.monotonic``); set by the engine core.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs`` set, the
            log-probabilities of prompt tokens 1, 2, ... computed so far (the
            prompt may be computed in chunks); else None.
        num_output_placeholders: tokens that scheduled steps will sample for
            it and that are not known yet (a step in flight under asynchronous
            scheduling). They count as tokens to compute: a step may continue
            the request from the token still being sampled.
        spec_token_ids: draft tokens a proposer made for its next step; the
            scheduler schedules (and consumes) them after its last token.
            ``DRAFT_ON_WORKER`` entries stand for proposals whose ids only the
            worker holds.
        structured_output: with ``SamplingParams.structured_outputs``, its
            grammar state (a
            :class:`~ember.structured_output.manager.StructuredOutputRequest`,
            set by the engine core); else None.
        pooling_params: set for a pooling request (an embedding): it computes
            its prompt, returns the pooled hidden states and finishes, sampling
            nothing (its ``max_tokens`` is 1: it is never scheduled again).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        max_model_len: int,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        pooling_params: PoolingParams | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        room = max_model_len - len(prompt_token_ids)
        wanted = sampling_params.max_tokens if sampling_params.max_tokens is not None else room
        self.max_tokens = min(wanted, room)
        self.stop_token_ids = sampling_params.all_stop_token_ids
        self.priority = priority
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.waiting_since = self.arrival_time
        self.promoted = False
        self.first_scheduled_time: float | None = None
        self.prompt_logprobs: list[SampleLogprob] | None = (
            None if sampling_params.prompt_logprobs is None else [])
        self.num_output_placeholders = 0
        self.spec_token_ids: list[int] = []
        self.structured_output: Any = None
        self.pooling_params = pooling_params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return self.status.is_finished

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
                f"output={self.num_output_tokens}, computed={self.num_computed_tokens})")
