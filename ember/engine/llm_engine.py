"""LLMEngine: the synchronous engine (input processing + core + output
processing) under both the offline ``LLM`` and the server's ``AsyncLLM``."""

from __future__ import annotations

import itertools
import time

from ember.config import EngineConfig
from ember.core.stats import SchedulerStats
from ember.engine.arg_utils import EngineArgs
from ember.engine.core import EngineCore
from ember.engine.input_processor import InputProcessor
from ember.engine.output_processor import OutputProcessor
from ember.outputs import RequestOutput
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams


class LLMEngine:
    """Adds requests, steps the engine and returns RequestOutputs.

    Args:
        config: the engine config (see ``EngineArgs.create_engine_config``).
    """

    def __init__(self, config: EngineConfig) -> None:
        from ember.loader import load_tokenizer, resolve_model_source

        self.config = config
        self.model_config = config.model_config
        self.tokenizer = (None if config.model_config.skip_tokenizer_init
                          else load_tokenizer(resolve_model_source(config.model_config.model)))
        self.input_processor = InputProcessor(config.model_config, self.tokenizer)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.engine_core = EngineCore(config)
        self._ids = itertools.count()
        # Cumulative token counts since start-up (for metrics).
        self.num_prompt_tokens_total = 0
        self.num_generation_tokens_total = 0

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args.create_engine_config())

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    prompt_token_ids: list[int] | None = None, arrival_time: float | None = None,
                    priority: int = 0, cache_salt: str | None = None) -> None:
        """Queue a request.

        Args:
            prompt: text, or token ids.
            prompt_token_ids: already-tokenized prompt (skips tokenization).
            priority: under ``--scheduling-policy priority``, lower runs first
                (any integer; ignored under fcfs).
            cache_salt: only requests with the same salt share prefix-cache
                blocks (e.g. one salt per tenant); None shares with all unsalted.
        Raises:
            ValueError: invalid prompt, one too long for the context window, a
                non-integer priority or an empty / non-string cache_salt.
        """
        check_priority_and_salt(priority, cache_salt)
        ids = prompt_token_ids if prompt_token_ids is not None else self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        request = Request(request_id, ids, params, self.model_config.max_model_len, arrival,
                          priority=priority, cache_salt=cache_salt)
        self.engine_core.add_request(request)
        self.num_prompt_tokens_total += len(ids)
        self.output_processor.add_request(request_id, prompt if isinstance(prompt, str) else None, ids, params,
                                          arrival)

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Abort requests; returns their final outputs (finish reason ``abort``)."""
        self.engine_core.abort_requests(request_ids)
        return self.output_processor.abort_requests(request_ids)

    def step(self) -> list[RequestOutput]:
        outputs = self.engine_core.step()
        self.num_generation_tokens_total += sum(len(o.new_token_ids) for o in outputs)
        results, stopped = self.output_processor.process_outputs(outputs)
        if stopped:
            self.engine_core.abort_requests(stopped, RequestStatus.FINISHED_STOPPED)
        return results

    def has_unfinished_requests(self) -> bool:
        return self.engine_core.has_unfinished_requests()

    def get_num_unfinished_requests(self) -> int:
        return self.engine_core.scheduler.get_num_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        """Engine-core counters (see :class:`ember.core.stats.SchedulerStats`)."""
        return self.engine_core.get_stats()


def check_priority_and_salt(priority: int, cache_salt: str | None) -> None:
    """Raises ValueError unless ``priority`` is an int and ``cache_salt`` a
    non-empty string or None."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ValueError(f"priority must be an integer, got {priority!r}")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ValueError(f"cache_salt must be a non-empty string or None, got {cache_salt!r}")
