"""Decode-step fusions timed against what they replace, the way a decode
step meets them (captured in one CUDA graph, replayed; see skinny_gemm_probe.py):

- gate_up: the skinny GEMM followed by the SiLU-and-mul kernel, against one
  skinny GEMM with the activation in its epilogue
  (``skinny_silu_and_mul_linear``), over 32 distinct Llama-3.1-8B gate_up
  weights (one per layer, so none is still in the L2 cache);
- RMSNorm folded into the GEMM: the GEMM alone, the RMSNorm kernel (with the
  residual add) then the GEMM, and ``skinny_rms_norm_linear``, for the qkv
  projection and the gated gate_up projection (32 distinct weights each); and
  the down projection with the residual added by a torch add or in its epilogue;
- argmax: torch's ``argmax(dim=-1)`` against ``argmax_rows`` on float32 logits
  of the 128,256-token vocabulary, 8 distinct logit tensors per replay.

Usage (GPU): python benchmarks/decode_fusion_probe.py [--m 1 4] [--rows 1 4 256]
"""

from __future__ import annotations

import argparse

import torch

from ember.kernels.triton_gemm import (launch_skinny_gemm, skinny_linear, skinny_rms_norm_linear,
                                       skinny_silu_and_mul_linear)
from ember.kernels.triton_ops import argmax_rows, rms_norm, silu_and_mul
from skinny_gemm_probe import LAYERS, time_graph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 256])
    ap.add_argument("--norm-tiles", nargs="*", default=[],
                    help="also time the folded-norm kernel with these tiles, as BLOCK_NxBLOCK_Kxwarps "
                         "(BLOCK_N per half for gate_up), e.g. 32x128x4")
    args = ap.parse_args()
    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    n, k = 28672, 4096
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(LAYERS)]
    for m in args.m:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        assert torch.equal(skinny_silu_and_mul_linear(x, weights[0]), silu_and_mul(skinny_linear(x, weights[0])))
        unfused = time_graph([lambda w=w: silu_and_mul(skinny_linear(x, w)) for w in weights]) / LAYERS * 1e6
        fused = time_graph([lambda w=w: skinny_silu_and_mul_linear(x, w) for w in weights]) / LAYERS * 1e6
        print(f"gate_up M={m}: GEMM + silu_and_mul {unfused:.1f} us, fused {fused:.1f} us "
              f"({n * k * 2 / fused / 1e6:.2f} TB/s); bit-identical")
        norm_w = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        residual = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for name, rows, gated in (("gate_up", n, True), ("qkv", 6144, False)):
            ws = [w[:rows] for w in weights]
            gemm = skinny_silu_and_mul_linear if gated else skinny_linear
            alone = time_graph([lambda w=w: gemm(x, w) for w in ws]) / LAYERS * 1e6
            unfused = time_graph([lambda w=w: gemm(rms_norm(x, norm_w, 1e-5, residual)[0], w) for w in ws]) / LAYERS
            folded = time_graph([lambda w=w: skinny_rms_norm_linear(x, w, norm_w, 1e-5, gated=gated)
                                 for w in ws]) / LAYERS * 1e6
            same = (skinny_rms_norm_linear(x, ws[0], norm_w, 1e-5, gated=gated)
                    == gemm(rms_norm(x, norm_w, 1e-5), ws[0])).float().mean().item()
            print(f"{name} M={m}: GEMM alone {alone:.1f} us, RMSNorm + GEMM {unfused * 1e6:.1f} us, "
                  f"norm folded {folded:.1f} us ({rows * k * 2 / folded / 1e6:.2f} TB/s); "
                  f"{same:.1%} of the outputs equal the unfused pair's")
            # The norm weight multiplied into the projection's columns at load time.
            scaled = [w * norm_w for w in ws]
            ref = gemm(rms_norm(x, norm_w, 1e-5), ws[0]).float()
            got = skinny_rms_norm_linear(x, scaled[0], None, 1e-5, gated=gated).float()
            t = time_graph([lambda w=w: skinny_rms_norm_linear(x, w, None, 1e-5, gated=gated)
                            for w in scaled]) / LAYERS * 1e6
            print(f"{name} M={m}: norm folded, its weight in the projection's: {t:.1f} us "
                  f"(max |diff| to the unfused pair {(got - ref).abs().max().item():.3g}, "
                  f"max |ref| {ref.abs().max().item():.3g})")
            # The sums of squares given, as the down GEMM before returns them (128 partials per row).
            xs, sumsq = skinny_linear(torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16) * 0.1,
                                      weights[0].view(-1)[:k * 14336].view(k, 14336), residual=x, with_sumsq=True)
            ref_s = gemm(rms_norm(xs, norm_w, 1e-5), ws[0]).float()
            for label, g, wts in (("its weight in the projection's", None, scaled), ("norm weight in the loop", norm_w, ws)):
                got = skinny_rms_norm_linear(xs, wts[0], g, 1e-5, gated=gated, sumsq=sumsq).float()
                t = time_graph([lambda w=w: skinny_rms_norm_linear(xs, w, g, 1e-5, gated=gated, sumsq=sumsq)
                                for w in wts]) / LAYERS * 1e6
                print(f"{name} M={m}: norm folded, sums of squares given, {label}: {t:.1f} us "
                      f"(max |diff| to the unfused pair {(got - ref_s).abs().max().item():.3g}, "
                      f"max |ref| {ref_s.abs().max().item():.3g})")
            for tiles in args.norm_tiles:
                bn, bk, warps = (int(t) for t in tiles.split("x"))
                out = torch.empty(m, rows // 2 if gated else rows, device="cuda", dtype=torch.bfloat16)
                for label, g, wts in (("", norm_w, ws), (", weight pre-scaled", None, scaled)):
                    t = time_graph([lambda w=w: launch_skinny_gemm(x, w, None, out, bn, bk, 3 if gated else 4,
                                                                   warps, gated=gated, norm=(g, 1e-5))
                                    for w in wts])
                    print(f"  {name} folded{label}, tiles {tiles}: {t / LAYERS * 1e6:.1f} us")
            del scaled
        down = [w.view(-1)[:4096 * 14336].view(4096, 14336) for w in weights[:8]]
        h = torch.randn(m, 14336, device="cuda", dtype=torch.bfloat16)
        res = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
        plain = time_graph([lambda w=w: skinny_linear(h, w) + res for w in down]) / len(down) * 1e6
        fused = time_graph([lambda w=w: skinny_linear(h, w, residual=res) for w in down]) / len(down) * 1e6
        with_ss = time_graph([lambda w=w: skinny_linear(h, w, residual=res, with_sumsq=True)
                              for w in down]) / len(down) * 1e6
        print(f"down M={m}: GEMM + add {plain:.1f} us, residual added in the epilogue {fused:.1f} us, "
              f"and the sums of squares returned {with_ss:.1f} us")
    del weights
    for rows in args.rows:
        logits = [torch.randn(rows, 128256, device="cuda") for _ in range(8)]
        assert all(torch.equal(argmax_rows(t), t.argmax(dim=-1)) for t in logits)
        ref = time_graph([lambda t=t: t.argmax(dim=-1) for t in logits]) / 8 * 1e6
        ours = time_graph([lambda t=t: argmax_rows(t) for t in logits]) / 8 * 1e6
        print(f"argmax rows={rows}: torch {ref:.1f} us, argmax_rows {ours:.1f} us")


if __name__ == "__main__":
    main()
