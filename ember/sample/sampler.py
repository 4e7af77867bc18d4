"""Sampler: logits -> next token ids, for a batch of requests with their own
sampling parameters.

Random sampling uses the exponential-race form of the Gumbel-max trick: the
token ``argmax(p_i / e_i)`` with ``e_i ~ Exp(1)`` is distributed as ``p``. For
a request with a ``seed``, the noise ``e`` is drawn from a generator seeded by
``(seed, output position)`` alone, so the token never depends on what else is
in the batch, on step boundaries or on preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.sample.logits_processor import (LogitBiasMetadata, LogitsProcessor, TokenMaskMetadata,
                                           apply_logit_bias, apply_token_mask, logits_processors_for,
                                           uses_logits_processor)
from ember.sample.logprobs import LogprobsMetadata, compute_logprobs
from ember.sample.penalties import PenaltyMetadata, apply_penalties, uses_penalty
from ember.sampling_params import SamplingParams

_MASK63 = (1 << 63) - 1


@dataclass(slots=True)
class SamplingMetadata:
    """Per-row sampling settings of one step's logits.

    Attributes:
        temperature: [num_rows] float32 (0 rows are greedy).
        top_k: [num_rows] int64 (0: off). top_p, min_p: [num_rows] float32.
        all_greedy: every row is greedy (skip the random path; the four tensors
            are then None, so an all-greedy step copies nothing to the device).
        use_top_k, use_top_p, use_min_p: some row uses that filter (decided on
            the host from the parameters, so that sampling never waits for the
            device to answer a question about its own tensors).
        seeds: per row, None or the generator seed for that row's noise.
        penalties: None unless some row uses a repetition, presence or
            frequency penalty.
        logprobs: None unless some row asks for log-probabilities.
        token_mask: None unless some row's logits processors constrain its
            next token (see :mod:`ember.sample.logits_processor`).
        logit_bias: None unless some row's logits processors bias (or ban)
            some of its tokens (``logit_bias``, ``min_tokens``, ``bad_words``).
    """

    temperature: torch.Tensor | None
    top_k: torch.Tensor | None
    top_p: torch.Tensor | None
    min_p: torch.Tensor | None
    all_greedy: bool
    seeds: list[int | None]
    penalties: PenaltyMetadata | None = None
    logprobs: LogprobsMetadata | None = None
    use_top_k: bool = False
    use_top_p: bool = False
    use_min_p: bool = False
    token_mask: TokenMaskMetadata | None = None
    logit_bias: LogitBiasMetadata | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], output_positions: list[int], device: torch.device,
              token_ids: list[list[int]] | None = None, vocab_size: int | None = None,
              logits_processors: list[list[LogitsProcessor]] | None = None,
              token_mask: TokenMaskMetadata | None = None) -> SamplingMetadata:
        """Args:
            params: per row, its request's sampling parameters.
            output_positions: per row, the index of the token it samples among
                its request's outputs (0 for the first generated token), i.e.
                how many output tokens the request has so far.
            device: where the logits are.
            token_ids: per row, the request's prompt followed by its output
                tokens so far (the last ``output_positions[i]`` of them); read
                only when some row uses a penalty or a logits processor.
            vocab_size: the logits' width; needed when some row has a logits
                processor.
            logits_processors: per row, its processors; None: those its
                parameters ask for (:func:`~ember.sample.logits_processor.logits_processors_for`).
            token_mask: the step's masks, already built (the rows'
                processors may still add logit biases, but must not mask).

        The per-row values travel in asynchronous host-to-device copies (two,
        plus one or two per feature some row uses); nothing here waits for
        the device.

        Raises:
            ValueError: a row uses a penalty or a logits processor and
                ``token_ids`` (or, for a processor, ``vocab_size``) is None.
        """
        all_greedy, any_penalty, any_logprobs = True, False, False
        any_processor = logits_processors is not None
        for p in params:
            all_greedy &= p.greedy
            any_penalty = any_penalty or uses_penalty(p)
            any_logprobs = any_logprobs or p.logprobs is not None
            any_processor = any_processor or uses_logits_processor(p)
        penalties = None
        if any_penalty:
            if token_ids is None:
                raise ValueError("token_ids must be given when a row uses a penalty")
            penalties = PenaltyMetadata.build(params, token_ids, output_positions, device)
        logprobs = LogprobsMetadata.build(params, device) if any_logprobs else None
        logit_bias = None
        if any_processor:
            built_mask, logit_bias = _build_processor_metadata(params, output_positions, device, token_ids,
                                                               vocab_size, logits_processors)
            if built_mask is not None and token_mask is not None:
                raise ValueError("token_mask was given but some row's logits processors also mask tokens; "
                                 "pass the masks as processors (BitmaskProcessor) instead")
            token_mask = token_mask if token_mask is not None else built_mask
        if all_greedy:
            return cls(None, None, None, None, True, [None] * len(params), penalties, logprobs,
                       token_mask=token_mask, logit_bias=logit_bias)
        seeds = [None if p.seed is None else _mix(p.seed, pos) for p, pos in zip(params, output_positions)]
        floats = torch.tensor([[0.0 if p.greedy else p.temperature for p in params], [p.top_p for p in params],
                               [p.min_p for p in params]], dtype=torch.float32).to(device, non_blocking=True)
        top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64).to(device, non_blocking=True)
        sampled = [p for p in params if not p.greedy]  # greedy rows ignore the filters
        return cls(
            temperature=floats[0], top_k=top_k, top_p=floats[1], min_p=floats[2],
            all_greedy=False,
            seeds=seeds,
            penalties=penalties,
            logprobs=logprobs,
            use_top_k=any(p.top_k > 0 for p in sampled),
            use_top_p=any(p.top_p < 1 for p in sampled),
            use_min_p=any(p.min_p > 0 for p in sampled),
            token_mask=token_mask,
            logit_bias=logit_bias,
        )


def _build_processor_metadata(params: list[SamplingParams], output_positions: list[int], device: torch.device,
                              token_ids: list[list[int]] | None, vocab_size: int | None,
                              logits_processors: list[list[LogitsProcessor]] | None
                              ) -> tuple[TokenMaskMetadata | None, LogitBiasMetadata | None]:
    procs = logits_processors if logits_processors is not None else [logits_processors_for(p) for p in params]
    if not any(procs):
        return None, None
    if token_ids is None or vocab_size is None:
        raise ValueError("token_ids and vocab_size must be given when a row has a logits processor")
    # NOTE: as for penalties, a token still in flight (asynchronous
    # scheduling) is not in token_ids yet, so a processor that reads the
    # output history needs steps without one.
    # (Its length is the output position all the same: processors that only
    # count, such as min_tokens', need no such steps.)
    outputs = [token_ids[i][max(0, len(token_ids[i]) - output_positions[i]):] if procs[i] else []
               for i in range(len(params))]
    return (TokenMaskMetadata.build(procs, outputs, vocab_size, device),
            LogitBiasMetadata.build(procs, outputs, vocab_size, device))


@dataclass(slots=True)
class SamplerOutput:
    """One step's sampling results, still on the device.

    Attributes:
        sampled_token_ids: [num_rows] int64.
        logprobs: None, or the packed log-probabilities of the rows that asked
            ([num_asking_rows, 2 + 2k] float64; see
            :func:`ember.sample.logprobs.compute_logprobs`).
    """

    sampled_token_ids: torch.Tensor
    logprobs: torch.Tensor | None = None


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of [rows, vocab]; two small Triton kernels on CUDA
    (:func:`ember.kernels.triton_ops.argmax_rows`)."""
    if x.is_cuda and x.stride(-1) == 1:
        from ember.kernels.triton_ops import argmax_rows

        return argmax_rows(x)
    return x.argmax(dim=-1)


