"""Beam search over the engine's log-probabilities.

Algorithm (per prompt, beam width ``W``): the search starts with one live beam,
the prompt. Each step, every live beam is extended with each of its ``2 * W``
most likely next tokens (log-probabilities of the model's raw distribution,
float32 ``log_softmax`` of the logits); of all these candidates the ``W`` with
the highest cumulative log-probability are kept (ties: the earlier beam, then
the more likely token). A kept candidate that ends on a stop token (EOS unless
``ignore_eos``, or one of ``stop_token_ids``) is finished; the others are the
next live beams. The search ends when no beam is live or the live ones reach
``max_tokens`` (they finish with ``length``). The ``W`` finished beams with the
best length-penalized score ``cum_logprob / length ** length_penalty`` are the
result, best first, where ``length`` is the number of generated tokens without
a final stop token (the score of Hugging Face transformers' ``BeamHypotheses``
over the generated length; vLLM's step rule, in which finished candidates take
places among the ``W`` kept, so fewer beams may stay live).

How beams share the KV cache: each step, each live beam is one engine request
whose prompt is the user's prompt followed by the beam's tokens, with
``max_tokens=1`` and greedy sampling, asking for the ``2 * W`` top
log-probabilities. The requests of a step run in one batch and all start with
the prompt, so the prefix cache hands every one of them the prompt's full
blocks (each block's ``ref_cnt`` counts the beams that hold it), and beams with
a common start share the full blocks of their common tokens too: a beam forks
from its parent by reference, block by block, and writes only into blocks of
its own (copy-on-write at block granularity). The prompt is computed once, by
the first step (one request), and never copied.
A beam's partly filled last block is not shared: it recomputes those tokens
(fewer than ``block_size``, plus its new token) rather than copying the block on
the device. This keeps the scheduler's one rule (a request computes the tokens
past its ``num_computed_tokens``) and the engine core free of beam state: no
fork operation, no block copy kernel, no per-step work added to ordinary
decoding. With prefix caching off each step recomputes every beam in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.outputs import CompletionOutput, SampleLogprob
from ember.sampling_params import MAX_LOGPROBS, RequestOutputKind, SamplingParams
from ember.utils import INT64_MAX, is_int

# Each beam asks the engine for its 2 * W most likely tokens (logprobs <= MAX_LOGPROBS).
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2


@dataclass
class BeamSearchParams:
    """Parameters of one beam search (vLLM's ``BeamSearchParams`` fields).

    Attributes:
        beam_width: beams kept per step and sequences returned, in [1, 10]
            (each beam asks for its ``2 * beam_width`` most likely tokens, and
            at most 20 log-probabilities are computed per token).
        max_tokens: most tokens generated per beam, in [1, 2**63); capped by
            the context window.
        ignore_eos: EOS does not end a beam.
        temperature: must be 0: beams are ranked by the model's raw
            log-probabilities.
        length_penalty: exponent of the generated length in the score
            ``cum_logprob / length ** length_penalty``; 0 ranks by cumulative
            log-probability alone, larger values favour longer sequences. Finite.
        stop_token_ids: token ids that end a beam (finish reason ``stop``), as EOS.
        logprobs: None, or k in [0, 20]: each sequence carries, per token, its
            log-probability, its rank and the k most likely tokens at that position.
        skip_special_tokens: drop special tokens from the text.

    Raises:
        ValueError: a value out of range; the message starts with the field's name.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    stop_token_ids: list[int] | None = None
    logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not is_int(self.beam_width, 1, MAX_BEAM_WIDTH):
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not is_int(self.max_tokens, 1, INT64_MAX):
            raise ValueError(f"max_tokens must be an integer in [1, 2**63), got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature != 0:
            raise ValueError(f"temperature must be 0 with beam search (beams are ranked by the model's raw "
                             f"log-probabilities), got {self.temperature!r}")
        if (not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool)
                or not math.isfinite(self.length_penalty)):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty!r}")
        if self.logprobs is not None and not is_int(self.logprobs, 0, MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def step_sampling_params(self) -> SamplingParams:
        """The parameters of the engine request that extends one beam by one step:
        one greedy token and the top ``max(2 * beam_width, logprobs)`` log-probabilities.
        Its stop ids carry ``stop_token_ids`` (for the vocabulary check); the
        search, not the engine, decides what ends a beam."""
        return SamplingParams(max_tokens=1, temperature=0.0, logprobs=max(2 * self.beam_width, self.logprobs or 0),
                              stop_token_ids=self.stop_token_ids, ignore_eos=True,
                              skip_special_tokens=self.skip_special_tokens,
                              output_kind=RequestOutputKind.FINAL_ONLY)


def beam_score(cum_logprob: float, num_tokens: int, ends_with_stop: bool, length_penalty: float) -> float:
    """A finished beam's score: ``cum_logprob / length ** length_penalty`` where
    ``length`` counts its generated tokens without a final stop token (at least 1)."""
    length = max(1, num_tokens - (1 if ends_with_stop else 0))
    return cum_logprob / length ** length_penalty


@dataclass
class BeamSearchSequence:
    """One finished beam.

    Attributes:
        token_ids: its generated tokens (a final stop token included, as in
            :class:`~ember.outputs.CompletionOutput`).
        text: their text (a final stop token left out).
        cum_logprob: sum of the log-probabilities of ``token_ids`` (natural log).
        score: its length-penalized score (see :func:`beam_score`).
        finish_reason: ``"stop"`` (a stop token) or ``"length"``.
        stop_reason: the ``stop_token_ids`` entry that ended it, if one did
            (None for EOS, as in :class:`~ember.outputs.CompletionOutput`).
        logprobs: with ``BeamSearchParams.logprobs``, one entry per token of
            ``token_ids``; else None.
        prompt_token_ids: the prompt it continues.
    """

    token_ids: list[int]
    text: str
    cum_logprob: float
    score: float
    finish_reason: str
    stop_reason: int | None = None
    logprobs: list[SampleLogprob] | None = None
    prompt_token_ids: list[int] = field(default_factory=list, repr=False)

    @property
    def tokens(self) -> list[int]:
        """The prompt followed by the generated tokens (vLLM's ``tokens``)."""
        return self.prompt_token_ids + self.token_ids

    def as_completion(self, index: int) -> CompletionOutput:
        return CompletionOutput(index, self.text, list(self.token_ids), self.finish_reason, self.stop_reason,
                                self.logprobs, cumulative_logprob=self.cum_logprob)


@dataclass
class BeamSearchOutput:
    """The result of one prompt's beam search.

    Attributes:
        prompt: the prompt text, if it was given as text.
        prompt_token_ids: the tokenized prompt.
        sequences: ``beam_width`` sequences, best score first.
    """

    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSearchSequence]


