"""Split-KV decode attention with transposed dots, against the plain ones (GPU).

``decode_attention(..., transposed=...)`` can compute ``S^T = K Q^T`` and/or
``O^T = V^T P^T`` instead of ``S = Q K^T`` and ``O = P V``. Over an FP8 cache
the plain kernel reaches only ~2.4 TB/s on an H200, bound by the FP8 V operand
of the PV dot (BENCHMARKS.md, session 5: ``fp8_v_layout_probe.py``). With the
transposed PV dot the widened V tile is the dot's first operand, and head_dim
(128), not the 16-row head group, is its M dimension.

For each cache dtype and variant it first checks the kernel against a float32
PyTorch reference on a small paged case (relative error, NaN, every output
written), then times one layer's decode attention at several batch x context
shapes (``triton.testing.do_bench``, median) and prints the KV bandwidth.

    python benchmarks/decode_transposed_probe.py [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math

import torch
import triton

from ember.kernels.triton_attention import decode_attention, num_decode_splits

VARIANTS = ("", "pv", "qk", "qk,pv")
CACHES = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}
BLOCK = 16


def paged_case(batch: int, ctx: int, num_kv_heads: int, group: int, head_dim: int, cache_dtype: torch.dtype,
               seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    per = math.ceil(ctx / BLOCK)
    kv = torch.randn(2, batch * per + 1, BLOCK, num_kv_heads, head_dim, device="cuda", generator=g).to(cache_dtype)
    table = torch.randperm(batch * per + 1, device="cuda", generator=g, dtype=torch.int32)[:batch * per]
    table = table.view(batch, per)
    q = torch.randn(batch, num_kv_heads * group, head_dim, device="cuda", generator=g).to(torch.bfloat16)
    return kv, table, q


def reference(q: torch.Tensor, kv: torch.Tensor, table: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """float32 attention of each request's query over its context."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    num_kv_heads, head_dim = kv.shape[3], kv.shape[4]
    group = q.shape[1] // num_kv_heads
    for r, n in enumerate(seq_lens):
        pos = torch.arange(n, device=q.device)
        slots = table[r, pos // BLOCK].long() * BLOCK + pos % BLOCK
        k = kv[0].reshape(-1, num_kv_heads, head_dim)[slots].float().repeat_interleave(group, 1)
        v = kv[1].reshape(-1, num_kv_heads, head_dim)[slots].float().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[r].float(), k) * head_dim ** -0.5
        out[r] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v)
    return out


def check(cache_dtype: torch.dtype, transposed: str, block_n: int) -> float:
    """Worst relative error over three small cases (GQA 4 and 8, head_dim 128 and 64)."""
    worst = 0.0
    for seed, (group, head_dim, lens) in enumerate(((4, 128, [1, 15, 16, 17, 700]), (8, 64, [33, 2049]))):
        kv, table, q = paged_case(len(lens), max(lens), 2, group, head_dim, cache_dtype, seed)
        seq_lens = torch.tensor(lens, dtype=torch.int32, device="cuda")
        ref = reference(q, kv, table, lens)
        for splits in (4,):
            out = torch.full_like(q, float("nan"))
            decode_attention(q, kv, out, table, seq_lens, head_dim ** -0.5, splits, block_n=block_n,
                             transposed=transposed)
            if out.isnan().any():
                return float("nan")
            worst = max(worst, ((out.float() - ref).norm() / ref.norm()).item())
    return worst


def bench(cache_dtype: torch.dtype, batch: int, ctx: int, configs: list[tuple[str, int, int, int]],
          num_kv_heads: int = 8, group: int = 4, head_dim: int = 128) -> list[dict]:
    kv, table, q = paged_case(batch, ctx, num_kv_heads, group, head_dim, cache_dtype, 0)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    splits = num_decode_splits(batch, num_kv_heads, torch.cuda.get_device_properties(0).multi_processor_count)
    kv_bytes = 2 * batch * ctx * num_kv_heads * head_dim * kv.element_size()
    rows = []
    for transposed, block_n, warps, stages in configs:
        fn = lambda: decode_attention(q, kv, out, table, seq_lens, 0.088, splits, block_n=block_n,  # noqa: E731
                                      num_warps=warps, num_stages=stages, transposed=transposed)
        try:
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: report and go on
            print(f"  {transposed or 'plain':<6} BLOCK_N={block_n} warps={warps} stages={stages}: {str(e)[:60]}")
            continue
        rows.append({"cache": str(cache_dtype)[6:], "batch": batch, "ctx": ctx, "splits": splits,
                     "transposed": transposed or "plain", "block_n": block_n, "warps": warps, "stages": stages,
                     "us": ms * 1e3, "tb_s": kv_bytes / ms / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="256x1536,32x2048,4x1100,1x8192")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    results: dict = {"device": torch.cuda.get_device_name(), "checks": [], "timings": []}
    for (name, dtype), transposed in itertools.product(CACHES.items(), VARIANTS):
        for block_n in (64, 128) if dtype.itemsize == 1 else (64,):
            err = check(dtype, transposed, block_n)
            results["checks"].append({"cache": name, "transposed": transposed or "plain", "block_n": block_n,
                                      "rel_err": err})
            print(f"check {name:<9} {transposed or 'plain':<6} BLOCK_N={block_n:<4} rel err {err:.2e}")
            assert err < 1e-2, f"{name} {transposed!r}: relative error {err}"
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    for name, dtype in CACHES.items():
        main_configs = list(itertools.product(VARIANTS, (64, 128), (4, 8), (3, 4)))
        rows = bench(dtype, *shapes[0], main_configs)
        rows.sort(key=lambda r: -r["tb_s"])
        best = {v: next(r for r in rows if r["transposed"] == (v or "plain")) for v in VARIANTS}
        for batch, ctx in shapes[1:]:
            rows += bench(dtype, batch, ctx, [(v, r["block_n"], r["warps"], r["stages"]) for v, r in best.items()])
        results["timings"] += rows
    print(f"\n{'cache':<14} {'shape':>9} {'variant':<7} {'BLOCK_N':>7} {'warps':>5} {'stages':>6} {'us':>8} {'TB/s':>6}")
    for name in CACHES:
        for batch, ctx in shapes:
            rows = [r for r in results["timings"] if r["batch"] == batch and r["ctx"] == ctx
                    and r["cache"] == str(CACHES[name])[6:]]
            for v in VARIANTS:
                vr = sorted((r for r in rows if r["transposed"] == (v or "plain")), key=lambda r: -r["tb_s"])
                if vr:
                    r = vr[0]
                    print(f"{r['cache']:<14} {batch:>4}x{ctx:<4} {r['transposed']:<7} {r['block_n']:>7} "
                          f"{r['warps']:>5} {r['stages']:>6} {r['us']:>8.1f} {r['tb_s']:>6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
