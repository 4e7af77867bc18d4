"""Sweep of the FP8 W8A16 decode GEMV's configurations
(:mod:`ember.kernels.triton_fp8_gemv`) at Llama-3.1-8B's shapes, against the
kernel that runs today (:func:`ember.kernels.triton_fp8.fp8_skinny_linear`
with an empty configuration table) and the bf16 skinny GEMM
(:mod:`ember.kernels.triton_gemm`) on the same shapes.

For each shape (qkv 6144 x 4096, o 4096 x 4096, gate_up 28672 x 4096 with the
SwiGLU epilogue as decode runs it, down 4096 x 14336, and lm_head 128256 x
4096 for a quantized LM head)
and M in 1, 4, 8, 16: µs per call from CUDA-graph replays over enough weight
copies to exceed L2 (no launch gaps, weights read from HBM), the weight GB/s
(FP8 bytes + scales; bf16 bytes for the bf16 GEMM), and each output's
relative error against a float32 reference (max |error| / max |reference|;
a configuration above 1e-2 is marked wrong and never picked). Each
configuration's e4m3 widening is also checked bit for bit on all 254 finite
byte values. PDL is off everywhere (decode turns it on for all of them).

Prints one line per (shape, M) with the current kernel, the bf16 GEMM, and
the best configuration; every configuration's GB/s at every (shape, M); the
linear layers' time per 8B decode step (32 x qkv + o + gate_up + down) today,
with the printed table adopted, and in bf16; then the lines of
``ember.kernels.triton_fp8_gemv.FP8_GEMV_CONFIGS`` for the shapes where the best
beats the current kernel by more than 3%, and writes every figure to
``--json``. About 2-3 minutes on one H100 (most of it compiling).

``--parts w4a16`` (alone or with ``fp8``) does the same for the W4A16 decode
kernel (:func:`ember.kernels.triton_w4a16.w4a16_gemm`, AWQ-style group-128
weights with zero points, qkv/o/gate_up/down): its (BLOCK_N, split_k,
num_warps) against :func:`~ember.kernels.triton_w4a16.decode_config`'s rule
and the bf16 skinny GEMM, int4 GB/s of the packed weight, scales and zeros,
and the lines of ``W4A16_DECODE_CONFIGS``. About 1 more minute.

    python3 benchmarks/gpu/fp8_gemv_sweep.py [--json results/fp8_gemv_sweep.json]
        [--parts fp8 w4a16] [--shapes qkv o gate_up down lm_head] [--m 1 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import triton

from ember.kernels import triton_fp8_gemv
from ember.kernels.triton_fp8 import fp8_skinny_linear
from ember.kernels.triton_fp8_gemv import Fp8GemvConfig, fp8_gemv
from ember.kernels.triton_gemm import skinny_linear, skinny_silu_and_mul_linear

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
C = Fp8GemvConfig
CANDIDATES = [
    # Today's tiles (32 x 512 x 4 stages below 133 column tiles, else 64 x 512 x 3),
    # widened by integer ops ("bits") or PTX ("asm") instead of the conversion unit.
    C(32, 512, 4, convert="bits"), C(32, 512, 4), C(64, 512, 3, convert="bits"), C(64, 512, 3),
    # Other tiles: shared memory per program (FP8 weight + 16 rows of x, per stage)
    # decides how many programs share an SM.
    C(64, 256, 4, convert="bits"), C(64, 256, 4), C(32, 256, 4), C(32, 1024, 3), C(64, 512, 3, num_warps=8),
    C(128, 256, 3, num_warps=8), C(32, 512, 4, num_warps=8), C(64, 256, 4, num_warps=8),
    C(32, 512, 4, evict_first=True),
    # Two accumulators over alternate K tiles: two independent MMA chains per warp.
    C(32, 256, 4, chains=2), C(64, 256, 3, chains=2), C(32, 256, 4, convert="bits", chains=2),
    # The widened weight as the left MMA operand.
    C(64, 256, 4, convert="bits", mma="wx"), C(64, 256, 4, mma="wx"),
    C(128, 256, 3, num_warps=8, mma="wx"),
    # Split-K for the outputs that make few column tiles (o, down, qkv).
    C(32, 512, 3, split_k=2), C(32, 256, 4, split_k=4), C(32, 256, 4, split_k=2, chains=2),
    C(32, 256, 4, split_k=8), C(64, 256, 4, split_k=4),
    C(64, 256, 4, mma="wx", split_k=4),
    # CUDA-core products for a few rows (M <= 4; M x BLOCK_N x BLOCK_K <= 8192
    # float32 accumulators per program, see _applies).
    C(16, 256, 4, convert="bits", mma="fma"), C(32, 256, 4, convert="bits", mma="fma"),
    C(16, 512, 3, convert="bits", mma="fma", split_k=4), C(16, 128, 4, convert="bits", mma="fma", split_k=4),
]
SMS_WAVES_FOR_SPLIT = 2  # split-K only where the column tiles make fewer than this many waves
DEVICE = "cuda"
L2_BYTES = 256 << 20     # weight bytes per timed graph (copies of the weight), well over the H100's 50 MB L2


def _applies(cfg: Fp8GemvConfig, n_out: int, block_n: int, m: int, sms: int) -> bool:
    if cfg.split_k > 1 and math.ceil(n_out / block_n) >= SMS_WAVES_FOR_SPLIT * sms:
        return False
    if cfg.mma == "fma" and (m > 4 or block_n * cfg.block_k * triton_next_pow2(m) > 8192):
        return False
    return True


def triton_next_pow2(v: int) -> int:
    return 1 << (v - 1).bit_length()


def time_us(fn, copies: int) -> float:
    """µs per call of ``fn(i)``, ``i`` over the copies, captured in one CUDA graph."""
    for i in range(copies):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(7):
        start.record()
        for _ in range(4):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (4 * copies))
    return sorted(samples)[len(samples) // 2]


def bf16_copies(wref: torch.Tensor, n: int, k: int) -> list[torch.Tensor]:
    """The bf16 baseline's weights: ``wref`` ([n, k] float32) in bf16, then random [n, k] copies, enough
    that the copies together pass L2_BYTES."""
    copies = max(1, math.ceil(L2_BYTES / (2 * n * k)))
    return [wref.to(torch.bfloat16)] + [torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
                                        for _ in range(copies - 1)]


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max())


def widening_exact(cfg: Fp8GemvConfig) -> bool:
    """y = onehot @ W.T picks single weights: every finite e4m3 byte must come
    back as its value. Column j of the weight holds all the codes, rolled by j;
    x's row j picks column j (one row for the CUDA-core products, which the
    sweep runs at M <= 4). K = 4096 and 256 rows: the kernels compiled here
    are the ones the sweep times."""
    codes = torch.arange(256, dtype=torch.int32, device=DEVICE)
    codes = torch.where((codes & 0x7F) == 0x7F, 0, codes).to(torch.uint8)  # the two NaNs -> 0
    k, n = 4096, codes.numel()
    rows = 1 if cfg.mma == "fma" else 16
    q = torch.zeros(n, k, dtype=torch.uint8, device=DEVICE)
    q[:, :16] = torch.stack([codes.roll(-j) for j in range(16)]).T
    q = q.view(torch.float8_e4m3fn)
    x = torch.zeros(rows, k, dtype=torch.bfloat16, device=DEVICE)
    x[torch.arange(rows), torch.arange(rows)] = 1
    y = fp8_gemv(x, q, torch.ones(n, device=DEVICE), cfg)
    return bool((y.float() == q[:, :rows].float().T).all())


def run_fp8(args, result: dict, t0: float) -> None:
    """The FP8 part: the widening check, then every (shape, M)."""
    triton_fp8_gemv.FP8_GEMV_CONFIGS.clear()  # "current" = today's kernel
    sms = result["sms"]
    result["fp8"] = fp8 = {"rows": [], "exact_widening": {}}
    for cfg in CANDIDATES:
        try:
            fp8["exact_widening"][cfg.name] = widening_exact(cfg)
        except Exception as e:  # noqa: BLE001 (a configuration that does not compile is reported)
            fp8["exact_widening"][cfg.name] = f"{type(e).__name__}: {str(e)[:120]}"
    bad = {name: v for name, v in fp8["exact_widening"].items() if v is not True}
    print(f"# FP8: widening exact on all finite e4m3 values: {len(CANDIDATES) - len(bad)}/{len(CANDIDATES)} "
          f"configs{'; not: ' + str(bad) if bad else ''} ({time.time() - t0:.0f} s)", flush=True)
    torch.manual_seed(0)
    table = {}
    header = f"{'shape':<8} {'M':>2} {'cur us':>7} {'cur GB/s':>8} {'bf16 us':>7} {'bf16GB/s':>8} " \
             f"{'best us':>7} {'GB/s':>6} {'x cur':>5} {'x bf16':>6}  best config"
    print(header, flush=True)
    for shape in args.shapes:
        n, k = SHAPES[shape]
        gated = shape == "gate_up"
        n_out = n // 2 if gated else n
        fp8_bytes = n * k + 4 * n
        copies = max(1, math.ceil(L2_BYTES / fp8_bytes))
        w32 = torch.randn(n, k, device=DEVICE) * k ** -0.5
        s = (w32.abs().amax(1) / 448).float()
        q0 = (w32 / s[:, None]).to(torch.float8_e4m3fn)
        q8 = q0.view(torch.uint8)  # rows permuted as bytes (no float8 indexing kernels needed)
        qs = [q0] + [q8[torch.randperm(n, device=DEVICE)].view(torch.float8_e4m3fn) for _ in range(copies - 1)]
        wref = q0.float() * s[:, None]
        del w32
        wb = bf16_copies(wref, n, k)
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            y = x.float() @ wref.T
            if gated:
                g, u = y[:, :n_out].to(torch.bfloat16).float(), y[:, n_out:].to(torch.bfloat16)
                ref = (g / (1 + torch.exp(-g))).to(torch.bfloat16) * u
            else:
                ref = y.to(torch.bfloat16)
            row = {"shape": shape, "n": n, "k": k, "m": m, "gated": gated, "copies": copies, "configs": {}}
            cur = lambda i: fp8_skinny_linear(x, qs[i], s, gated=gated)  # noqa: E731
            row["current_err"] = rel_err(cur(0), ref)
            row["current_us"] = time_us(cur, copies)
            bf = (lambda i: skinny_silu_and_mul_linear(x, wb[i])) if gated else (lambda i: skinny_linear(x, wb[i]))
            row["bf16_us"] = time_us(bf, len(wb))
            best = None
            for cfg in CANDIDATES:
                block_n = max(16, cfg.block_n // 2) if gated else cfg.block_n
                if not _applies(cfg, n_out, block_n, m, sms):
                    continue
                try:
                    fn = lambda i, cfg=cfg: fp8_gemv(x, qs[i], s, cfg, gated=gated)  # noqa: E731
                    err = rel_err(fn(0), ref)
                    us = time_us(fn, copies)
                except Exception as e:  # noqa: BLE001 (out of shared memory etc.: reported, skipped)
                    row["configs"][cfg.name] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                    continue
                ok = err < 1e-2 and fp8["exact_widening"].get(cfg.name) is True
                row["configs"][cfg.name] = {"us": us, "gb_s": fp8_bytes / us / 1e3, "err": err, "ok": ok}
                if ok and (best is None or us < row["configs"][best.name]["us"]):
                    best = cfg
            row["current_gb_s"] = fp8_bytes / row["current_us"] / 1e3
            row["bf16_gb_s"] = 2 * n * k / row["bf16_us"] / 1e3
            if best is not None:
                b = row["configs"][best.name]
                row["best"] = best.name
                print(f"{shape:<8} {m:>2} {row['current_us']:7.1f} {row['current_gb_s']:8.0f} {row['bf16_us']:7.1f} "
                      f"{row['bf16_gb_s']:8.0f} {b['us']:7.1f} {b['gb_s']:6.0f} "
                      f"{row['current_us'] / b['us']:5.2f} {row['bf16_us'] / b['us']:6.2f}  {best.name}", flush=True)
                if b["us"] < row["current_us"] / 1.03:
                    table[(n, k, m)] = best
            else:
                print(f"{shape:<8} {m:>2} {row['current_us']:7.1f} {row['current_gb_s']:8.0f} {row['bf16_us']:7.1f} "
                      f"{row['bf16_gb_s']:8.0f}  (no configuration ran correctly)", flush=True)
            fp8["rows"].append(row)
        qs = wb = wref = None  # noqa: F841 (freed before the next shape)
        torch.cuda.empty_cache()
        print(f"# {shape} done ({time.time() - t0:.0f} s)", flush=True)
    # Per-config summary: the config's GB/s at every (shape, M), to see the trends.
    print("\n# GB/s per configuration (rows: shape/M; '-': not run, 'X': wrong or failed)")
    names = [c.name for c in CANDIDATES]
    print(f"{'config':<34} " + " ".join(f"{r['shape'][:4]}/{r['m']:<2}" for r in fp8["rows"]))
    for name in names:
        cells = []
        for r in fp8["rows"]:
            c = r["configs"].get(name)
            cells.append("-" if c is None else "X" if not c.get("ok") else f"{c['gb_s']:.0f}")
        print(f"{name:<34} " + " ".join(f"{c:>7}" for c in cells))
    # A Llama-3.1-8B decode step's linear layers: 32 x (qkv + o + gate_up + down).
    layer_shapes = ("qkv", "o", "gate_up", "down")
    print("\n# per decode step, 32 layers x (qkv + o + gate_up + down), ms: current / with the table below / bf16 skinny")
    fp8["step_ms"] = {}
    for m in args.m:
        sel = [r for r in fp8["rows"] if r["m"] == m and r["shape"] in layer_shapes]
        if len(sel) != len(layer_shapes):
            continue
        cur = 32 * sum(r["current_us"] for r in sel) / 1e3
        # With the printed table adopted: the best configuration where it beats today's kernel by > 3%.
        best = 32 * sum(r["configs"][r["best"]]["us"] if "best" in r and r["configs"][r["best"]]["us"]
                        < r["current_us"] / 1.03 else r["current_us"] for r in sel) / 1e3
        bf = 32 * sum(r["bf16_us"] for r in sel) / 1e3
        fp8["step_ms"][m] = {"current": cur, "best": best, "bf16": bf}
        print(f"  M={m:<2} {cur:6.2f} / {best:6.2f} / {bf:6.2f}")
    print("\n# FP8_GEMV_CONFIGS entries (ember/kernels/triton_fp8_gemv.py), best beating the current kernel by >3%:")
    for (n, k, m), cfg in table.items():
        print(f"    ({n}, {k}, {m}): {cfg!r},")
    fp8["table"] = {f"{n},{k},{m}": repr(cfg) for (n, k, m), cfg in table.items()}


W4_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_N, split_k, num_warps) of the W4A16 decode kernel (ember/kernels/triton_w4a16.py).
W4_CANDIDATES = ([(bn, split, 4) for bn in (32, 64, 128) for split in (1, 2, 4, 8, 16)]
                 + [(128, split, 8) for split in (1, 2, 4)] + [(256, 1, 8), (256, 2, 8)]
                 + [(256, split, 4) for split in (2, 4, 8)] + [(bn, split, 2) for bn in (32, 64) for split in (4, 8, 16)])
W4_GROUP = 128


def run_w4a16(args, result: dict, t0: float) -> None:
    """The W4A16 part: AWQ-style group-128 weights with zero points, the
    decode kernel's (BLOCK_N, split_k, num_warps) against its default rule
    and the bf16 skinny GEMM."""
    from ember.kernels import triton_w4a16
    from ember.kernels.triton_w4a16 import W4A16Workspace, w4a16_gemm
    from ember.layers.quantization.w4a16 import W4Weights, build_kernel_layout, dequantize_layout

    triton_w4a16.W4A16_DECODE_CONFIGS.clear()  # "current" = decode_config's rule
    result["w4a16"] = w4 = {"rows": []}
    ws = W4A16Workspace()
    ws.reserve(max(n for n, _ in W4_SHAPES.values()), DEVICE)
    table = {}
    print(f"\n# W4A16 (group {W4_GROUP}, zero points): (BLOCK_N, split_k, num_warps) vs the default rule", flush=True)
    print(f"{'shape':<8} {'M':>2} {'cur us':>7} {'int4GB/s':>8} {'bf16 us':>7} {'best us':>7} {'GB/s':>6} "
          f"{'x cur':>5} {'x bf16':>6}  best (BLOCK_N, split, warps)", flush=True)
    torch.manual_seed(0)
    for shape in [sh for sh in args.shapes if sh in W4_SHAPES]:
        n, k = W4_SHAPES[shape]
        q = torch.randint(0, 16, (k, n), device=DEVICE, dtype=torch.uint8)
        z = torch.randint(0, 16, (k // W4_GROUP, n), device=DEVICE, dtype=torch.uint8)
        sc = (torch.rand(k // W4_GROUP, n, device=DEVICE) * 0.004 + 0.001).half()
        layout = build_kernel_layout(W4Weights(q, z, sc, None, W4_GROUP))
        q = None  # noqa: F841
        int4_bytes = sum(t.numel() * t.element_size() for t in (layout.qweight, layout.scales, layout.zeros))
        copies = max(1, math.ceil(L2_BYTES / int4_bytes))
        qws = [layout.qweight] + [layout.qweight.roll(i, 1) for i in range(1, copies)]
        wref = dequantize_layout(layout)
        wb = bf16_copies(wref, n, k)
        for m in args.m:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            ref = x.float() @ wref.T

            def call(i, tiles=(None, None, None)):
                return w4a16_gemm(x, qws[i], layout.scales, layout.zeros, layout.perm, layout.group, layout.k, None,
                                  ws, block_n=tiles[0], split_k=tiles[1], num_warps=tiles[2])

            row = {"shape": shape, "n": n, "k": k, "m": m, "copies": copies, "configs": {}}
            row["current_err"] = rel_err(call(0), ref)
            row["current_us"] = time_us(call, copies)
            row["bf16_us"] = time_us(lambda i: skinny_linear(x, wb[i]), len(wb))
            best = None
            for tiles in W4_CANDIDATES:
                if tiles[1] > k // 128:
                    continue
                try:
                    err = rel_err(call(0, tiles), ref)
                    us = time_us(lambda i, tiles=tiles: call(i, tiles), copies)
                except Exception as e:  # noqa: BLE001 (out of resources etc.: reported, skipped)
                    row["configs"][str(tiles)] = {"error": f"{type(e).__name__}: {str(e)[:120]}"}
                    continue
                ok = err < 1e-2
                row["configs"][str(tiles)] = {"us": us, "gb_s": int4_bytes / us / 1e3, "err": err, "ok": ok}
                if ok and (best is None or us < row["configs"][str(best)]["us"]):
                    best = tiles
            row["current_gb_s"] = int4_bytes / row["current_us"] / 1e3
            if best is not None:
                b = row["configs"][str(best)]
                row["best"] = list(best)
                print(f"{shape:<8} {m:>2} {row['current_us']:7.1f} {row['current_gb_s']:8.0f} {row['bf16_us']:7.1f} "
                      f"{b['us']:7.1f} {b['gb_s']:6.0f} {row['current_us'] / b['us']:5.2f} "
                      f"{row['bf16_us'] / b['us']:6.2f}  {best}", flush=True)
                if b["us"] < row["current_us"] / 1.03:
                    table[(n, layout.qweight.shape[0] * 8, m)] = best
            w4["rows"].append(row)
        qws = wb = wref = layout = None  # noqa: F841 (freed before the next shape)
        torch.cuda.empty_cache()
    print("\n# W4A16_DECODE_CONFIGS entries (ember/kernels/triton_w4a16.py), best beating the rule by >3%:")
    for (n, k, m), tiles in table.items():
        print(f"    ({n}, {k}, {m}): {tiles},")
    w4["table"] = {f"{n},{k},{m}": list(t) for (n, k, m), t in table.items()}
    print(f"# W4A16 done ({time.time() - t0:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default="results/fp8_gemv_sweep.json")
    parser.add_argument("--parts", nargs="+", default=["fp8"], choices=["fp8", "w4a16"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 4, 8, 16])
    args = parser.parse_args()
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
              "triton": triton.__version__}
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)
    if "fp8" in args.parts:
        run_fp8(args, result, t0)
    if "w4a16" in args.parts:
        run_w4a16(args, result, t0)
    result["elapsed_s"] = time.time() - t0
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(f"# {time.time() - t0:.0f} s; JSON: {args.json}", flush=True)


if __name__ == "__main__":
    main()
