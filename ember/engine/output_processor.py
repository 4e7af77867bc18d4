"""OutputProcessor: engine-core outputs -> user-facing RequestOutputs
(detokenization, stop strings, finish reasons, logprobs, per-request timing,
and the fan-out of ``n > 1`` requests).

A user request with ``SamplingParams.n == 1`` is one engine-core request with
the same id. With ``n > 1`` it is a parent of n engine-core requests ("children"),
``f"{i}_{request_id}"`` for completion i, each with ``n=1`` and, when the parent
has a seed, ``seed + i``; their outputs are gathered into the parent's
RequestOutputs as :class:`ember.outputs.RequestOutput` documents.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from ember.core.sched_output import EngineCoreOutput
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.stop_strings import StopStringMatcher
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.sampling_params import RequestOutputKind, SamplingParams
from ember.utils import wrap_int64


def child_requests(request_id: str, params: SamplingParams) -> list[tuple[str, SamplingParams]]:
    """The engine-core requests of a user request, in completion order:
    ``[(request_id, params)]`` for n = 1, else ``(f"{i}_{request_id}", params
    with n=1 and seed+i)`` for i in [0, n); ``seed + i`` wraps around within int64,
    which leaves the sampler's noise as if it did not (it mixes seeds modulo 2**64)."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{i}_{request_id}",
             dataclasses.replace(params, n=1, seed=None if params.seed is None else wrap_int64(params.seed + i)))
            for i in range(params.n)]


@dataclass
class CompletionState:
    """The output side of one completion (one engine-core request)."""

    index: int
    engine_request_id: str
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampleLogprob] | None = None
    num_sent_tokens: int = 0  # DELTA: tokens (and logprobs) already reported
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    changed: bool = False  # something to report since the last output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    """The output side of one user request and its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    completions: list[CompletionState]
    first_token_time: float | None = None
    num_finished: int = 0
    # With SamplingParams.prompt_logprobs: None for the first prompt token, then
    # one entry per token (from the first completion to report them).
    prompt_logprobs: list[SampleLogprob | None] | None = None
    pooled_output: list[float] | None = None  # a pooling request's result

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.completions)


