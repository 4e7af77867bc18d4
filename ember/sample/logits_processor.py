"""Per-request logits processors: constraints and biases on a request's next
token, applied on the device to a step's logits in one batched operation each.

A :class:`LogitsProcessor` answers, for one sampling row, one or both of:

* which tokens are allowed next (:meth:`LogitsProcessor.allowed_token_bitmask`),
  as a packed bitmask (the layout grammar engines such as xgrammar fill, and
  vLLM's structured output applies): an int32 vector of
  ``ceil(vocab_size / 32)`` words, token ``t`` allowed when bit ``t % 32`` of
  word ``t // 32`` is set (least significant bit first). On the host, the rows
  of a step that have masks get them stacked into one
  [num_constrained_rows, words] tensor (the AND of a row's processors), which
  travels in one asynchronous host-to-device copy; the sampler unpacks it and
  sets every disallowed logit to -inf in one masked fill.
* what to add to a few tokens' logits (:meth:`LogitsProcessor.logit_bias`), as
  sparse ``(token ids, biases)``; -inf bans a token. The step's entries of all
  rows are concatenated into one COO list (rows, token ids, values) that
  travels in two asynchronous copies and is added to the logits in one
  ``index_put`` with accumulation (a token named twice gets both biases).

Steps where no row's processor answers anything build and launch nothing.

Masks and biases apply before penalties, temperature and top-k/p/min-p, so
greedy rows pick the best allowed (biased) token and random rows sample from
the biased, masked distribution. Log-probabilities stay those of the raw,
unconstrained distribution (see :mod:`ember.sample.logprobs`).

Processors come from a request's :class:`~ember.sampling_params.SamplingParams`
(:func:`logits_processors_for`): ``allowed_token_ids`` (a mask), ``logit_bias``
(biases), ``min_tokens`` (-inf on the stop tokens while the output is shorter)
and ``bad_words`` (-inf on a bad word's last token where the output ends with
its other tokens). Structured output's grammar masks are filled by the engine
core (:mod:`ember.structured_output`) and reach the sampler stacked
(:meth:`TokenMaskMetadata.from_rows`), or as :class:`BitmaskProcessor` rows
when a row also has other processors.
"""

from __future__ import annotations