def _mix(seed: int, position: int) -> int:
    # splitmix64-style mixing so that nearby (seed, position) pairs give unrelated streams.
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & ((1 << 64) - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & ((1 << 64) - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & ((1 << 64) - 1)
    return (z ^ (z >> 31)) & _MASK63


class Sampler:
    """Greedy, temperature, top-k, top-p and min-p sampling, with repetition,
    presence and frequency penalties and log-probabilities.

    Args:
        generator: the source of noise for rows without a seed.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """``logits``: [num_rows, vocab] float32 raw logits (not modified).

        Rows with logits processors first lose their disallowed tokens (-inf)
        and get their biases; penalties apply next; greedy rows then take the
        argmax of the penalized logits (as vLLM and HF do), the others are
        sampled after temperature and top-k/p/min-p. Log-probabilities come
        from the raw logits (before the processors' masks too).
        """
        raw = logits
        sampled, logits, is_greedy = shape_logits(logits, meta)
        if logits is not None:
            probs = logits.softmax(dim=-1)
            noise = self._exponential_noise(probs, meta.seeds)
            sampled = torch.where(is_greedy, sampled, _argmax(probs.div(noise)))
        logprobs = None if meta.logprobs is None else compute_logprobs(raw, sampled, meta.logprobs)
        return SamplerOutput(sampled, logprobs)

    def _exponential_noise(self, probs: torch.Tensor, seeds: list[int | None]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, seed in enumerate(seeds):
            if seed is not None:
                g = torch.Generator(device=probs.device).manual_seed(seed)
                noise[i].exponential_(generator=g)
        return noise


def shape_logits(logits: torch.Tensor, meta: SamplingMetadata
                 ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The sampler's view of ``logits`` ([rows, vocab] float32 raw, not
    modified): the logits processors' masks (-inf) and biases, then penalties;
    greedy rows take the argmax of that, the others sample from it after
    temperature and top-k / top-p / min-p. One definition for the sampler and
    the speculative-decoding verifier, so both draw from the same distribution.

    Returns:
        ``(argmax [rows] int64, the scaled and filtered logits [rows, vocab]
        (None when every row is greedy), the greedy rows [rows] bool (None
        likewise))``.
    """
    if meta.token_mask is not None:
        logits = apply_token_mask(logits, meta.token_mask)
    if meta.logit_bias is not None:
        logits = apply_logit_bias(logits, meta.logit_bias)
    if meta.penalties is not None:
        logits = apply_penalties(logits, meta.penalties)
    argmax = _argmax(logits)
    if meta.all_greedy:
        return argmax, None, None
    is_greedy = meta.temperature == 0
    temp = torch.where(is_greedy, torch.ones_like(meta.temperature), meta.temperature)
    scaled = apply_top_k_top_p_min_p(logits / temp.unsqueeze(1), meta.top_k, meta.top_p, meta.min_p,
                                     use_top_k=meta.use_top_k, use_top_p=meta.use_top_p, use_min_p=meta.use_min_p)
    return argmax, scaled, is_greedy


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor, *, use_top_k: bool = True, use_top_p: bool = True,
                            use_min_p: bool = True) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, nucleus (top-p;
    Holtzman et al., 2019) and min-p (Nguyen et al., 2024) sets.

    Args:
        logits: [num_rows, vocab] float32, already divided by temperature.
        top_k: [num_rows] int64, 0 disables. top_p: [num_rows], 1 disables.
        min_p: [num_rows], 0 disables.
        use_top_k, use_top_p, use_min_p: False skips that filter (no row
            uses it); with all True the result is the same, at more cost.
    """
    vocab = logits.shape[-1]
    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if not (use_top_k or use_top_p):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if use_top_k:
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        mask |= torch.arange(vocab, device=logits.device)[None, :] >= k[:, None]
    if use_top_p:
        probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
        # Keep a token if the mass strictly before it is < top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        mask |= mass_before >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
