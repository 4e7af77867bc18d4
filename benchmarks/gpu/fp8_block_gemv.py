"""Block-scaled FP8 decode GEMV (DeepSeek-V3's 128 x 128 ``weight_scale_inv``)
at DeepSeek-V3's dense shapes: the configurable GEMV
(:func:`ember.kernels.triton_fp8_gemv.fp8_gemv`, each K tile's product scaled
by its group's scales) with :func:`~ember.kernels.triton_fp8_gemv.block_scaled_config`'s
rule and a few alternatives, against the older block kernel
(:func:`ember.kernels.triton_fp8.fp8_skinny_linear` with explicit tiles) and
the bf16 skinny GEMM of the dequantized weight.

Shapes (N x K): fused q_a + kv_a 2112 x 7168, q_b 24576 x 1536, o 7168 x 16384,
the dense MLP's gate_up 36864 x 7168 (SwiGLU epilogue) and down 7168 x 18432,
the shared expert's gate_up 4096 x 7168 and down 7168 x 2048. µs per call from
CUDA-graph replays over enough weight copies to exceed L2; FP8 GB/s; relative
error against float32 (max |error| / max |reference|).

    python3 benchmarks/gpu/fp8_block_gemv.py [--m 1 4 16] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_gemv_sweep import L2_BYTES, rel_err, time_us  # noqa: E402

from ember.kernels.triton_fp8 import fp8_skinny_linear, fp8_skinny_tiles  # noqa: E402
from ember.kernels.triton_fp8_gemv import Fp8GemvConfig, block_scaled_config, fp8_gemv  # noqa: E402
from ember.kernels.triton_gemm import _num_sms, skinny_linear, skinny_silu_and_mul_linear  # noqa: E402

SHAPES = {"qkv_a": (2112, 7168, False), "q_b": (24576, 1536, False), "o": (7168, 16384, False),
          "gate_up": (36864, 7168, True), "down": (7168, 18432, False), "shared_gate_up": (4096, 7168, True),
          "shared_down": (7168, 2048, False)}
C = Fp8GemvConfig
ALTERNATIVES = [C(32, 128, 4, chains=2), C(64, 128, 4, chains=2), C(32, 128, 4), C(64, 128, 3),
                C(32, 128, 4, chains=2, split_k=2), C(32, 128, 4, chains=2, split_k=4),
                C(64, 128, 4, chains=2, split_k=4), C(64, 128, 4, mma="wx", chains=2), C(128, 128, 3, num_warps=8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", nargs="+", type=int, default=[1, 4, 16])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = _num_sms(dev)
    torch.manual_seed(0)
    result: dict = {"device": torch.cuda.get_device_name(), "rows": []}
    totals: dict[str, dict[int, float]] = {"old": {}, "rule": {}, "best": {}, "bf16": {}}
    for name, (n, k, gated) in SHAPES.items():
        nb, kb = -(-n // 128), k // 128  # 2112 rows: the last block row is partial
        w = torch.randn(nb * 128, k, device=dev) * k ** -0.5
        s = w.view(nb, 128, kb, 128).abs().amax((1, 3)) / 448
        q = (w.view(nb, 128, kb, 128) / s[:, None, :, None]).view(nb * 128, k)[:n].to(torch.float8_e4m3fn)
        deq = q.float() * s.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
        del w
        copies = max(1, math.ceil(L2_BYTES / (n * k)))
        qs = [q] + [q.view(torch.uint8)[torch.randperm(n, device=dev)].view(torch.float8_e4m3fn)
                    for _ in range(copies - 1)]
        wb = [deq.to(torch.bfloat16)] + [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
                                         for _ in range(max(0, math.ceil(L2_BYTES / (2 * n * k)) - 1))]
        rule = block_scaled_config(n, k, 128, sms, gated)
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            y = x.float() @ deq.T
            if gated:
                g, u = y[:, : n // 2].to(torch.bfloat16).float(), y[:, n // 2:].to(torch.bfloat16)
                ref = (g / (1 + torch.exp(-g))).to(torch.bfloat16) * u
            else:
                ref = y.to(torch.bfloat16)
            row = {"shape": name, "n": n, "k": k, "m": m, "rule": rule.name, "configs": {}}
            old_tiles = fp8_skinny_tiles(n, sms, 128)
            runs = {"old": lambda i: fp8_skinny_linear(x, qs[i], s, 128, 128, tiles=old_tiles, gated=gated),
                    "rule": lambda i: fp8_skinny_linear(x, qs[i], s, 128, 128, gated=gated)}
            for cfg in ALTERNATIVES:
                runs[cfg.name] = lambda i, cfg=cfg: fp8_gemv(x, qs[i], s, cfg, gated=gated, group_n=128, group_k=128)
            for label, fn in runs.items():
                try:
                    err = rel_err(fn(0), ref)
                    us = time_us(fn, copies)
                except Exception as e:  # noqa: BLE001 (a configuration that does not fit is reported)
                    row["configs"][label] = {"error": f"{type(e).__name__}: {str(e)[:100]}"}
                    continue
                row["configs"][label] = {"us": us, "gb_s": n * k / us / 1e3, "err": err, "ok": err < 1e-2}
            bf = (lambda i: skinny_silu_and_mul_linear(x, wb[i])) if gated else (lambda i: skinny_linear(x, wb[i]))
            row["bf16_us"] = time_us(bf, len(wb))
            ok = {lab: c["us"] for lab, c in row["configs"].items() if c.get("ok")}
            best = min(ok, key=ok.get) if ok else None
            row["best"] = best
            cur = row["configs"]
            print(f"{name:<15} M={m:<2} old {cur['old'].get('us', float('nan')):7.1f}  rule "
                  f"{cur['rule'].get('us', float('nan')):7.1f} ({rule.name}, err {cur['rule'].get('err', -1):.1e})  "
                  f"best {ok.get(best, float('nan')):7.1f} ({best})  bf16 {row['bf16_us']:7.1f} us", flush=True)
            for key, val in (("old", cur["old"].get("us")), ("rule", cur["rule"].get("us")),
                             ("best", ok.get(best)), ("bf16", row["bf16_us"])):
                if val is not None:
                    totals[key][m] = totals[key].get(m, 0.0) + val
            result["rows"].append(row)
        qs = wb = deq = None  # noqa: F841
        torch.cuda.empty_cache()
    print("\n# sum over the shapes (one dense layer + one shared expert), µs: old / rule / best / bf16")
    for m in args.m:
        print(f"  M={m:<2} " + " / ".join(f"{totals[key].get(m, float('nan')):7.1f}" for key in totals))
    result["totals_us"] = totals
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
