"""What the engine returns to users: RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SampleLogprob:
    """Log-probabilities at one generated position (natural log, float32
    softmax over the raw logits, before penalties, temperature and top-k/p).

    Attributes:
        token_id: the sampled token.
        logprob: its log-probability.
        rank: its rank in the distribution (1 = most likely).
        top: the ``SamplingParams.logprobs`` most likely tokens as
            ``(token_id, logprob)``, most likely first (empty when it is 0).
    """

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One completion of a request.

    Attributes:
        index: completion index within the request, in [0, n).
        text: generated text (cumulative or the new delta, per ``output_kind``).
        token_ids: generated token ids (cumulative or delta, like ``text``).
        finish_reason: None while running; ``"stop"`` (EOS, stop token or stop
            string), ``"length"`` (max_tokens or context window) or ``"abort"``.
        stop_reason: the stop string or stop token id that ended it, if any.
        logprobs: with ``SamplingParams.logprobs`` set, one entry per token of
            ``token_ids`` (cumulative or delta like them); else None.
        cumulative_logprob: the sum of the log-probabilities of ``token_ids``
            (natural log); set by beam search, else None.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[SampleLogprob] | None = None
    cumulative_logprob: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """Progress or result of one request.

    Attributes:
        request_id: the engine's id for the request.
        prompt: the prompt text, if the request was given as text.
        prompt_token_ids: the tokenized prompt.
        outputs: the completions. CUMULATIVE and FINAL_ONLY outputs hold all n,
            in index order; a DELTA output holds only those with something new
            (text, tokens or a finish reason) since the last one.
        finished: True once every completion has finished.
        prompt_logprobs: with ``SamplingParams.prompt_logprobs`` set, one entry
            per prompt token: None for the first (nothing predicts it), then the
            log-probability of each token given the ones before it; set from the
            first output that carries a generated token on. Else None.
        metrics: timing of the request (seconds, ``time.monotonic`` clock):
            ``arrival_time``, ``first_token_time`` (the first token of any
            completion), ``finished_time`` (when the last one finished); and
            ``num_generation_tokens``, summed over the n completions.
        pooled_output: a pooling request's pooled hidden states
            ([hidden_size] floats, see :mod:`ember.pooling_params`); else None.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict[str, float] = field(default_factory=dict)
    prompt_logprobs: list[SampleLogprob | None] | None = None
    pooled_output: list[float] | None = None
