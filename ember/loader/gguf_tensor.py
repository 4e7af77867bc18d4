"""GGUF weights read and dequantized only where a weight loader takes them.

A 2-D GGUF tensor, HF shape ``[N, K]``, is stored row-major as N rows of
``K / block_elems`` blocks of ``block_bytes`` bytes each (ggml's block
formats; F32/F16/BF16 are blocks of one element). So a range of rows is one
contiguous byte range of the file, and a range of columns is, in each of
those rows, the run of blocks that covers it.

:class:`LazyGGUFTensor` stands for such a tensor, or a row/column range of it.
Weight loaders narrow it as they narrow a torch tensor (``narrow``,
``shape``, ``dtype``); when it is copied (``param.copy_(view)``, or any other
torch function or tensor attribute, through ``__torch_function__``) only the
bytes under the view are read from the memory map and dequantized (with
gguf-py's ``gguf.quants.dequantize``): a tensor-parallel rank reads its
slices only, and a pipeline stage never reads the layers of other stages.

- Rows (a column-parallel split, a vocabulary shard): those rows' bytes.
- Columns (a row-parallel split): in each row, the blocks covering the
  columns are dequantized, then the columns are cut out (an exact cut when
  the split is a multiple of ``block_elems``).
- As stored (the ``gguf`` quantization method: ``[N, row_bytes]`` uint8
  blocks): rows as above; columns only at block boundaries, anything else
  is a ``ValueError`` naming the tensor, its block size and the split
  (:meth:`LazyGGUFTensor.dequantized` turns the view into a dequantized one).

llama.cpp stores the q/k projections of llama models with the rows of each
head interleaved for its pairwise rope (``convert_hf_to_gguf.py``,
``LlamaModel.permute``); a view of them reads the heads covering its rows,
un-permutes them and cuts the rows out.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import gguf.quants
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from torch.utils._pytree import tree_map

from ember.loader.base import ModelLoadError


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute``.

    HF orders each head's q/k rows as two halves ``[x_0..x_{d/2-1}, y_0..y_{d/2-1}]``
    (``rotate_half`` rope); the converter interleaves them as ``(x_0, y_0), (x_1, y_1)..``
    for ggml's pairwise rope. ``w``: ``[n_heads * d, ...]`` (weight or bias).
    """
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class ReadCounter:
    """Bytes of tensor data read from a file's memory map (``bytes_read``)."""

    def __init__(self) -> None:
        self.bytes_read = 0


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One 2-D GGUF tensor as the file holds it.

    Attributes:
        path: the file (for error messages).
        name: the GGUF tensor name.
        qtype: its ggml type.
        data: ``[N, row_bytes]`` uint8 view of the memory map.
        shape: HF shape ``(N, K)``.
        rotary_heads: heads of llama.cpp's q/k row permutation to undo, or None.
        counter: where reads are counted, or None.
    """

    path: str
    name: str
    qtype: GGMLQuantizationType
    data: np.ndarray
    shape: tuple[int, int]
    rotary_heads: int | None = None
    counter: ReadCounter | None = None

    @property
    def block(self) -> tuple[int, int]:
        """``(elements, bytes)`` of one block of its type."""
        return GGML_QUANT_SIZES[self.qtype]


def _read(view: np.ndarray) -> np.ndarray:
    """Copy ``view`` (a part of the memory map) into memory: the only place
    tensor bytes are read."""
    return np.array(view, dtype=np.uint8, copy=True, order="C")


@functools.cache
def _dequantizable(qtype: GGMLQuantizationType) -> bool:
    """gguf-py has a dequantizer for ``qtype`` (probed on one zero block)."""
    elems, nbytes = GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, nbytes), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


class LazyGGUFTensor:
    """A GGUF tensor, or a row/column range of it, read when used (see the
    module docstring).

    Dequantized (``blocks`` False): shape ``[rows, columns]`` of the HF
    tensor, ``dtype`` the float type it is cast to. As stored (``blocks``
    True): ``[rows, bytes]`` uint8, columns counted in bytes.

    Args:
        stored: the file's tensor.
        blocks: keep the blocks as stored instead of dequantizing.
        dtype: the dtype a dequantized tensor is cast to (ignored with ``blocks``).
        rows, cols: the view's half-open ranges (default: all of it).
    Raises:
        ModelLoadError: a ggml type gguf-py cannot dequantize (dequantized views).
    """

    __slots__ = ("stored", "blocks", "_dtype", "rows", "cols")

    def __init__(self, stored: StoredTensor, blocks: bool, dtype: torch.dtype = torch.float32,
                 rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> None:
        if not blocks and not _dequantizable(stored.qtype):
            raise ModelLoadError(f"{stored.path}: tensor {stored.name!r} uses ggml type {stored.qtype.name}, "
                                 f"which gguf-py cannot dequantize")
        self.stored, self.blocks, self._dtype = stored, blocks, torch.uint8 if blocks else dtype
        self.rows = rows if rows is not None else (0, stored.shape[0])
        self.cols = cols if cols is not None else (0, stored.data.shape[1] if blocks else stored.shape[1])

    # ------------------------------------------------------------ tensor-like metadata

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]))

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return 2

    def dim(self) -> int:
        return 2

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self._dtype.is_floating_point

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        kind = "blocks" if self.blocks else f"dequantized to {self._dtype}"
        return (f"LazyGGUFTensor({self.stored.name!r}, {self.stored.qtype.name} {kind}, rows {self.rows}, "
                f"cols {self.cols})")

    # ------------------------------------------------------------ views

    def narrow(self, dim: int, start: int, length: int) -> LazyGGUFTensor:
        """The view of ``length`` rows (``dim`` 0) or columns (``dim`` 1) from ``start``.

        Raises:
            ValueError: a range outside the view; with ``blocks``, columns
                that are not whole blocks (the message names the tensor, its
                type's block size and the split).
        """
        if dim not in (0, 1, -1, -2):
            raise ValueError(f"GGUF tensor {self.stored.name!r}: dimension {dim} out of range for 2 dimensions")
        dim %= 2
        lo, hi = self.rows if dim == 0 else self.cols
        if start < 0:
            start += hi - lo
        if start < 0 or length < 0 or start + length > hi - lo:
            raise ValueError(f"GGUF tensor {self.stored.name!r}: narrow({dim}, {start}, {length}) is outside "
                             f"its shape {tuple(self.shape)}")
        span = (lo + start, lo + start + length)
        if dim == 0:
            return self._view(rows=span)
        if self.blocks:
            elems, nbytes = self.stored.block
            if span[0] % nbytes or span[1] % nbytes:
                k = self.stored.shape[1]
                raise ValueError(
                    f"GGUF tensor {self.stored.name!r} ({self.stored.qtype.name}, blocks of {elems} input "
                    f"features in {nbytes} bytes) cannot be split at bytes [{span[0]}, {span[1]}) of its "
                    f"{self.stored.data.shape[1]}-byte rows ({k} features): a split kept quantized must be a "
                    f"multiple of {elems} features")
        return self._view(cols=span)

    def _view(self, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> LazyGGUFTensor:
        return LazyGGUFTensor(self.stored, self.blocks, self._dtype, rows or self.rows, cols or self.cols)

    def __getitem__(self, key: Any) -> LazyGGUFTensor | torch.Tensor:
        """Basic slices (step 1) of rows / columns give views; anything else
        reads the view and indexes the tensor."""
        keys = key if isinstance(key, tuple) else (key,)
        if len(keys) <= 2 and all(isinstance(k, slice) and k.step in (None, 1) for k in keys):
            view = self
            for dim, k in enumerate(keys):
                start, stop, _ = k.indices(view.shape[dim])
                view = view.narrow(dim, start, max(0, stop - start))
            return view
        return self.materialize()[key]

    def dequantized(self, dtype: torch.dtype) -> LazyGGUFTensor:
        """The same rows and columns dequantized to ``dtype`` (of a view of
        blocks: its columns converted from bytes to features)."""
        if not self.blocks:
            return LazyGGUFTensor(self.stored, False, dtype, self.rows, self.cols)
        elems, nbytes = self.stored.block
        cols = (self.cols[0] // nbytes * elems, self.cols[1] // nbytes * elems)
        return LazyGGUFTensor(self.stored, False, dtype, self.rows, cols)

    # ------------------------------------------------------------ reading

    def materialize(self) -> torch.Tensor:
        """The view as a CPU tensor of :attr:`shape` and :attr:`dtype`,
        reading (and dequantizing) only the rows and blocks under it.

        Raises:
            ModelLoadError: gguf-py cannot dequantize the tensor's type.
        """
        st = self.stored
        (r0, r1), (c0, c1) = self.rows, self.cols
        if r1 == r0 or c1 == c0:
            return torch.empty(tuple(self.shape), dtype=self._dtype)
        # Rows of the file: whole heads when llama.cpp permuted them.
        head_dim = st.shape[0] // st.rotary_heads if st.rotary_heads else 1
        f0, f1 = r0 // head_dim * head_dim, -(-r1 // head_dim) * head_dim
        elems, nbytes = (1, 1) if self.blocks else st.block
        b0, b1 = c0 // elems, -(-c1 // elems)  # blocks covering the columns
        data = _read(st.data[f0:f1, b0 * nbytes:b1 * nbytes])
        if st.counter is not None:
            st.counter.bytes_read += data.nbytes
        if self.blocks:
            tensor = torch.from_numpy(data)
        else:
            try:
                array = dequantize(data, st.qtype)
            except NotImplementedError:
                raise ModelLoadError(f"{st.path}: tensor {st.name!r} uses ggml type {st.qtype.name}, "
                                     f"which gguf-py cannot dequantize") from None
            array = array.reshape(f1 - f0, (b1 - b0) * elems)
            tensor = torch.from_numpy(array)[:, c0 - b0 * elems:c1 - b0 * elems]
        if st.rotary_heads:
            tensor = unpermute_rotary(tensor, (f1 - f0) // head_dim)
        tensor = tensor[r0 - f0:r1 - f0]
        return tensor.to(self._dtype).contiguous()

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.materialize().to(*args, **kwargs)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Any torch function reads the views among its arguments first."""
        args, kwargs = tree_map(lambda a: a.materialize() if isinstance(a, LazyGGUFTensor) else a,
                                (args, kwargs or {}))
        return func(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Other tensor attributes and methods: those of the read view (so any
        # weight loader works; only narrow/[:] views are cheap).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.materialize(), name)

