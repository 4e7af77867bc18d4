"""Plain dataclasses between the scheduler and the model runner.

The scheduler never sees tensors and the runner never decides who runs: one
step's decisions travel in a :class:`SchedulerOutput`, its results come back in
a :class:`ModelRunnerOutput`.

NOTE: these types (and what they hold) stay plain Python values (ints,
floats, strs, lists, tuples, dataclasses of them): no tensors or numpy
scalars, so that they can cross process boundaries with msgpack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ember.outputs import SampleLogprob
from ember.pooling_params import PoolingParams
from ember.sampling_params import SamplingParams

# A draft token that the worker proposed and keeps on its device (a draft
# model's, an EAGLE-3 head's or an MTP layer's proposal): the scheduler
# schedules it by count, and the step that verifies it reads its id there,
# so no step waits for proposals to reach the host before it is scheduled.
DRAFT_ON_WORKER = -1


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen (or forgot on preemption).

    Attributes:
        req_id: request id.
        prompt_token_ids: the prompt.
        output_token_ids: tokens already generated (non-empty when a preempted
            request resumes: they are recomputed like prompt tokens).
        sampling_params: the request's sampling parameters.
        block_ids: its block table.
        num_computed_tokens: tokens already in the KV cache: prefix-cache hits,
            or everything computed before a swap-out for a swapped-in request.
        pooling_params: set for a pooling request (it samples nothing).
    """

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    pooling_params: PoolingParams | None = None


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: only what changed.

    Attributes:
        req_id: request id.
        new_block_ids: blocks appended to its block table this step.
        num_computed_tokens: tokens already in the KV cache.
    """

    req_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    """One step's schedule.

    Attributes:
        scheduled_new_reqs: requests the runner must start tracking.
        scheduled_cached_reqs: requests the runner tracks already.
        num_scheduled_tokens: req_id -> tokens to compute this step.
        total_num_scheduled_tokens: their sum (<= max_num_batched_tokens).
        finished_req_ids: requests the runner must forget (finished, aborted or
            preempted since the last step).
        num_preemptions: requests preempted while making this schedule.
        blocks_to_swap_out: (device_block_id, host_block_id) pairs to copy
            device -> host before this step's forward pass (requests preempted
            by swap; their device blocks may be reused by this very step).
        blocks_to_swap_in: (device_block_id, host_block_id) pairs to copy
            host -> device before the forward pass, after the swap-outs.
        scheduled_spec_decode_tokens: req_id -> draft tokens it computes after
            its last token (counted in ``num_scheduled_tokens``); the step
            returns the accepted ones and one more. A ``DRAFT_ON_WORKER``
            entry is the worker's own proposal at that place.
        structured_output_req_ids: the requests with a grammar constraint
            that sample this step. When any, the runner launches the step's
            forward pass and logits but samples only once it is given their
            token bitmask (``Executor.sample_with_bitmask``), which the engine
            core fills on the host meanwhile.
    """

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    num_preemptions: int = 0
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    structured_output_req_ids: list[str] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass
class GrammarBitmask:
    """The allowed-token masks of one step's constrained requests.

    Attributes:
        req_ids: the step's ``structured_output_req_ids``, in row order.
        bitmask: [len(req_ids), ceil(vocab / 32)] int32 numpy array, packed as
            :mod:`ember.sample.logits_processor` describes (a row of all ones
            leaves its request unconstrained at this position).
    """

    req_ids: list[str]
    bitmask: Any


@dataclass
class ModelRunnerOutput:
    """One step's results.

    Attributes:
        sampled_token_ids: req_id -> the tokens it generated, in order: one
            sampled token, or with draft tokens scheduled the accepted drafts
            and one more. Only requests whose scheduled tokens reached the end
            of their tokens sample (a prefill chunk that stops mid-prompt does
            not).
        logprobs: req_id -> log-probabilities of each of its tokens, for the
            sampling requests whose ``SamplingParams.logprobs`` is set.
        prompt_logprobs: req_id -> ``(first, entries)`` for requests whose
            ``SamplingParams.prompt_logprobs`` is set and whose step computed
            prompt tokens: ``entries[j]`` is the log-probability of prompt token
            ``first + j`` given the tokens before it (``first`` >= 1).
        pooler_output: req_id -> pooled hidden states ([hidden_size] floats)
            of each pooling request whose prompt this step finished (such a
            request is not in ``sampled_token_ids``).
        num_draft_tokens: req_id -> how many draft tokens the worker proposed
            to follow its tokens (a draft model, EAGLE-3 head or MTP layer);
            their ids stay on the worker (``DRAFT_ON_WORKER``), and the next
            step verifies them.
    """

    sampled_token_ids: dict[str, list[int]]
    logprobs: dict[str, list[SampleLogprob]] = field(default_factory=dict)
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprob]]] = field(default_factory=dict)
    pooler_output: dict[str, list[float]] = field(default_factory=dict)
    num_draft_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one request got from one engine step.

    Attributes:
        request_id: request id.
        new_token_ids: tokens generated this step.
        finish_reason: ``"stop"``, ``"length"``, ``"abort"`` or None.
        stop_reason: the stop token id that ended it, if any.
        new_logprobs: with ``SamplingParams.logprobs`` set, one entry per token
            of ``new_token_ids``; else None.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs`` set, on the
            output that carries the first generated token: one entry per prompt
            token after the first; else None.
        pooled: a pooling request's pooled hidden states ([hidden_size]
            floats), on its one (finishing) output; else None.
    """

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    new_logprobs: list[SampleLogprob] | None = None
    prompt_logprobs: list[SampleLogprob] | None = None
    pooled: list[float] | None = None