class OutputProcessor:
    """Tracks the output side of every live request.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}  # by user request id
        self._by_engine_id: dict[str, tuple[RequestState, CompletionState]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> list[tuple[str, SamplingParams]]:
        """Start tracking a request.

        Returns:
            The ``(engine_request_id, params)`` pairs to submit to the engine
            core, all together and in this order (see :func:`child_requests`).
        Raises:
            ValueError: ``request_id`` or one of its children's ids is in use.
        """
        children = child_requests(request_id, params)
        ids = [request_id] + [engine_id for engine_id, _ in children]
        in_use = [rid for rid in ids if rid in self.states or rid in self._by_engine_id]
        if in_use:
            raise ValueError(f"request id {in_use[0]!r} is already in use")
        # NOTE: one stop-string matcher per request, shared by its n completions.
        matcher = StopStringMatcher(params.stop) if params.stop and self.tokenizer is not None else None
        completions = [CompletionState(i, engine_id, IncrementalDetokenizer(self.tokenizer, child_params, matcher),
                                       logprobs=None if params.logprobs is None else [])
                       for i, (engine_id, child_params) in enumerate(children)]
        state = RequestState(request_id, prompt, prompt_token_ids, params, arrival_time, completions)
        self.states[request_id] = state
        for comp in completions:
            self._by_engine_id[comp.engine_request_id] = (state, comp)
        return children

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def num_engine_requests(self) -> int:
        """Unfinished engine-core requests (n per live user request, less the
        completions already finished)."""
        return len(self._by_engine_id)

    def parent_request_id(self, engine_request_id: str) -> str | None:
        """The user request an engine-core request belongs to (None if unknown)."""
        entry = self._by_engine_id.get(engine_request_id)
        return None if entry is None else entry[0].request_id

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs.

        Returns:
            The RequestOutputs to deliver now (at most one per user request),
            and the engine-core ids of requests that a stop string ended (the
            engine core must abort them; their siblings go on).
        """
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        stopped: list[str] = []
        for out in outputs:
            entry = self._by_engine_id.get(out.request_id)
            if entry is None or entry[1].finished:
                continue  # aborted (or ended by a stop string) meanwhile
            state, comp = entry
            if state.first_token_time is None and out.new_token_ids:
                state.first_token_time = now
            comp.token_ids.extend(out.new_token_ids)
            if comp.logprobs is not None and out.new_logprobs:
                comp.logprobs.extend(out.new_logprobs)
            if out.prompt_logprobs is not None and state.prompt_logprobs is None:
                state.prompt_logprobs = [None, *out.prompt_logprobs]
            if out.pooled is not None:
                state.pooled_output = out.pooled
            finish, stop_reason = out.finish_reason, out.stop_reason
            # NOTE: a stop token (EOS or stop_token_ids) ends the text without being part of
            # it, unless include_stop_str_in_output.
            to_detok = (out.new_token_ids[:-1] if finish == "stop" and not comp.detokenizer.include_stop
                        else out.new_token_ids)
            stop_str = comp.detokenizer.update(to_detok)
            if stop_str is not None and finish is None:
                finish, stop_reason = "stop", stop_str
                extra = len(out.new_token_ids) - comp.detokenizer.num_tokens_to_stop
                if extra > 0:  # tokens after the stop string in one step (speculative decoding)
                    del comp.token_ids[-extra:]
                    if comp.logprobs is not None and out.new_logprobs:
                        del comp.logprobs[-extra:]
                stopped.append(out.request_id)
            comp.changed = True
            if finish is not None:
                self._finish(state, comp, finish, stop_reason)
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            result = self._make_output(state, now)
            if result is not None:
                results.append(result)
            if state.finished:
                self._forget(state)
        return results, stopped

    def abort_requests(self, request_ids: list[str]) -> tuple[list[RequestOutput], list[str]]:
        """Finish user requests with reason ``abort`` (unknown or finished ids
        are skipped).

        Returns:
            Their final outputs, and the engine-core ids of their unfinished
            completions (the engine core must abort them).
        """
        now = time.monotonic()
        results, engine_ids = [], []
        for req_id in request_ids:
            state = self.states.get(req_id)
            if state is None:
                continue
            for comp in state.completions:
                if not comp.finished:
                    self._finish(state, comp, "abort", None)
                    comp.changed = True
                    engine_ids.append(comp.engine_request_id)
            results.append(self._make_output(state, now, force=True))
            self._forget(state)
        return results, engine_ids

    # -------------------------------------------------------------- helpers
    @staticmethod
    def _finish(state: RequestState, comp: CompletionState, finish: str, stop_reason: int | str | None) -> None:
        comp.finish_reason, comp.stop_reason = finish, stop_reason
        state.num_finished += 1

    def _forget(self, state: RequestState) -> None:
        del self.states[state.request_id]
        for comp in state.completions:
            del self._by_engine_id[comp.engine_request_id]

    def _make_output(self, state: RequestState, now: float, force: bool = False) -> RequestOutput | None:
        """The request's output now: all n completions (CUMULATIVE, and
        FINAL_ONLY once all finished or when ``force``), or only the changed
        ones (DELTA); None when FINAL_ONLY has nothing to report yet."""
        kind = state.params.output_kind
        finished = state.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = kind == RequestOutputKind.DELTA
        completions = [self._completion_output(c, delta) for c in state.completions if c.changed or not delta]
        for c in state.completions:
            c.changed = False
        metrics = {"arrival_time": state.arrival_time,
                   "num_generation_tokens": sum(len(c.token_ids) for c in state.completions),
                   "max_completion_tokens": max(len(c.token_ids) for c in state.completions),
                   "n": len(state.completions)}
        if state.params.max_tokens is not None:
            metrics["max_tokens"] = state.params.max_tokens
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if finished:
            metrics["finished_time"] = now
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, finished, metrics,
                             state.prompt_logprobs, state.pooled_output)

    @staticmethod
    def _completion_output(comp: CompletionState, delta: bool) -> CompletionOutput:
        text = comp.detokenizer.get_next_output_text(comp.finished, delta)
        logprobs = comp.logprobs
        if delta:
            token_ids = comp.token_ids[comp.num_sent_tokens:]
            if logprobs is not None:
                logprobs = logprobs[comp.num_sent_tokens:]
            comp.num_sent_tokens = len(comp.token_ids)
        else:
            token_ids = list(comp.token_ids)
            if logprobs is not None:
                logprobs = list(logprobs)
        return CompletionOutput(comp.index, text, token_ids, comp.finish_reason, comp.stop_reason, logprobs)