@dataclass(slots=True)
class _Beam:
    token_ids: list[int]
    cum_logprob: float
    logprobs: list[SampleLogprob] | None
    stopped: bool = False  # ended on a stop token
    stop_reason: int | None = None


class BeamSearch:
    """The state of one prompt's beam search (see the module docstring); the
    caller runs the engine requests of each step and feeds their log-probabilities
    back.

    Args:
        prompt_token_ids: the prompt.
        params: the search's parameters.
        eos_token_ids: the model's EOS ids (ignored with ``ignore_eos``).
        max_model_len: the context window in tokens; beams stop (``length``)
            when it is full.
    Raises:
        ValueError: the prompt leaves no room for output in the context window.
    """

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: frozenset[int],
                 max_model_len: int) -> None:
        if len(prompt_token_ids) >= max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens long, which leaves no room for output in "
                             f"the context window of {max_model_len} tokens (max_model_len)")
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.stop_ids = frozenset(params.stop_token_ids or ()) | (frozenset() if params.ignore_eos
                                                                   else eos_token_ids)
        self.max_tokens = min(params.max_tokens, max_model_len - len(prompt_token_ids))
        self.live: list[_Beam] = [_Beam([], 0.0, None if params.logprobs is None else [])]
        self.finished: list[_Beam] = []

    @property
    def done(self) -> bool:
        return not self.live

    def step_prompts(self) -> list[list[int]]:
        """The prompts of this step's engine requests, one per live beam (the
        user's prompt followed by the beam's tokens)."""
        return [self.prompt_token_ids + beam.token_ids for beam in self.live]

    def advance(self, entries: list[SampleLogprob]) -> None:
        """Take one step.

        Args:
            entries: per live beam (in :meth:`step_prompts` order), the
                log-probabilities of its next token: ``top`` holds at least
                ``2 * beam_width`` tokens, most likely first.
        Raises:
            ValueError: not one entry per live beam, or too few top tokens.
        """
        width = self.params.beam_width
        if len(entries) != len(self.live):
            raise ValueError(f"got {len(entries)} log-probability entries for {len(self.live)} live beams")
        candidates = []
        for beam, entry in zip(self.live, entries):
            if len(entry.top) < 2 * width:
                raise ValueError(f"a beam needs its {2 * width} most likely tokens, got {len(entry.top)}")
            for rank, (token, logprob) in enumerate(entry.top[:2 * width], 1):
                candidates.append((beam.cum_logprob + logprob, beam, token, logprob, rank, entry))
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep beam, then rank order
        num_top = self.params.logprobs or 0
        self.live = []
        for cum, beam, token, logprob, rank, entry in candidates[:width]:
            logprobs = None if beam.logprobs is None else [
                *beam.logprobs, SampleLogprob(token, logprob, rank, entry.top[:num_top])]
            new = _Beam([*beam.token_ids, token], cum, logprobs)
            if token in self.stop_ids:
                # As the engine reports it: the id for stop_token_ids, None for EOS.
                new.stopped = True
                new.stop_reason = token if token in self.params.stop_token_ids else None
                self.finished.append(new)
            elif len(new.token_ids) >= self.max_tokens:
                self.finished.append(new)
            else:
                self.live.append(new)

    def result(self, tokenizer: object | None) -> list[BeamSearchSequence]:
        """The ``beam_width`` best finished sequences, best score first (call
        once :attr:`done`).

        Args:
            tokenizer: a ``transformers`` fast tokenizer for the texts (None:
                empty texts).
        """
        assert self.done, "the search is still running"
        p = self.params
        seqs = []
        for beam in self.finished:
            ends_with_stop = beam.stopped
            detok = IncrementalDetokenizer(tokenizer, SamplingParams(skip_special_tokens=p.skip_special_tokens))
            detok.update(beam.token_ids[:-1] if ends_with_stop else beam.token_ids)
            seqs.append(BeamSearchSequence(
                token_ids=beam.token_ids, text=detok.get_next_output_text(True, False),
                cum_logprob=beam.cum_logprob,
                score=beam_score(beam.cum_logprob, len(beam.token_ids), ends_with_stop, p.length_penalty),
                finish_reason="stop" if ends_with_stop else "length", stop_reason=beam.stop_reason,
                logprobs=beam.logprobs, prompt_token_ids=self.prompt_token_ids))
        seqs.sort(key=lambda s: s.score, reverse=True)
        return seqs[:p.beam_width]
