"""Messages between the front end and the engine core.

Plain dataclasses (msgpack-encodable with ``msgspec``): the in-process client
passes them as objects, the multiprocess clients as ZMQ multipart messages
``[kind, msgpack payload]`` with the kinds below. Neither the core
(``ember.engine.core``) nor the clients (``ember.engine.core_client``) own
them, so the two modules need not import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ember.core.sched_output import EngineCoreOutput
from ember.core.stats import SchedulerStats
from ember.pooling_params import PoolingParams
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams

# Message kinds: front end -> core.
ADD, ABORT, SHUTDOWN = b"ADD", b"ABORT", b"SHUTDOWN"
# Message kinds: core -> front end.
READY, OUTPUTS, DEAD = b"READY", b"OUTPUTS", b"DEAD"

@dataclass
class EngineCoreRequest:
    """A request as the front end hands it to the core (already tokenized and
    validated; ``sampling_params`` has the model's EOS ids attached).

    Attributes:
        arrival_time: ``time.monotonic()`` seconds in the front end's process
            (CLOCK_MONOTONIC is system-wide on Linux, so it compares across
            processes).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    cache_salt: str | None = None
    # Set: a pooling request (an embedding: prefill only, see ember.pooling_params).
    pooling_params: PoolingParams | None = None


@dataclass
class AbortRequests:
    """End these requests now. ``status``: a final :class:`RequestStatus` value
    (FINISHED_ABORTED for aborts, FINISHED_STOPPED for stop strings the front
    end found)."""

    request_ids: list[str]
    status: int = int(RequestStatus.FINISHED_ABORTED)


@dataclass
class EngineCoreOutputs:
    """What one engine step produced.

    Attributes:
        outputs: one entry per request that generated a token or finished.
        stats: the scheduler's counters after the step.
        scheduled_times: request id -> ``time.monotonic()`` when it was first
            scheduled (requests first scheduled in this step only); arrival to
            this is its queue time.
        rejected: request id -> why the core refused to add it.
        num_batched_tokens: tokens the step computed (prefill and decode, all
            requests; 0 when idle).
    """

    outputs: list[EngineCoreOutput] = field(default_factory=list)
    stats: SchedulerStats | None = None
    scheduled_times: dict[str, float] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    num_batched_tokens: int = 0


@dataclass
class CoreReady:
    """Sent once the model is loaded and the KV cache is allocated."""

    num_gpu_blocks: int


@dataclass
class CoreDead:
    """Sent by a dying core: the error's type name and message."""

    error_type: str
    message: str




def make_core_request(req: EngineCoreRequest, max_model_len: int) -> Request:
    """The core's :class:`Request` for a front-end request."""
    return Request(req.request_id, req.prompt_token_ids, req.sampling_params, max_model_len, req.arrival_time,
                   priority=req.priority, cache_salt=req.cache_salt, pooling_params=req.pooling_params)
