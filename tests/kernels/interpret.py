"""Where the Triton kernel tests run: on CUDA at full shapes, and without CUDA
on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py) at small shapes, so CPU CI runs every kernel.

The interpreter computes with numpy, which has float16 and float32 but neither
bfloat16 nor the FP8 formats: it stores those as unsigned integers, and (Triton
3.9) it

- multiplies the bit patterns in a bfloat16 ``tl.dot`` (triton-lang/triton
  issue 11584), and adds or multiplies them in bfloat16 arithmetic
  (``binary_op`` on the integer storage);
- narrows float32 to bfloat16 by truncation, and to FP8 with a rounding that
  loses the carry into the exponent (e5m2: 0.487 -> 0.25) and flushes
  subnormals, where the GPU rounds to nearest even.

:func:`faithful_interpreter` makes those few operations compute on the values,
as the GPU does (operands widened to float32 exactly, results rounded to
nearest even by torch's casts), so the kernels' bfloat16 and FP8 paths run
here as they do on CUDA. It changes nothing else in the interpreter and is a
no-op on CUDA. float16 and float32 need none of it.
"""

from __future__ import annotations

import numpy as np
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def by_device(gpu, cpu):
    """``gpu`` on CUDA, ``cpu`` in the interpreter (e.g. the shapes of a parametrization)."""
    return gpu if ON_GPU else cpu


def synchronize() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


_patched = False


def faithful_interpreter() -> None:
    """Patch Triton's interpreter (once per process) so that bfloat16 dots and
    arithmetic, and float narrowing to bfloat16 and FP8, compute what the GPU
    computes (see the module docstring). Raises if this Triton's interpreter
    lacks the functions it wraps, rather than testing a wrong emulation."""
    global _patched
    if _patched or ON_GPU:
        return
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except ImportError:  # no Triton: the kernel tests skip
        return

    builder = ti.InterpreterBuilder
    for name in ("binary_op", "unary_op", "create_dot"):
        if not callable(getattr(builder, name, None)):
            raise RuntimeError(f"Triton's interpreter has no InterpreterBuilder.{name}: "
                               "update tests/kernels/interpret.py")
    if not callable(getattr(ti, "_convert_float", None)):
        raise RuntimeError("Triton's interpreter has no _convert_float: update tests/kernels/interpret.py")

    torch_dtypes = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
                    tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    # Storage of each width as torch views it (torch.uint16 lacks some ops).
    int_of_width = {8: torch.uint8, 16: torch.int16, 32: torch.int32}
    convert_float = ti._convert_float
    rtz = ti._ir.ROUNDING_MODE.RTZ

    def _convert(data: np.ndarray, src, dst, rounding_mode):
        # Returns dst's storage (unsigned integers of its width), as the original does.
        if src not in torch_dtypes or dst not in torch_dtypes or rounding_mode == rtz:
            return convert_float(data, src, dst, rounding_mode)
        bits = src.primitive_bitwidth
        x = torch.from_numpy(np.ascontiguousarray(data).view(np.dtype(f"int{bits}") if bits > 8 else np.uint8))
        y = x.view(torch_dtypes[src]).to(torch_dtypes[dst])  # rounds to nearest even
        out_bits = dst.primitive_bitwidth
        return y.view(int_of_width[out_bits]).numpy().view(np.dtype(f"uint{out_bits}")).reshape(data.shape)

    def _to_f32(handle):
        return ti.TensorHandle(_convert(handle.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

    def _is_bf16(handle) -> bool:
        return handle.dtype.scalar == tl.bfloat16 and handle.data.dtype == np.uint16

    def _from_f32(handle, scalar_dtype):
        # A float result back to bfloat16 storage; anything else (comparisons) as is.
        if handle.data.dtype == np.float32:
            return ti.TensorHandle(_convert(handle.data, tl.float32, tl.bfloat16, None), tl.bfloat16)
        return ti.TensorHandle(handle.data, scalar_dtype)

    binary_op, unary_op, create_dot = builder.binary_op, builder.unary_op, builder.create_dot

    def binary_op_on_values(self, lhs, rhs, op):
        if _is_bf16(lhs) and _is_bf16(rhs) and op not in (np.bitwise_and, np.bitwise_or, np.bitwise_xor):
            return _from_f32(binary_op(self, _to_f32(lhs), _to_f32(rhs), op), lhs.dtype.scalar)
        return binary_op(self, lhs, rhs, op)

    def unary_op_on_values(self, arg, op):
        if _is_bf16(arg):
            return _from_f32(unary_op(self, _to_f32(arg), op), arg.dtype.scalar)
        return unary_op(self, arg, op)

    def dot_on_values(self, a, b, *args, **kwargs):
        return create_dot(self, _to_f32(a) if _is_bf16(a) else a, _to_f32(b) if _is_bf16(b) else b, *args, **kwargs)

    ti._convert_float = _convert
    builder.binary_op = binary_op_on_values
    builder.unary_op = unary_op_on_values
    builder.create_dot = dot_on_values
    _patched = True


faithful_interpreter()
