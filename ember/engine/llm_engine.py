"""LLMEngine: the synchronous front end (input processing, the engine core
through an :class:`~ember.engine.core_client.EngineCoreClient`, output
processing) under the offline ``LLM``. The core runs in this process by
default, or in its own with ``multiprocess=True``."""

from __future__ import annotations

import itertools
import time

from ember.config import EngineConfig
from ember.core.stats import SchedulerStats
from ember.engine.arg_utils import EngineArgs
from ember.engine.core import EngineCore
from ember.core.sched_output import EngineCoreOutput
from ember.engine.core_client import EngineCoreClient, InprocClient, SyncMPClient
from ember.engine.messages import EngineCoreRequest
from ember.engine.input_processor import InputProcessor
from ember.engine.output_processor import OutputProcessor
from ember.outputs import RequestOutput
from ember.pooling_params import PoolingParams
from ember.request import RequestStatus
from ember.sampling_params import SamplingParams
from ember.utils import check_text, is_int


class EngineFrontEnd:
    """What the offline :class:`LLMEngine` and the server's ``AsyncLLM`` share:
    the tokenizer, input and output processing, and the engine-core client.

    Args:
        config: the engine config.
        core_client: the core (possibly still loading in its process); it is
            shut down if the tokenizer cannot be loaded.
    Raises:
        ModelLoadError: missing or unreadable tokenizer files.
    """

    def __init__(self, config: EngineConfig, core_client: EngineCoreClient) -> None:
        from ember.loader import load_tokenizer_for

        self.config = config
        self.model_config = config.model_config
        self.core_client = core_client
        try:
            self.tokenizer = (None if config.model_config.skip_tokenizer_init
                              else load_tokenizer_for(config.model_config.model, config.model_config.tokenizer))
        except BaseException:
            core_client.shutdown()
            raise
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        # Cumulative token counts since start-up (for metrics).
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    def _submit(self, request_id: str, prompt: str | None, ids: list[int], params: SamplingParams, arrival: float,
                priority: int, cache_salt: str | None, pooling_params: PoolingParams | None = None) -> None:
        """Hand a validated request to the output processor and the core: n > 1
        becomes n engine-core requests, submitted together (see OutputProcessor).
        With ``pooling_params`` it is a pooling request (``params`` must then
        ask for one completion of one token: see :func:`pooling_sampling_params`).

        Raises:
            ValueError: an engine request id already in use (nothing is submitted).
        """
        children = self.output_processor.add_request(request_id, prompt, ids, params, arrival)
        for engine_id, child_params in children:
            self.core_client.add_request(EngineCoreRequest(engine_id, ids, child_params, arrival, priority,
                                                           cache_salt, pooling_params))
        # As vLLM counts prompt tokens: once per engine-core request (n per user request).
        self.num_prompt_tokens_total += len(ids) * len(children)

    def _abort(self, request_ids: list[str]) -> list[RequestOutput]:
        """End user requests (all their completions); returns their final outputs."""
        results, engine_ids = self.output_processor.abort_requests(request_ids)
        self.core_client.abort_requests(engine_ids)
        return results

    def _process_core_outputs(self, outputs: list[EngineCoreOutput]) -> list[RequestOutput]:
        """Detokenize one step's outputs; completions a stop string ended are
        stopped in the core."""
        self.num_generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        results, stopped = self.output_processor.process_outputs(outputs)
        if stopped:
            self.core_client.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return results


class LLMEngine(EngineFrontEnd):
    """Adds requests, steps the engine and returns RequestOutputs.

    Args:
        config: the engine config (see ``EngineArgs.create_engine_config``).
        multiprocess: run the engine core in a child process (as the server
            does) instead of in this one.
    """

    def __init__(self, config: EngineConfig, multiprocess: bool = False) -> None:
        # A core process loads the model while this one loads the tokenizer.
        super().__init__(config, SyncMPClient(config) if multiprocess else InprocClient(config))
        if isinstance(self.core_client, SyncMPClient):
            self.core_client.wait_until_ready()
        self._stats: SchedulerStats | None = None
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, multiprocess: bool = False) -> LLMEngine:
        return cls(args.create_engine_config(), multiprocess)

    @property
    def engine_core(self) -> EngineCore:
        """The in-process engine core (for tests, benchmarks and debugging).

        Raises:
            AttributeError: the core runs in another process.
        """
        core = getattr(self.core_client, "engine_core", None)
        if core is None:
            raise AttributeError("the engine core runs in another process")
        return core

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    priority: int = 0, cache_salt: str | None = None,
                    pooling_params: PoolingParams | None = None) -> None:
        """Queue a request.

        Args:
            prompt: text, or token ids.
            prompt_token_ids: already-tokenized prompt (skips tokenization; the
                ids are still checked against the vocabulary).
            priority: under ``--scheduling-policy priority``, lower runs first
                (an integer in [-2**63, 2**63); ignored under fcfs).
            cache_salt: only requests with the same salt share prefix-cache
                blocks (e.g. one salt per tenant); None shares with all unsalted.
            pooling_params: make it a pooling request (an embedding in its
                final output's ``pooled_output``; ``params`` is then ignored).
        Raises:
            ValueError: invalid prompt (see :meth:`InputProcessor.tokenize`), one
                too long for the context window, a priority outside int64 or an
                empty / non-string / non-Unicode cache_salt.
        """
        check_priority_and_salt(priority, cache_salt)
        ids = self.input_processor.tokenize(prompt_token_ids if prompt_token_ids is not None else prompt)
        if pooling_params is not None:
            params = pooling_sampling_params()
        ids = self.input_processor.truncate(ids, params.truncate_prompt_tokens, params.max_tokens)
        params = self.input_processor.check(ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._submit(request_id, prompt if isinstance(prompt, str) else None, ids, params, arrival, priority,
                     cache_salt, pooling_params)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Abort requests; returns their final outputs (finish reason ``abort``)."""
        return self._abort(request_ids)

    def step(self) -> list[RequestOutput]:
        """One engine step (in-process), or the next step's outputs (multiprocess)."""
        core_outputs = self.core_client.get_output()
        self._stats = core_outputs.stats
        return self._process_core_outputs(core_outputs.outputs)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        """Engine-core counters (see :class:`ember.core.stats.SchedulerStats`);
        with a core process, as of the last step."""
        if isinstance(self.core_client, InprocClient):
            return self.core_client.get_stats()
        return self._stats or SchedulerStats()

    def shutdown(self) -> None:
        """Stop the engine core (its process, if it has one)."""
        self.core_client.shutdown()


def pooling_sampling_params() -> SamplingParams:
    """The SamplingParams a pooling request travels with: one completion of at
    most one token (nothing is sampled; the limit keeps the scheduler from
    scheduling it again after its prompt), returned when finished."""
    from ember.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=1, output_kind=RequestOutputKind.FINAL_ONLY)


def check_priority_and_salt(priority: int, cache_salt: str | None) -> None:
    """Check a request's scheduling fields.

    Raises:
        ValueError: ``priority`` is not an integer in [-2**63, 2**63) (int64, as
            the engine core's wire format needs), or ``cache_salt`` is neither None
            nor a non-empty string of Unicode text (no lone surrogates); the
            message starts with the parameter's name.
    """
    if not is_int(priority):
        raise ValueError(f"priority must be an integer in [-2**63, 2**63) (int64), got {priority!r}")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
    if cache_salt is not None:
        check_text(cache_salt, "cache_salt")
