"""Per-request logits processors: constraints on a request's next token,
applied on the device to a step's logits as one batched token mask.

A :class:`LogitsProcessor` answers, for one sampling row, which tokens are
allowed next, as a packed bitmask (the layout grammar engines such as
xgrammar fill, and vLLM's structured output applies): an int32 vector of
``ceil(vocab_size / 32)`` words, token ``t`` allowed when bit ``t % 32`` of
word ``t // 32`` is set (least significant bit first). On the host, the rows
of a step that have processors get their masks stacked into one
[num_constrained_rows, words] tensor (the AND of a row's processors), which
travels in one asynchronous host-to-device copy; the sampler unpacks it and
sets every disallowed logit to -inf in one masked fill. Steps without a
constrained row build and launch nothing.

The mask applies before penalties, temperature and top-k/p/min-p, so greedy
rows pick the most likely allowed token and random rows sample among allowed
tokens only. Log-probabilities stay those of the raw, unconstrained
distribution (see :mod:`ember.sample.logprobs`).

Processors come from a request's :class:`~ember.sampling_params.SamplingParams`
(:func:`logits_processors_for`): ``allowed_token_ids``; structured output's
grammar masks are filled by the engine core (:mod:`ember.structured_output`)
and reach the sampler stacked (:meth:`TokenMaskMetadata.from_rows`), or as
:class:`BitmaskProcessor` rows when a row also has other processors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ember.sampling_params import SamplingParams


def bitmask_words(vocab_size: int) -> int:
    """Int32 words of one row's token bitmask: ``ceil(vocab_size / 32)``."""
    return (vocab_size + 31) // 32