from abc import ABC
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
    """One request's constraint on its next token: a subclass implements
    :meth:`allowed_token_bitmask`, :meth:`logit_bias` or both (the defaults
    answer None: nothing to apply)."""

    reads_output_history: bool = False
    """Whether the answers depend on the output tokens' values (not only on
    how many there are): such a request's next step waits until its last
    sampled token is on the host (see :func:`reads_output_history`)."""

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
        return None

    def logit_bias(self, output_token_ids: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """What to add to some logits at the request's next output position.

        Args: as :meth:`allowed_token_bitmask`.

        Returns:
            ``(token_ids, biases)``: [k] int64 ids in [0, vocab_size) and [k]
            float32 values (-inf bans), or None when nothing applies.
        """
        return None


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


class LogitBiasProcessor(LogitsProcessor):
    """Fixed biases on some tokens (``SamplingParams.logit_bias``)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.token_ids = np.fromiter(bias.keys(), dtype=np.int64, count=len(bias))
        self.values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def logit_bias(self, output_token_ids: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self.token_ids, self.values


class MinTokensProcessor(LogitsProcessor):
    """Bans the stop tokens (-inf) until the output has ``min_tokens`` tokens
    (``SamplingParams.min_tokens``)."""

    def __init__(self, min_tokens: int, stop_token_ids: Sequence[int]) -> None:
        self.min_tokens = min_tokens
        self.token_ids = np.asarray(sorted(stop_token_ids), dtype=np.int64)

    def logit_bias(self, output_token_ids: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        if len(output_token_ids) >= self.min_tokens or not len(self.token_ids):
            return None
        ids = self.token_ids[self.token_ids < vocab_size]
        return ids, np.full(len(ids), -np.inf, dtype=np.float32)


class BadWordsProcessor(LogitsProcessor):
    """Bans (-inf) the last token of each bad word's token sequence wherever
    the output ends with the sequence's other tokens
    (``SamplingParams.bad_words``, tokenized by the engine's input processor)."""

    reads_output_history = True

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.sequences = [list(s) for s in sequences if s]

    def logit_bias(self, output_token_ids: Sequence[int], vocab_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        banned = set()
        n = len(output_token_ids)
        for seq in self.sequences:
            k = len(seq) - 1
            if k == 0 or (k <= n and list(output_token_ids[n - k:]) == seq[:-1]):
                banned.add(seq[-1])
        if not banned:
            return None
        ids = np.fromiter(banned, dtype=np.int64, count=len(banned))
        return ids, np.full(len(ids), -np.inf, dtype=np.float32)


def uses_logits_processor(params: SamplingParams) -> bool:
    """Whether :func:`logits_processors_for` gives ``params`` any processor."""
    return (params.allowed_token_ids is not None or bool(params.logit_bias) or params.min_tokens > 0
            or bool(params._bad_words_token_ids))


def reads_output_history(params: SamplingParams) -> bool:
    """Whether a processor of ``params`` reads the output tokens' values (so
    that the scheduler must not schedule its next step before the last
    sampled token is on the host)."""
    return bool(params._bad_words_token_ids) and any(len(s) > 1 for s in params._bad_words_token_ids)


def logits_processors_for(params: SamplingParams) -> list[LogitsProcessor]:
    """The processors a request's sampling parameters ask for (empty: none)."""
    procs: list[LogitsProcessor] = []
    if params.allowed_token_ids is not None:
        procs.append(AllowedTokenIdsProcessor(params.allowed_token_ids))
    if params.logit_bias:
        procs.append(LogitBiasProcessor(params.logit_bias))
    if params.min_tokens > 0:
        procs.append(MinTokensProcessor(params.min_tokens, params.all_stop_token_ids))
    if params._bad_words_token_ids:
        procs.append(BadWordsProcessor(params._bad_words_token_ids))
    return procs


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


@dataclass(slots=True)
class LogitBiasMetadata:
    """One step's sparse logit biases, on the device (COO layout).

    Attributes:
        index: [2, nnz] int64: each entry's row among the step's sampling
            rows, and its token id.
        values: [nnz] float32 biases (-inf bans the token).
    """

    index: torch.Tensor
    values: torch.Tensor

    @classmethod
    def build(cls, processors: Sequence[Sequence[LogitsProcessor]], output_token_ids: Sequence[Sequence[int]],
              vocab_size: int, device: torch.device) -> LogitBiasMetadata | None:
        """Ask each row's processors for its biases (arguments as
        :meth:`TokenMaskMetadata.build`).

        Returns:
            None when no processor biases any row.

        Raises:
            ValueError: a processor returned ids and values of different
                lengths, or an id outside [0, vocab_size).
        """
        rows, ids, values = [], [], []
        for i, procs in enumerate(processors):
            for proc in procs:
                answer = proc.logit_bias(output_token_ids[i], vocab_size)
                if answer is None:
                    continue
                tok, val = answer
                if len(tok) != len(val):
                    raise ValueError(f"{type(proc).__name__} returned {len(tok)} token ids and {len(val)} biases")
                if len(tok) and (int(tok.min()) < 0 or int(tok.max()) >= vocab_size):
                    raise ValueError(f"{type(proc).__name__} returned a token id outside [0, {vocab_size})")
                rows.append(np.full(len(tok), i, dtype=np.int64))
                ids.append(np.asarray(tok, dtype=np.int64))
                values.append(np.asarray(val, dtype=np.float32))
        if not rows or not sum(len(r) for r in rows):
            return None
        index = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(ids)]))
        vals = torch.from_numpy(np.concatenate(values))
        if device.type == "cuda":
            index, vals = index.pin_memory(), vals.pin_memory()
        return cls(index.to(device, non_blocking=True), vals.to(device, non_blocking=True))


def apply_logit_bias(logits: torch.Tensor, meta: LogitBiasMetadata) -> torch.Tensor:
    """``logits`` [num_rows, vocab] plus the step's biases (a new tensor;
    ``logits`` is not modified)."""
    return logits.index_put((meta.index[0], meta.index[1]), meta.values, accumulate=True)


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
