"""ggml's quantized block types that the ``gguf`` quantization method runs:
their ids and block geometry (no torch, no gguf package), shared by
:mod:`ember.layers.quantization.gguf` and :mod:`ember.kernels.triton_gguf`.

Source: ggml's ``ggml.h`` (``enum ggml_type``) and ``ggml-common.h`` (the
``block_q*`` structs); the same values as gguf-py's ``GGMLQuantizationType``
and ``GGML_QUANT_SIZES``.
"""

from __future__ import annotations


class GT:
    """The ggml type ids the ``gguf`` method runs (``enum ggml_type`` in ggml.h, the
    values of gguf-py's ``GGMLQuantizationType``; stable in the file format),
    so the kernels need no gguf package."""

    Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14


GGML_TYPE_NAMES = {GT.Q4_0: "Q4_0", GT.Q4_1: "Q4_1", GT.Q5_0: "Q5_0", GT.Q5_1: "Q5_1", GT.Q8_0: "Q8_0",
                   GT.Q4_K: "Q4_K", GT.Q5_K: "Q5_K", GT.Q6_K: "Q6_K"}


def type_name(qtype: int) -> str:
    """``"Q4_K"`` for 12; other ids by their gguf-py enum name where given one."""
    return GGML_TYPE_NAMES.get(int(qtype), getattr(qtype, "name", f"ggml type {int(qtype)}"))


# ggml type -> (elements per block, bytes per block): gguf-py's GGML_QUANT_SIZES.
GGUF_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    GT.Q4_0: (32, 18), GT.Q4_1: (32, 20), GT.Q5_0: (32, 22), GT.Q5_1: (32, 24), GT.Q8_0: (32, 34),
    GT.Q4_K: (256, 144), GT.Q5_K: (256, 176), GT.Q6_K: (256, 210),
}
#: The ggml types the ``gguf`` method runs quantized (the others are dequantized at load).
GGUF_KERNEL_TYPES: frozenset[int] = frozenset(GGUF_BLOCK_SIZES)


def gguf_row_bytes(qtype: int, k: int) -> int:
    """Bytes of one row of ``k`` elements in ggml type ``qtype``.

    Raises:
        ValueError: ``k`` is not a multiple of the type's block size.
    """
    elems, nbytes = GGUF_BLOCK_SIZES[qtype]
    if k % elems:
        raise ValueError(f"{type_name(qtype)} rows hold multiples of {elems} elements, got {k}")
    return k // elems * nbytes