def token_ids_to_bitmask(token_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    """The bitmask allowing exactly ``token_ids`` (ids at or past
    ``vocab_size`` are left out).

    Returns:
        [bitmask_words(vocab_size)] int32 CPU tensor.
    """
    ids = np.asarray(token_ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < vocab_size)]
    words = np.zeros(bitmask_words(vocab_size), dtype=np.uint32)
    np.bitwise_or.at(words, ids >> 5, np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    return torch.from_numpy(words.view(np.int32))


class LogitsProcessor(ABC):
    """One request's constraint on its next token."""

    @abstractmethod
    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        """The tokens allowed at the request's next output position.

        Args:
            output_token_ids: the request's output tokens so far, as the host
                knows them (the same history penalties read).
            vocab_size: the logits' width.

        Returns:
            A [ceil(vocab_size / 32)] int32 CPU bitmask (see the module
            docstring), or None to leave this position unconstrained.
        """


class BitmaskProcessor(LogitsProcessor):
    """A mask computed elsewhere for this position (e.g. a grammar's, filled
    by the engine core): ``bitmask`` is a [ceil(vocab / 32)] int32 CPU row."""

    def __init__(self, bitmask: torch.Tensor) -> None:
        self.bitmask = bitmask

    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        return fit_bitmask(self.bitmask, vocab_size)


def fit_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``bitmask`` ([..., words] int32) cut or zero-padded to
    ``bitmask_words(vocab_size)`` words (tokens past its end disallowed)."""
    words = bitmask_words(vocab_size)
    have = bitmask.shape[-1]
    if have == words:
        return bitmask
    if have > words:
        return bitmask[..., :words]
    out = torch.zeros(*bitmask.shape[:-1], words, dtype=torch.int32)
    out[..., :have] = bitmask
    return out


class AllowedTokenIdsProcessor(LogitsProcessor):
    """Only ``token_ids`` may be generated (``SamplingParams.allowed_token_ids``)."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = list(token_ids)

    def allowed_token_bitmask(self, output_token_ids: Sequence[int], vocab_size: int) -> torch.Tensor | None:
        return token_ids_to_bitmask(self.token_ids, vocab_size)


def uses_logits_processor(params: SamplingParams) -> bool:
    """Whether :func:`logits_processors_for` gives ``params`` any processor."""
    return params.allowed_token_ids is not None


def logits_processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors a request's sampling parameters ask for (empty: none)."""
    if params.allowed_token_ids is not None:
        return [AllowedTokenIdsProcessor(params.allowed_token_ids)]
    return []


@dataclass(slots=True)
class TokenMaskMetadata:
    """One step's allowed-token masks, on the device.

    Attributes:
        bitmask: [num_constrained_rows, ceil(vocab / 32)] int32 (see the
            module docstring).
        rows: the constrained rows' indices among the step's sampling rows,
            [num_constrained_rows] int64 on the device, or None when every
            row is constrained (no gather needed).
    """

    bitmask: torch.Tensor
    rows: torch.Tensor | None

    @classmethod
    def build(cls, processors: Sequence[Sequence[LogitsProcessor]], output_token_ids: Sequence[Sequence[int]],
              vocab_size: int, device: torch.device) -> TokenMaskMetadata | None:
        """Ask each row's processors for its mask.

        Args:
            processors: per sampling row, its processors (empty: none).
            output_token_ids: per row, its output tokens so far.
            vocab_size: the logits' width.
            device: where the logits are.

        Returns:
            None when no processor constrains any row.

        Raises:
            ValueError: a processor returned a mask of the wrong shape or dtype.
        """
        words = bitmask_words(vocab_size)
        row_ids, masks = [], []
        for i, procs in enumerate(processors):
            mask = None
            for proc in procs:
                m = proc.allowed_token_bitmask(output_token_ids[i], vocab_size)
                if m is None:
                    continue
                if m.shape != (words,) or m.dtype != torch.int32:
                    raise ValueError(f"{type(proc).__name__} returned a {m.dtype} mask of shape "
                                     f"{tuple(m.shape)}; expected int32 of shape ({words},)")
                mask = m if mask is None else mask & m
            if mask is not None:
                row_ids.append(i)
                masks.append(mask)
        if not row_ids:
            return None
        return cls.from_rows(torch.stack(masks), row_ids, len(processors), device)

    @classmethod
    def from_rows(cls, bitmask: torch.Tensor, row_ids: Sequence[int], num_rows: int,
                  device: torch.device) -> TokenMaskMetadata:
        """Masks already stacked on the host.

        Args:
            bitmask: [len(row_ids), words] int32 CPU, row i for sampling row
                ``row_ids[i]``.
            row_ids: distinct row indices, in any order.
            num_rows: the step's sampling rows.
            device: where the logits are.

        The bitmask travels in one asynchronous host-to-device copy (from
        pinned memory on CUDA).
        """
        if device.type == "cuda":
            bitmask = bitmask.pin_memory()
        bitmask = bitmask.to(device, non_blocking=True)
        rows = None
        if list(row_ids) != list(range(num_rows)):
            rows = torch.tensor(row_ids, dtype=torch.int64).to(device, non_blocking=True)
        return cls(bitmask, rows)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, ceil(vocab / 32)] int32 -> [rows, vocab_size] bool (True: allowed).

    NOTE: reads the words as little-endian bytes (token ``t`` is bit ``t % 8``
    of byte ``t // 8``), as on x86, ARM and CUDA devices, so the transient
    tensors are bytes, not int32 words: [rows, vocab] uint8 at most.
    """
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    bits = (bitmask.contiguous().view(torch.uint8).unsqueeze(-1) >> shifts) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def apply_token_mask(logits: torch.Tensor, meta: TokenMaskMetadata) -> torch.Tensor:
    """``logits`` [num_rows, vocab] with every token a constrained row does
    not allow set to -inf (a new tensor; ``logits`` is not modified)."""
    allowed = unpack_bitmask(meta.bitmask, logits.shape[-1])
    if meta.rows is None:
        return logits.masked_fill(~allowed, float("-inf"))
    return logits.index_put((meta.rows,), logits[meta.rows].masked_fill(~allowed, float("-inf")))
