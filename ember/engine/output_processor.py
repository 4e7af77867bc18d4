"""OutputProcessor: engine-core outputs -> user-facing RequestOutputs
(detokenization, stop strings, finish reasons, per-request timing)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ember.core.sched_output import EngineCoreOutput
from ember.engine.detokenizer import IncrementalDetokenizer
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind, SamplingParams


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    arrival_time: float
    token_ids: list[int] = field(default_factory=list)
    num_sent_tokens: int = 0
    first_token_time: float | None = None


class OutputProcessor:
    """Tracks the output side of every live request.

    Args:
        tokenizer: a ``transformers`` fast tokenizer.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, RequestState] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, arrival_time: float) -> None:
        self.states[request_id] = RequestState(
            request_id, prompt, prompt_token_ids, params, IncrementalDetokenizer(self.tokenizer, params), arrival_time)

    def has_unfinished_requests(self) -> bool:
        return bool(self.states)

    def process_outputs(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's outputs.

        Returns:
            The RequestOutputs to deliver now, and the ids of requests that a
            stop string ended (the engine core must abort them).
        """
        now = time.monotonic()
        results: list[RequestOutput] = []
        stopped: list[str] = []
        for out in outputs:
            state = self.states.get(out.request_id)
            if state is None:
                continue  # aborted by the user meanwhile
            if state.first_token_time is None and out.new_token_ids:
                state.first_token_time = now
            state.token_ids.extend(out.new_token_ids)
            finish, stop_reason = out.finish_reason, out.stop_reason
            # NOTE: a stop token (EOS or stop_token_ids) ends the text without being part of it.
            to_detok = out.new_token_ids[:-1] if finish == "stop" else out.new_token_ids
            stop_str = state.detokenizer.update(to_detok)
            if stop_str is not None and finish is None:
                finish, stop_reason = "stop", stop_str
                stopped.append(out.request_id)
            result = self._make_output(state, finish, stop_reason, now)
            if result is not None:
                results.append(result)
            if finish is not None:
                del self.states[out.request_id]
        return results, stopped

    def abort_requests(self, request_ids: list[str]) -> list[RequestOutput]:
        """Finish requests with reason ``abort``; returns their final outputs."""
        now = time.monotonic()
        results = []
        for req_id in request_ids:
            state = self.states.pop(req_id, None)
            if state is not None:
                results.append(self._make_output(state, "abort", None, now, force=True))
        return results

    def _make_output(self, state: RequestState, finish: str | None, stop_reason: int | str | None, now: float,
                     force: bool = False) -> RequestOutput | None:
        kind = state.params.output_kind
        finished = finish is not None
        if kind == RequestOutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = kind == RequestOutputKind.DELTA
        text = state.detokenizer.get_next_output_text(finished, delta)
        if delta:
            token_ids = state.token_ids[state.num_sent_tokens:]
            state.num_sent_tokens = len(state.token_ids)
        else:
            token_ids = list(state.token_ids)
        metrics = {"arrival_time": state.arrival_time, "num_generation_tokens": len(state.token_ids)}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        if finished:
            metrics["finished_time"] = now
        completion = CompletionOutput(0, text, token_ids, finish, stop_reason)
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, [completion], finished, metrics)
