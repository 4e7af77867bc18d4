"""W4A16 GEMM: ``y = x @ W (+ b)`` with ``W`` stored as 4-bit integers with
per-group scales (and zero points), as AWQ, GPTQ and compressed-tensors
checkpoints store it; activations stay in the model dtype.

Weight layout (built once at load by :mod:`ember.layers.quantization.w4a16`):

- ``qweight`` int32 [K_pad / 8, N], K_pad a multiple of 128. The K axis is cut
  in tiles of 128; packed row ``16 * t + i`` holds, in nibble ``j`` (bits
  ``4j .. 4j + 3``), the unsigned value ``q`` of row ``k = 128 * t + 16 * j + i``.
  So one [16, BLOCK_N] load of a tile yields, nibble by nibble, eight
  [16, BLOCK_N] weight chunks of 16 consecutive rows each.
- ``scales`` [K_pad / KG, N] (float16, bfloat16 or float32) and ``zeros``
  uint8 [K_pad / KG, N] (None: the symmetric zero point 8), one row per group
  of ``KG`` (32, 64 or 128) consecutive rows: ``W[k, n] = (q - z) * s``.
- ``perm`` int32 [K_pad] or None: the row of ``x`` that row k multiplies (act
  order), -1 for padding; without it rows k >= K are padding.

Decode kernel (:func:`w4a16_gemm` with at most :data:`SPLIT_MAX_M` rows): the
weight is read once, unpacked and dequantized in registers, products summed in
float32. The unpack avoids integer-to-float conversions (a quarter-rate
instruction) with the exponent trick of Marlin (Frantar et al., 2024, "MARLIN:
Mixed-Precision Auto-Regressive Parallel Inference on Large Language Models"):
a nibble OR-ed into the mantissa of 1.0 is the float ``1 + q / 16`` exactly, so
a chunk's product is ``x . (1 + q / 16)`` and a group's contribution

    sum_k x[k] (q[k] - z) s = s * (16 * (sum_k x[k] (1 + q[k] / 16) - S) - z * S),
    S = sum_k x[k],

costs one shift and one mask per weight, the scale and zero applied once per
group and column. One row (batch-1 decode) multiplies on the CUDA cores, two
nibbles per shift (the lower one as ``16 + q / 16``, the exponent of 16.0; a
shift and two mask-and-ORs, one ``LOP3`` each, per two weights), with x read
as vectors along the tile's rows and the next tile's words loaded before the
current one's arithmetic; more rows
use the tensor cores (bfloat16 or float16 chunks, rows padded to 16). The K
axis is split over ``split_k`` programs per column block when the column blocks
alone would leave the SMs idle; the last program of a block to finish (an
atomic counter) sums the partial products in split order (deterministic) and
writes the output, then re-arms the counter, so no second kernel runs and the
launch is CUDA-graph capturable.

Larger batches: up to :data:`DEQUANT_MIN_M` rows the same tensor-core kernel
with 64-row tiles; beyond, :func:`w4a16_dequantize` writes the weight in the
activation dtype and ``torch.mm`` multiplies (the GEMM is compute-bound there).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ember.kernels.triton_gemm import INTERPRETED, _num_sms

#: Rows of K per tile of the packed layout (16 packed rows of 8 nibbles).
TILE_K = 128
TILE_K_C = tl.constexpr(TILE_K)  # the same, as the kernels read it (Triton globals must be constexpr)
#: Row counts up to which the split-K decode kernel runs.
SPLIT_MAX_M = 16
#: Row counts from which the weight is dequantized and multiplied by torch.mm.
DEQUANT_MIN_M = 512
#: Row counts that multiply on the CUDA cores (one row: batch-1 decode).
FMA_MAX_M = 1
#: Most K splits of one column block.
MAX_SPLIT_K = 16
#: Register cap of the one-row kernel up to 128 columns per program (None:
#: ptxas's choice, about 170 at 128 columns): 128 lets four programs of four
#: warps share an SM with no spills.
ONE_ROW_MAXNREG: int | None = 128


@triton.jit
def _shift(P, AMOUNT: tl.constexpr):
    # P shifted left by AMOUNT bits (right by -AMOUNT when negative).
    if AMOUNT >= 0:
        return P << AMOUNT
    else:
        return P >> (-AMOUNT)


@triton.jit
def _load_x(X, offs_m, mask_m, stride_xm, offs_k, PERM, K, HAS_PERM: tl.constexpr):
    # x[offs_m, k] for the rows k of the tile (gathered through PERM with act order).
    if HAS_PERM:
        idx = tl.load(PERM + offs_k)
        return tl.load(X + offs_m[:, None] * stride_xm + idx[None, :], mask=mask_m[:, None] & (idx >= 0)[None, :],
                       other=0.0)
    else:
        return tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & (offs_k < K)[None, :],
                       other=0.0)


@triton.jit
def _load_x_row(X, row_offset, offs_k, PERM, K, HAS_PERM: tl.constexpr, MASK_K: tl.constexpr):
    # x[row, k] as float32 for the rows k of the tile, one row (a [16] vector);
    # MASK_K: K is not a multiple of the tile (rows k >= K read as 0).
    if HAS_PERM:
        idx = tl.load(PERM + offs_k)
        return tl.load(X + row_offset + idx, mask=idx >= 0, other=0.0).to(tl.float32)
    elif MASK_K:
        return tl.load(X + row_offset + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    else:
        return tl.load(X + row_offset + offs_k).to(tl.float32)


@triton.jit
def _unpack_pair_f32(P, AMOUNT: tl.constexpr, ASM: tl.constexpr):
    # The nibbles at bits 15 - AMOUNT .. 22 - AMOUNT of P as float32
    # 16 + q / 16 (placed at bits 15..18 of 16.0) and 1 + q / 16 (bits 19..22
    # of 1.0), exactly: one shift and two (t & mask) | magic (one LOP3 each
    # in PTX; ptxas splits the Triton form into an AND and an OR).
    T = _shift(P, AMOUNT)
    if ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $2, 0x78000, 0x41800000, 0xEA;\n lop3.b32 $1, $2, 0x780000, 0x3F800000, 0xEA;",
            "=r,=r,r", [T], dtype=(tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return (((T & 0x78000) | 0x41800000).to(tl.float32, bitcast=True),
                ((T & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True))


@triton.jit
def _group_scale(S, Z, row, offs_n, mask_n, N, HAS_ZERO: tl.constexpr):
    s = tl.load(S + row * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(Z + row * N + offs_n, mask=mask_n, other=0).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z


@triton.jit(do_not_specialize=["M", "tiles_per_split"])
def _w4a16_kernel(X, QW, S, Z, PERM, B, Y, WS, CNT, M, N, K, num_tiles, tiles_per_split, stride_xm, stride_ym,
                  HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, KG: tl.constexpr,
                  USE_DOT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_K: tl.constexpr, ASM: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_i = tl.arange(0, 16)
    GROUPS_PER_TILE: tl.constexpr = TILE_K_C // KG
    t_begin = pid_k * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, num_tiles)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if USE_DOT:
        for t in range(t_begin, t_end):
            kb = t * TILE_K_C
            P = tl.load(QW + (t * 16 + offs_i)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            # Tensor cores: chunk j as (1 + q / 16) in x's dtype, exactly.
            if X.dtype.element_ty == tl.bfloat16:
                SH0: tl.constexpr = 3  # nibble -> mantissa bits 3..6 of bfloat16 1.0 (0x3F80)
                MASK: tl.constexpr = 0x78
                MAGIC: tl.constexpr = 0x3F80
            else:
                SH0: tl.constexpr = 6  # nibble -> mantissa bits 6..9 of float16 1.0 (0x3C00)
                MASK: tl.constexpr = 0x3C0
                MAGIC: tl.constexpr = 0x3C00
            g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            sx = tl.zeros([BLOCK_M], tl.float32)
            for j in tl.static_range(8):
                T = _shift(P, SH0 - 4 * j)
                w = ((T & MASK) | MAGIC).to(tl.int16).to(X.dtype.element_ty, bitcast=True)
                xj = _load_x(X, offs_m, mask_m, stride_xm, kb + 16 * j + offs_i, PERM, K, HAS_PERM)
                g = tl.dot(xj, w, g)
                sx += tl.sum(xj.to(tl.float32), 1)
                if (16 * j + 16) % KG == 0:
                    s, z = _group_scale(S, Z, t * GROUPS_PER_TILE + (16 * j + 16) // KG - 1, offs_n, mask_n, N,
                                        HAS_ZERO)
                    acc += s[None, :] * (16.0 * (g - sx[:, None]) - z[None, :] * sx[:, None])
                    g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                    sx = tl.zeros([BLOCK_M], tl.float32)
    else:
        # CUDA cores, one row: nibbles 2p + 1 and 2p in one shift, as
        # 1 + q / 16 (bits 19..22 of float32 1.0) and 16 + q / 16 (bits
        # 15..18 of 16.0), so that x_hi w_hi + x_lo w_lo - (x_hi + 16 x_lo)
        # is (x_hi q_hi + x_lo q_lo) / 16. x comes as [16] vectors along the
        # tile's rows (no layout conversion: no shared memory or barrier per
        # chunk); the group terms stay per row until one reduction after the
        # loop. The next tile's words are loaded before this tile's
        # arithmetic, so their latency overlaps it (the tile bound is a [16]
        # vector in the masks: Triton's interpreter takes no scalar there).
        acc2 = tl.zeros([16, BLOCK_N], tl.float32)
        x_row = pid_m * stride_xm
        P_next = tl.load(QW + (t_begin * 16 + offs_i)[:, None] * N + offs_n[None, :],
                         mask=mask_n[None, :] & (t_begin + 0 * offs_i < t_end)[:, None], other=0)
        for t in range(t_begin, t_end):
            kb = t * TILE_K_C
            P = P_next
            P_next = tl.load(QW + ((t + 1) * 16 + offs_i)[:, None] * N + offs_n[None, :],
                             mask=mask_n[None, :] & (t + 1 + 0 * offs_i < t_end)[:, None], other=0)
            g2 = tl.zeros([16, BLOCK_N], tl.float32)
            x_lo_sum = tl.zeros([16], tl.float32)
            x_hi_sum = tl.zeros([16], tl.float32)
            for p in tl.static_range(4):
                w_lo, w_hi = _unpack_pair_f32(P, 15 - 8 * p, ASM)
                x_lo = _load_x_row(X, x_row, kb + 32 * p + offs_i, PERM, K, HAS_PERM, MASK_K)
                x_hi = _load_x_row(X, x_row, kb + 32 * p + 16 + offs_i, PERM, K, HAS_PERM, MASK_K)
                # Two accumulations (two FMAs per pair of weights, not mul + fma + add).
                g2 += x_lo[:, None] * w_lo
                g2 += x_hi[:, None] * w_hi
                x_lo_sum += x_lo
                x_hi_sum += x_hi
                if (32 * p + 32) % KG == 0:
                    s, z = _group_scale(S, Z, t * GROUPS_PER_TILE + (32 * p + 32) // KG - 1, offs_n, mask_n, N,
                                        HAS_ZERO)
                    # Per row: the 1s and 16s of the weights, x_hi + 16 x_lo, and
                    # the zero point's z * sum(x), both in units of q / 16.
                    ones = 16.0 * (16.0 * x_lo_sum + x_hi_sum)
                    x_sum = x_lo_sum + x_hi_sum
                    acc2 += s[None, :] * (16.0 * g2 - (ones[:, None] + z[None, :] * x_sum[:, None]))
                    g2 = tl.zeros([16, BLOCK_N], tl.float32)
                    x_lo_sum = tl.zeros([16], tl.float32)
                    x_hi_sum = tl.zeros([16], tl.float32)
        acc += tl.sum(acc2, 0)[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_mask)
    else:
        # Partial sums to WS [SPLIT_K, BLOCK_M, N]; the block's last program sums them.
        ws_ptrs = WS + (pid_k * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * N + offs_n[None, :]
        tl.store(ws_ptrs, acc, mask=y_mask)
        tl.debug_barrier()  # every thread's partial is written before the release below
        arrived = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for k in tl.static_range(SPLIT_K):
                part_ptrs = WS + (k * BLOCK_M + tl.arange(0, BLOCK_M))[:, None] * N + offs_n[None, :]
                total += tl.load(part_ptrs, mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(CNT + pid_n, 0)


@triton.jit
def _w4a16_dequant_kernel(QW, S, Z, W, N, HAS_ZERO: tl.constexpr, KG: tl.constexpr, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_i = tl.arange(0, 16)
    P = tl.load(QW + (t * 16 + offs_i)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
    for j in tl.static_range(8):
        q = ((P >> (4 * j)) & 0xF).to(tl.float32)
        s, z = _group_scale(S, Z, t * (TILE_K_C // KG) + (16 * j) // KG, offs_n, mask_n, N, HAS_ZERO)
        w = (q - z[None, :]) * s[None, :]
        rows = t * TILE_K_C + 16 * j + offs_i
        tl.store(W + rows[:, None] * N + offs_n[None, :], w.to(W.dtype.element_ty), mask=mask_n[None, :])


class W4A16Workspace:
    """The split-K scratch of W4A16 layers: partial sums (float32
    [MAX_SPLIT_K * SPLIT_MAX_M, N]) and one arrival counter per column block
    (int32, zero between launches). Layers run one at a time on a stream, so
    they share it. Allocated as the layers load (:meth:`reserve`), before any
    launch; buffers outgrown later stay alive, so CUDA graphs captured on them
    keep valid addresses."""

    def __init__(self) -> None:
        self._n = 0
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._retired: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reserve(self, n: int, device: torch.device | str) -> None:
        """Make room on ``device`` for outputs of up to ``n`` columns."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if n > self._n:
            self._n = n
            self._retired.extend(self._buffers.values())
            self._buffers.clear()
        if device not in self._buffers:
            self._buffers[device] = (
                torch.empty(MAX_SPLIT_K * SPLIT_MAX_M * self._n, dtype=torch.float32, device=device),
                torch.zeros(triton.cdiv(self._n, 16), dtype=torch.int32, device=device))

    def get(self, device: torch.device, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(partials, counters)`` on ``device`` for ``n`` columns.

        Raises:
            ValueError: nothing reserved on ``device`` for ``n`` columns.
        """
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if n > self._n or device not in self._buffers:
            raise ValueError(f"W4A16 workspace reserved for {self._n} columns on {list(self._buffers)}, "
                             f"not {n} on {device}")
        return self._buffers[device]


@functools.cache
def shared_workspace() -> W4A16Workspace:
    """The process's W4A16 workspace, which every W4A16 layer uses (like
    cuBLAS's workspace: scratch memory, no state between launches)."""
    return W4A16Workspace()


#: Row-count buckets of :data:`W4A16_DECODE_CONFIGS` (the rows rounded up).
DECODE_M_BUCKETS = (1, 4, 8, 16)
#: (N, K_pad, M bucket of DECODE_M_BUCKETS) -> ``(BLOCK_N, split_k, num_warps)``
#: of the decode kernel, overriding :func:`decode_config`'s rule for the shapes
#: listed; filled from ``benchmarks/gpu/fp8_gemv_sweep.py --parts w4a16``
#: (it prints these lines).
W4A16_DECODE_CONFIGS: dict[tuple[int, int, int], tuple[int, int, int]] = {
    # Llama-3.1-8B shapes (group 128), measured on an H100 (one row: gate_up takes the rule's (64, 2, 4)).
    (6144, 4096, 1): (32, 4, 4),
    (6144, 4096, 4): (128, 8, 4),
    (6144, 4096, 8): (128, 8, 4),
    (6144, 4096, 16): (128, 8, 4),
    (4096, 4096, 1): (64, 8, 4),
    (4096, 4096, 4): (128, 8, 4),
    (4096, 4096, 8): (128, 8, 4),
    (4096, 4096, 16): (128, 8, 4),
    (28672, 4096, 4): (256, 2, 8),
    (28672, 4096, 8): (256, 2, 8),
    (28672, 4096, 16): (256, 2, 8),
    (4096, 14336, 1): (64, 8, 4),
    (4096, 14336, 4): (128, 8, 4),
    (4096, 14336, 8): (128, 8, 4),
    (4096, 14336, 16): (128, 8, 4),
}


def decode_config(m: int, n: int, num_tiles: int, num_sms: int) -> tuple[int, int, int]:
    """``(BLOCK_N, split_k, num_warps)`` of the decode kernel for ``m`` rows
    (at most :data:`SPLIT_MAX_M`), ``n`` columns and ``num_tiles`` tiles of
    128 rows of K: the entry of :data:`W4A16_DECODE_CONFIGS` where there is
    one, else 64-column blocks (32 when fewer than two per SM), and the
    K axis split until there are about four programs per SM, each keeping
    at least two tiles."""
    bucket = next((b for b in DECODE_M_BUCKETS if m <= b), None)
    listed = W4A16_DECODE_CONFIGS.get((n, num_tiles * TILE_K, bucket)) if bucket is not None else None
    if listed is not None:
        return listed
    block_n = 64 if triton.cdiv(n, 64) >= 2 * num_sms else 32
    blocks = triton.cdiv(n, block_n)
    split = max(1, min(MAX_SPLIT_K, triton.cdiv(4 * num_sms, blocks), num_tiles // 2))
    return block_n, split, 4


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               perm: torch.Tensor | None, group: int, k: int, bias: torch.Tensor | None = None,
               workspace: W4A16Workspace | None = None, block_n: int | None = None, split_k: int | None = None,
               num_warps: int | None = None) -> torch.Tensor:
    """``x @ W + bias`` with W in the packed layout of the module docstring.

    Args:
        x: [M, K] float16 / bfloat16 (float32: dequantized, then ``torch.mm``).
        qweight: int32 [K_pad / 8, N]; scales: [K_pad / group, N]; zeros:
            uint8 like scales, or None (zero point 8); perm: int32 [K_pad] or None.
        group: KG, 32, 64 or 128.
        k: K, the columns of ``x``.
        bias: [N] or None.
        workspace: the split-K scratch (required for split launches of at
            most :data:`SPLIT_MAX_M` rows; without it no split).
        block_n, split_k, num_warps: override :func:`decode_config` (benchmarks).

    Returns:
        [M, N] in ``x``'s dtype.
    """
    m = x.shape[0]
    n = qweight.shape[1]
    k_pad = qweight.shape[0] * 8
    if m == 0:
        return x.new_empty(0, n)
    if x.dtype == torch.float32 or m >= DEQUANT_MIN_M:
        w = w4a16_dequantize(qweight, scales, zeros, group, x.dtype)
        if perm is not None:
            xg = torch.nn.functional.pad(x, (0, 1))[:, torch.where(perm >= 0, perm, k).long()]
            y = xg @ w
        else:
            y = x @ w[:k]
        return y if bias is None else y + bias
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    num_tiles = k_pad // TILE_K
    dummy = qweight  # stands for absent pointers
    if m <= SPLIT_MAX_M:
        use_dot = m > FMA_MAX_M
        bn, split, warps = decode_config(m, n, num_tiles, _num_sms(x.device))
        bn, split, warps = block_n or bn, split_k or split, num_warps or warps
        if workspace is None:
            split = 1
        ws, cnt = workspace.get(x.device, n) if split > 1 else (dummy, dummy)
        block_m = 16 if use_dot else 1
        grid_m = 1 if use_dot else m
    else:
        use_dot, split, block_m, bn, warps = True, 1, 64, block_n or 64, num_warps or 4
        grid_m = triton.cdiv(m, block_m)
        ws, cnt = dummy, dummy
    tiles_per_split = triton.cdiv(num_tiles, split)
    split = triton.cdiv(num_tiles, tiles_per_split)
    grid = (triton.cdiv(n, bn), grid_m, split)
    launch_options = {}
    if not use_dot and bn <= 128 and ONE_ROW_MAXNREG is not None and not INTERPRETED:
        launch_options["maxnreg"] = ONE_ROW_MAXNREG
    _w4a16_kernel[grid](x, qweight, scales, zeros if zeros is not None else dummy,
                        perm if perm is not None else dummy, bias if bias is not None else dummy, y, ws, cnt,
                        m, n, k, num_tiles, tiles_per_split, x.stride(0), y.stride(0),
                        HAS_ZERO=zeros is not None, HAS_PERM=perm is not None, HAS_BIAS=bias is not None, KG=group,
                        USE_DOT=use_dot, SPLIT_K=split, BLOCK_M=block_m, BLOCK_N=bn, MASK_K=k != k_pad,
                        ASM=x.is_cuda and not INTERPRETED, num_warps=warps,
                        num_stages=1 if INTERPRETED else 4, **launch_options)
    return y


def w4a16_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The weight of the packed layout, ``(q - z) * s`` rounded once to
    ``dtype``: [K_pad, N] (rows in the layout's order; padding rows 0)."""
    k_pad, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(k_pad, n, dtype=dtype, device=qweight.device)
    block_n = 64
    _w4a16_dequant_kernel[(k_pad // TILE_K, triton.cdiv(n, block_n))](
        qweight, scales, zeros if zeros is not None else qweight, w, n, HAS_ZERO=zeros is not None, KG=group,
        BLOCK_N=block_n)
    return w
