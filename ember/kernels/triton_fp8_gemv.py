"""Weight-streaming W8A16 GEMV for decode with per-channel FP8 weights, in
configurations that a GPU sweep picks from (``benchmarks/gpu/fp8_gemv_sweep.py``).

``y = x @ (qw * sw[:, None]).T (+ bias)`` for x [M <= 16, K] in 16-bit and qw
[N, K] ``float8_e4m3fn``, optionally with SwiGLU's ``silu(gate) * up`` (a merged
gate_up weight) and a residual add in the epilogue, rounded as
:func:`ember.kernels.triton_fp8.fp8_skinny_linear` and
:func:`ember.kernels.triton_gemm.skinny_linear` round them.

At these row counts the kernel is a stream over the weight, and on Hopper the
FP8 weight's bytes arrive faster than a plain ``.to(bfloat16)`` widens them:
the compiler widens e4m3 -> bf16 as e4m3x2 -> f16x2 (``F2FP``) and then each
f16 -> bf16 (``F2F``), three instructions of the conversion unit per two
weights (SASS of the skinny kernel, sm_90a), and that unit issues a quarter as
many instructions per clock as the integer and FMA pipes (16 vs 64 per SM
on compute capability 9.0: CUDA C++ Programming Guide, "Arithmetic
Instructions"). A
:class:`Fp8GemvConfig` picks, besides the tiles:

- ``convert``: ``"cast"`` (the compiler's conversion); ``"bits"`` (integer
  operations: the sign-extended byte shifted so that e4m3's exponent and
  mantissa land in the low bits of the 16-bit type's, masked, reinterpreted,
  and multiplied by ``2 ** (bias - 7)``, exact for every finite e4m3 value
  including subnormals, because the 16-bit types' subnormals cover e4m3's;
  the two NaN codes, which quantized weights do not hold, come out as
  +-480); ``"asm"``
  (the same in PTX for four weights at a time: two ``prmt`` sign extensions,
  shifts and masks on packed pairs, and one packed ``fma`` per pair; CUDA only).
- ``mma``: ``"xw"`` (``dot(x, w.T)``, the x rows padded to 16), ``"wx"``
  (``dot(w, x.T)``: the widened weight is the left operand, which the compiler
  may keep in registers; on sm_90 a wgmma with the weight in registers),
  ``"fma"`` (no tensor cores: products accumulated in a float32
  [M, BLOCK_N, BLOCK_K] tile on the CUDA cores and summed over K once after
  the loop; for a few rows and small tiles).
- ``split_k``: programs per column tile along K, so that narrow outputs
  (N = 4096 makes 128 tiles of 32 columns, one wave of 132 SMs) fill the GPU
  with several; each writes float32 partial sums, and the last program of a
  tile to finish (an atomic counter, reset by that program, so the kernel is
  CUDA-graph safe) adds them and runs the epilogue. One launch.
- ``evict_first``: the weight loads' L2 eviction hint.

Which configuration runs for a shape is :data:`FP8_GEMV_CONFIGS`, keyed by
``(N, K, M bucket)``; a shape that is not in the table runs
:func:`~ember.kernels.triton_fp8.fp8_skinny_linear`'s kernel. Weights with
block scales (DeepSeek-V3's 128 x 128 ``weight_scale_inv``) run the
configuration of :func:`block_scaled_config`, each K tile's product scaled by
its group's scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ember.kernels.pdl import gdc_wait, launch_options, pdl_release, pdl_supported
from ember.kernels.triton_gemm import INTERPRETED, SKINNY_MAX_M

_CONVERT = {"cast": 0, "bits": 1, "asm": 2}
_MMA = {"xw": 0, "wx": 1, "fma": 2}
# Row-count buckets of the configuration table (the rows of x rounded up).
M_BUCKETS = (1, 4, 8, 16)


@dataclass(frozen=True)
class Fp8GemvConfig:
    """One configuration of :func:`fp8_gemv`.

    ``block_n``: weight rows per program (a gated launch streams
    ``block_n // 2`` gate rows and as many up rows); ``block_k``: K tile
    (FP8 bytes per row and step); ``num_stages``/``num_warps``: Triton's;
    ``split_k``: programs per column tile along K; ``chains``: 2 to
    alternate two accumulators over consecutive K tiles; ``convert``, ``mma``,
    ``evict_first``: see the module docstring."""
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int = 4
    split_k: int = 1
    convert: str = "asm"
    mma: str = "xw"
    evict_first: bool = False
    chains: int = 1

    def __post_init__(self) -> None:
        if self.convert not in _CONVERT or self.mma not in _MMA:
            raise ValueError(f"FP8 GEMV config: unknown convert {self.convert!r} or mma {self.mma!r}")
        if self.mma == "fma" and self.convert == "asm":
            raise ValueError("FP8 GEMV config: the CUDA-core products widen to float32 with convert 'bits' or 'cast'")
        if self.split_k < 1 or self.block_n < 16 or self.block_k < 16 or self.chains not in (1, 2):
            raise ValueError(f"FP8 GEMV config: bad tiles {self}")

    @property
    def name(self) -> str:
        """A compact label, e.g. ``asm-xw-32x512s4w4-k2``."""
        label = f"{self.convert}-{self.mma}-{self.block_n}x{self.block_k}s{self.num_stages}w{self.num_warps}"
        return (label + (f"-k{self.split_k}" if self.split_k > 1 else "") + ("-ef" if self.evict_first else "")
                + ("-c2" if self.chains == 2 else ""))


# (N of the whole weight, K, M bucket of M_BUCKETS) -> the configuration that
# runs there; a gated gate_up weight is keyed by its 2D rows. Shapes that are
# not listed run fp8_skinny_linear's kernel. Filled from the figures of
# benchmarks/gpu/fp8_gemv_sweep.py (it prints these lines).
FP8_GEMV_CONFIGS: dict[tuple[int, int, int], Fp8GemvConfig] = {
    # Llama-3.1-8B shapes, measured on an H100 (benchmarks/gpu/fp8_gemv_sweep.py).
    (6144, 4096, 1): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (6144, 4096, 4): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (6144, 4096, 8): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (6144, 4096, 16): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (4096, 4096, 1): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (4096, 4096, 4): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (4096, 4096, 8): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (4096, 4096, 16): Fp8GemvConfig(block_n=32, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (28672, 4096, 1): Fp8GemvConfig(block_n=64, block_k=256, num_stages=3, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (28672, 4096, 4): Fp8GemvConfig(block_n=64, block_k=256, num_stages=3, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (28672, 4096, 8): Fp8GemvConfig(block_n=64, block_k=256, num_stages=3, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (28672, 4096, 16): Fp8GemvConfig(block_n=64, block_k=256, num_stages=3, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=2),
    (4096, 14336, 1): Fp8GemvConfig(block_n=64, block_k=256, num_stages=4, num_warps=4, split_k=4, convert='asm', mma='xw', evict_first=False, chains=1),
    (4096, 14336, 4): Fp8GemvConfig(block_n=32, block_k=512, num_stages=3, num_warps=4, split_k=2, convert='asm', mma='xw', evict_first=False, chains=1),
    (4096, 14336, 8): Fp8GemvConfig(block_n=32, block_k=512, num_stages=3, num_warps=4, split_k=2, convert='asm', mma='xw', evict_first=False, chains=1),
    (4096, 14336, 16): Fp8GemvConfig(block_n=32, block_k=512, num_stages=3, num_warps=4, split_k=2, convert='asm', mma='xw', evict_first=False, chains=1),
    (128256, 4096, 1): Fp8GemvConfig(block_n=64, block_k=256, num_stages=4, num_warps=4, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (128256, 4096, 4): Fp8GemvConfig(block_n=128, block_k=256, num_stages=3, num_warps=8, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (128256, 4096, 8): Fp8GemvConfig(block_n=128, block_k=256, num_stages=3, num_warps=8, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
    (128256, 4096, 16): Fp8GemvConfig(block_n=128, block_k=256, num_stages=3, num_warps=8, split_k=1, convert='asm', mma='xw', evict_first=False, chains=1),
}


def m_bucket(m: int) -> int:
    """The smallest of :data:`M_BUCKETS` that holds ``m`` rows."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    raise ValueError(f"FP8 GEMV: {m} rows exceed {SKINNY_MAX_M}")


def lookup_config(n: int, k: int, m: int) -> Fp8GemvConfig | None:
    """The table's configuration for a weight of ``n`` x ``k`` and ``m`` rows, or None."""
    return FP8_GEMV_CONFIGS.get((n, k, m_bucket(m))) if 0 < m <= SKINNY_MAX_M else None


def block_scaled_config(n: int, k: int, group_k: int, num_sms: int, gated: bool = False) -> Fp8GemvConfig | None:
    """The configuration for a weight of ``n`` x ``k`` (the whole merged
    weight when ``gated``) with 128-column (``group_k``) block scales, or None
    where the K tile cannot divide the group: programs of 32 output columns
    (a gated one streams 32 gate and 32 up rows) widening in PTX with two K
    tiles of 128 per step (each scaled by its group's scales), and enough K
    splits to give the SMs two programs each where the column tiles alone
    would not. Picked from ``benchmarks/gpu/fp8_block_gemv.py`` at
    DeepSeek-V3's shapes on an H100: within 8% of the best candidate at
    every shape but q_b (1536 -> 24576: 16%)."""
    if group_k % 128:
        return None
    tiles = -(-(n // 2 if gated else n) // 32)
    steps = -(-k // 256)
    split_k = max(1, min(8, (2 * num_sms) // tiles, steps))
    return Fp8GemvConfig(block_n=64 if gated else 32, block_k=128, num_stages=4, num_warps=4, split_k=split_k,
                         chains=2)


@triton.jit
def _widen_asm(w, OUT: tl.constexpr):
    # Four e4m3 bytes in a 32-bit register -> two packed pairs of OUT.
    # prmt with the sign-replicate bit sign-extends bytes 0, 1 (then 2, 3)
    # into 16-bit halves; the shift puts e4m3's exponent and mantissa in the
    # low bits of the 16-bit exponent and mantissa fields, the mask keeps
    # them and one sign bit; the packed fma (+ -0.0) multiplies by
    # 2 ** (bias - 7): 2 ** 120 (bf16 0x7B80) or 2 ** 8 (fp16 0x5C00).
    if OUT == tl.bfloat16:
        y = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, s, z, c;\n"
            "mov.b32 z, 0;\n mov.b32 s, 0x7B807B80;\n mov.b32 c, 0x80008000;\n"
            "prmt.b32 t0, $2, z, 0x9180;\n prmt.b32 t1, $2, z, 0xB3A2;\n"
            "shl.b32 t0, t0, 4;\n shl.b32 t1, t1, 4;\n"
            "and.b32 t0, t0, 0x87F087F0;\n and.b32 t1, t1, 0x87F087F0;\n"
            "fma.rn.bf16x2 $0, t0, s, c;\n fma.rn.bf16x2 $1, t1, s, c;\n}",
            "=r,=r,r", [w], dtype=tl.bfloat16, is_pure=True, pack=4)
    else:
        y = tl.inline_asm_elementwise(
            "{ .reg .b32 t0, t1, s, z, c;\n"
            "mov.b32 z, 0;\n mov.b32 s, 0x5C005C00;\n mov.b32 c, 0x80008000;\n"
            "prmt.b32 t0, $2, z, 0x9180;\n prmt.b32 t1, $2, z, 0xB3A2;\n"
            "shl.b32 t0, t0, 7;\n shl.b32 t1, t1, 7;\n"
            "and.b32 t0, t0, 0xBF80BF80;\n and.b32 t1, t1, 0xBF80BF80;\n"
            "fma.rn.f16x2 $0, t0, s, c;\n fma.rn.f16x2 $1, t1, s, c;\n}",
            "=r,=r,r", [w], dtype=tl.float16, is_pure=True, pack=4)
    return y


@triton.jit
def _widen(w, CONVERT: tl.constexpr, OUT: tl.constexpr):
    # w: FP8 bit patterns (uint8; float8e4nv for CONVERT 0) -> OUT values, exactly.
    if CONVERT == 0:
        y = w.to(OUT)
    elif CONVERT == 2:
        y = _widen_asm(w, OUT)
    else:
        s = w.to(tl.int8, bitcast=True).to(tl.int32)  # sign-extended: the sign in every high bit
        if OUT == tl.float32:
            y = ((s << 20) & -2014314496).to(tl.float32, bitcast=True) * 1.329227995784916e36  # 0x87F00000, 2**120
        elif OUT == tl.bfloat16:
            y = ((s << 4) & 0x87F0).to(tl.int16).to(tl.bfloat16, bitcast=True) * 1.329227995784916e36
        else:
            y = ((s << 7) & 0xBF80).to(tl.int16).to(tl.float16, bitcast=True) * 256.0
    return y


@triton.jit
def _w_tile(W, rows, offs_k, mask_n, K, stride_wn, EVEN_K: tl.constexpr, EVICT_FIRST: tl.constexpr):
    ptrs = W + rows.to(tl.int64)[:, None] * stride_wn + offs_k[None, :]
    if EVEN_K:
        mask = mask_n[:, None]
    else:
        mask = mask_n[:, None] & (offs_k < K)[None, :]
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _accumulate(acc, x, w, MMA: tl.constexpr):
    # acc [BLOCK_M, BLOCK_N] (MMA 1: [BLOCK_N, BLOCK_M]) += x @ w.T; MMA 2:
    # acc [BLOCK_M, BLOCK_N, BLOCK_K] += the products, summed over K after the
    # loop (no cross-thread reduction per step).
    if MMA == 0:
        return tl.dot(x, tl.trans(w), acc)
    elif MMA == 1:
        return tl.dot(w, tl.trans(x), acc)
    else:
        return acc + x[:, None, :] * w[None, :, :]


@triton.jit
def _tile_product(acc, x, w, WS, rows, mask_n, k, stride_wsn, stride_wsk, group_n, group_k, MMA: tl.constexpr,
                  SCALE_PER_K: tl.constexpr):
    # acc += x @ w.T for one K tile; with block scales (SCALE_PER_K) the
    # tile's product is scaled by its rows' scales of this K group (the tile
    # lies inside one group) before it is added.
    if SCALE_PER_K:
        ws = tl.load(WS + (rows // group_n).to(tl.int64) * stride_wsn + (k // group_k) * stride_wsk, mask=mask_n,
                     other=0.0)
        if MMA == 1:
            out = acc + tl.dot(w, tl.trans(x)) * ws[:, None]
        else:
            out = acc + tl.dot(x, tl.trans(w)) * ws[None, :]
    else:
        out = _accumulate(acc, x, w, MMA)
    return out


@triton.jit
def _k_step(acc, acc_up, X, W, WS, offs_m, offs_n, mask_m, mask_n, k, N, K, stride_xm, stride_wn, stride_wsn,
            stride_wsk, group_n, group_k, GATED: tl.constexpr, EVEN_K: tl.constexpr, CONVERT: tl.constexpr,
            MMA: tl.constexpr, EVICT_FIRST: tl.constexpr, SCALE_PER_K: tl.constexpr, BLOCK_K: tl.constexpr):
    # One K tile: x [BLOCK_M, BLOCK_K] and the weight rows of offs_n (and the up rows).
    offs_k = k + tl.arange(0, BLOCK_K)
    if EVEN_K:
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
    else:
        x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)
    if MMA == 2:  # CUDA cores: float32 operands
        x = x.to(tl.float32)
    acc = _tile_product(acc, x, _widen(_w_tile(W, offs_n, offs_k, mask_n, K, stride_wn, EVEN_K, EVICT_FIRST),
                                       CONVERT, x.dtype), WS, offs_n, mask_n, k, stride_wsn, stride_wsk, group_n,
                        group_k, MMA, SCALE_PER_K)
    if GATED:
        acc_up = _tile_product(acc_up, x, _widen(_w_tile(W, N + offs_n, offs_k, mask_n, K, stride_wn, EVEN_K,
                                                         EVICT_FIRST), CONVERT, x.dtype), WS, N + offs_n, mask_n,
                               k, stride_wsn, stride_wsk, group_n, group_k, MMA, SCALE_PER_K)
    return acc, acc_up


@triton.jit
def _epilogue(acc, acc_up, X, WS, B, R, Y, offs_m, offs_n, mask_m, mask_n, N, stride_wsn, stride_ym, stride_rm,
              HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ADD_RESIDUAL: tl.constexpr, SCALE_PER_K: tl.constexpr):
    # Scales (per channel; block scales were applied per K tile), bias,
    # SwiGLU, residual; rounded as the unfused kernels round.
    if not SCALE_PER_K:
        acc = acc * tl.load(WS + offs_n.to(tl.int64) * stride_wsn, mask=mask_n, other=0.0)[None, :]
        if GATED:
            acc_up = acc_up * tl.load(WS + (N + offs_n).to(tl.int64) * stride_wsn, mask=mask_n, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(B + N + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if GATED:
        gate = acc.to(X.dtype.element_ty).to(tl.float32)
        y = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty) * acc_up.to(X.dtype.element_ty)
    else:
        y = acc.to(X.dtype.element_ty)
    if ADD_RESIDUAL:
        r = tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_y, other=0.0)
        y = (y.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y, mask=mask_y)


@triton.jit(do_not_specialize=["M"])
def _fp8_gemv_kernel(X, W, WS, B, R, Y, P, CNT, M, N, K, K_SPLIT, stride_xm, stride_wn, stride_wsn, stride_ym,
                     stride_rm, stride_wsk, group_n, group_k,
                     SCALE_PER_K: tl.constexpr, HAS_BIAS: tl.constexpr, GATED: tl.constexpr,
                     ADD_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, CHAINS: tl.constexpr, CONVERT: tl.constexpr, MMA: tl.constexpr,
                     EVICT_FIRST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    # Program (pid_n, pid_k): output columns pid_n * BLOCK_N ..., K range
    # pid_k * K_SPLIT ... (K_SPLIT a multiple of BLOCK_K). GATED: W is [2N, K],
    # gate rows then up rows; the program streams both for its columns.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    if USE_PDL:
        gdc_wait()  # launched early (ember.kernels.pdl): the previous kernel wrote x
    if MMA == 1:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    elif MMA == 2:
        acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = pid_k * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    # CHAINS == 2: two K tiles per step into two accumulators, so consecutive
    # MMAs do not wait on each other's results (K_SPLIT is a multiple of 2 tiles).
    acc2 = tl.zeros_like(acc)
    acc_up2 = tl.zeros_like(acc_up)
    for k in range(k_start, k_end, BLOCK_K * CHAINS):
        acc, acc_up = _k_step(acc, acc_up, X, W, WS, offs_m, offs_n, mask_m, mask_n, k, N, K, stride_xm, stride_wn,
                              stride_wsn, stride_wsk, group_n, group_k, GATED, EVEN_K, CONVERT, MMA, EVICT_FIRST,
                              SCALE_PER_K, BLOCK_K)
        if CHAINS == 2:
            acc2, acc_up2 = _k_step(acc2, acc_up2, X, W, WS, offs_m, offs_n, mask_m, mask_n, k + BLOCK_K, N, K,
                                    stride_xm, stride_wn, stride_wsn, stride_wsk, group_n, group_k, GATED, EVEN_K,
                                    CONVERT, MMA, EVICT_FIRST, SCALE_PER_K, BLOCK_K)
    if CHAINS == 2:
        acc += acc2
        acc_up += acc_up2
    # The weight is read: a dependent GEMV may launch and stage meanwhile.
    pdl_release(USE_PDL)
    if MMA == 1:
        acc = tl.trans(acc)
        acc_up = tl.trans(acc_up)
    elif MMA == 2:
        acc = tl.sum(acc, 2)
        acc_up = tl.sum(acc_up, 2)
    if SPLIT_K == 1:
        _epilogue(acc, acc_up, X, WS, B, R, Y, offs_m, offs_n, mask_m, mask_n, N, stride_wsn, stride_ym, stride_rm,
                  HAS_BIAS, GATED, ADD_RESIDUAL, SCALE_PER_K)
    else:
        # Partial sums P [SPLIT_K, M, NP] float32 (NP = 2N gated: gate, then up).
        NP = 2 * N if GATED else N
        mask_p = mask_m[:, None] & mask_n[None, :]
        p_ptrs = P + offs_m[:, None] * NP + offs_n[None, :]
        tl.store(p_ptrs + pid_k * M * NP, acc, mask=mask_p)
        if GATED:
            tl.store(p_ptrs + pid_k * M * NP + N, acc_up, mask=mask_p)
        # Every thread's partials are written before the counter's release.
        tl.debug_barrier()
        done = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            # The last program of this column tile: sum the partials (past L1,
            # which other SMs' writes do not update), reset the counter for the
            # next launch, and finish.
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(0, SPLIT_K):
                acc += tl.load(p_ptrs + s * M * NP, mask=mask_p, other=0.0, cache_modifier=".cg")
                if GATED:
                    acc_up += tl.load(p_ptrs + s * M * NP + N, mask=mask_p, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(CNT + pid_n, 0)
            _epilogue(acc, acc_up, X, WS, B, R, Y, offs_m, offs_n, mask_m, mask_n, N, stride_wsn, stride_ym,
                      stride_rm, HAS_BIAS, GATED, ADD_RESIDUAL, SCALE_PER_K)


# Per device: int32 counters of the split-K launches, zero between launches
# (each launch's last programs reset theirs). Outgrown buffers stay alive, so
# CUDA graphs captured on them keep valid addresses.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _split_k_counters(device: torch.device, tiles: int) -> torch.Tensor:
    buf = _COUNTERS.get(device)
    if buf is not None and buf.numel() >= tiles:
        return buf
    fresh = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
    _RETIRED.append(fresh)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The zeroing is recorded, not run: right for this graph's replays only.
        return fresh
    _COUNTERS[device] = fresh
    return fresh


def fp8_gemv(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, config: Fp8GemvConfig,
             bias: torch.Tensor | None = None, gated: bool = False, residual: torch.Tensor | None = None,
             use_pdl: bool = False, group_n: int = 1, group_k: int | None = None) -> torch.Tensor:
    """``x @ (qw * sw[:, None]).T + bias`` for decode row counts with one
    :class:`Fp8GemvConfig`, reading the FP8 weight once (W8A16); with block
    scales ``x @ (qw * sw expanded over its blocks).T + bias``.

    Args:
        x: [M, K] bfloat16 / float16, 1 <= M <= 16, unit stride along K.
        qw: [N, K] ``float8_e4m3fn``, unit stride along K.
        sw: [N] or [N, 1] float32 per-channel scales, or
            [ceil(N / group_n), ceil(K / group_k)] float32 block scales
            (DeepSeek-V3's ``weight_scale_inv``; ``group_n`` 1 for one row
            of scales per weight row).
        config: tiles and variant (see the module docstring); with block
            scales its ``block_k`` must divide ``group_k`` and its products
            run on the tensor cores (each K tile's product is scaled by its
            group's scales before it is added).
        bias: optional [N].
        gated: ``qw`` is a merged gate_up weight [2D, K]: return
            ``silu(g) * u`` [M, D], rounded as the GEMV followed by
            :func:`ember.kernels.triton_ops.silu_and_mul`.
        residual: optional [M, N_out] in x's dtype, unit stride along N: added
            to the result rounded to x's dtype, then rounded again.
        use_pdl: launch with PDL where the device supports it (:mod:`ember.kernels.pdl`).
        group_n, group_k: the block scales' block (rows, columns).
    Returns:
        [M, N] ([M, N / 2] gated) in x's dtype (float32 accumulation).
    Raises:
        ValueError: shapes, dtypes or strides outside the above, an odd gated
            weight, block scales whose shape or groups do not fit the weight
            and the tile, or ``convert="asm"`` on a CPU tensor.
    """
    if (x.dim() != 2 or not 0 < x.shape[0] <= SKINNY_MAX_M or x.dtype not in (torch.bfloat16, torch.float16)
            or x.stride(1) != 1 or qw.dim() != 2 or qw.shape[1] != x.shape[1] or qw.stride(1) != 1
            or qw.dtype != torch.float8_e4m3fn or sw.dtype != torch.float32):
        raise ValueError(f"FP8 GEMV: unsupported x {tuple(x.shape)} {x.dtype} / weight {tuple(qw.shape)} "
                         f"{qw.dtype} / scales {tuple(sw.shape)} {sw.dtype}")
    per_k = sw.dim() == 2 and sw.shape[1] > 1
    if per_k:
        if (group_k is None or tuple(sw.shape) != (triton.cdiv(qw.shape[0], group_n), triton.cdiv(qw.shape[1], group_k))
                or group_k % config.block_k or config.mma == "fma"):
            raise ValueError(f"FP8 GEMV: block scales {tuple(sw.shape)} with groups ({group_n}, {group_k}) do not "
                             f"fit weight {tuple(qw.shape)} and K tile {config.block_k} ({config.mma})")
    elif sw.numel() != qw.shape[0]:
        raise ValueError(f"FP8 GEMV: per-channel scales {tuple(sw.shape)} for weight {tuple(qw.shape)}")
    if config.convert == "asm" and (x.device.type != "cuda" or INTERPRETED):
        raise ValueError("FP8 GEMV: convert='asm' runs on CUDA only")
    m, k = x.shape
    n = qw.shape[0]
    if gated and n % 2:
        raise ValueError(f"FP8 GEMV gated: weight {tuple(qw.shape)} has an odd number of rows")
    block_n = config.block_n
    if gated:  # same weight bytes per program as the ungated tiles of the whole [2D, K] weight
        n, block_n = n // 2, max(16, block_n // 2)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if residual is not None and (residual.shape != out.shape or residual.dtype != x.dtype
                                 or residual.stride(1) != 1):
        raise ValueError(f"FP8 GEMV: residual {tuple(residual.shape)} {residual.dtype} does not match the "
                         f"output {tuple(out.shape)} {x.dtype}")
    tiles_n = triton.cdiv(n, block_n)
    step = config.block_k * config.chains  # K per loop step; each split takes whole steps
    split_k = min(config.split_k, triton.cdiv(k, step))
    k_split = triton.cdiv(triton.cdiv(k, split_k), step) * step
    split_k = triton.cdiv(k, k_split)
    if split_k > 1:
        partials = torch.empty(split_k, m, n * (2 if gated else 1), dtype=torch.float32, device=x.device)
        counters = _split_k_counters(x.device, tiles_n)
    else:
        partials = counters = out
    block_m = SKINNY_MAX_M if config.mma != "fma" else triton.next_power_of_2(m)
    pdl = use_pdl and pdl_supported(x.device)
    w = qw if config.convert == "cast" else qw.view(torch.uint8)
    _fp8_gemv_kernel[(tiles_n, split_k)](
        x, w, sw, bias if bias is not None else out, residual if residual is not None else out, out, partials,
        counters, m, n, k, k_split, x.stride(0), qw.stride(0), sw.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, sw.stride(1) if per_k else 0, group_n, group_k or k,
        SCALE_PER_K=per_k, HAS_BIAS=bias is not None, GATED=gated, ADD_RESIDUAL=residual is not None,
        EVEN_K=k % step == 0, SPLIT_K=split_k, CHAINS=config.chains, CONVERT=_CONVERT[config.convert],
        MMA=_MMA[config.mma],
        EVICT_FIRST=config.evict_first, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config.block_k, USE_PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))
    return out
