"""FP8 W8A8 linear layers on the GPU: kernel timings and correctness at
Llama-3.1-8B's projection shapes, then engine figures bf16 vs ``--quantization
fp8`` on the Llama-3.1-8B preset with random weights.

Kernels (``--parts kernels``): for each projection (qkv, o, gate_up, down) and
M in 1, 16, 4096: the time of bf16 ``F.linear`` and of the FP8 layer's CUDA
path (online per-channel scheme: W8A16 decode GEMV for M <= 16, else per-token
activation quantization + ``torch._scaled_mm``; block 128 x 128 scheme: the
GEMV, else per-group quantization + cuBLASLt's block-scaled GEMM on Hopper,
also timed against the Triton block GEMM as ``block_triton_us``), the FP8 weight's
GB/s at M = 1 against the copy bandwidth measured here (for gate_up also the
GEMV with SwiGLU in its epilogue, as decode runs it), and each path's relative
error against its float32 W8A8 reference (max |error| / max |reference|; the
decode GEMV keeps activations in bf16, so up to a few percent there). A small
sweep of the decode GEMV's tiles at M = 1 follows (``--no-gemv-tiles`` skips it).

Engine (``--parts engine``): ``ember bench latency`` (batch 1, 128 in / 256
out) and ``ember bench throughput`` (``--num-prompts`` x 1024 / 1024) for bf16
and fp8, each in its own process (the bench's ``mbu`` counts the bytes a step
reads: weights at their stored size, the KV cache).

    python benchmarks/quant_fp8.py [--parts kernels engine] [--num-prompts 500] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

LLAMA_8B = {"qkv_proj": (6144, 4096), "o_proj": (4096, 4096), "gate_up_proj": (28672, 4096),
            "down_proj": (4096, 14336)}
# Llama-3.1-8B: vocab 128256 x hidden 4096 in bf16 (the input embedding, not read by a decode step).


def _bench(fn, reps: int = 50) -> float:
    """Median seconds of one call of ``fn`` (``triton.testing.do_bench``: the
    L2 cache is cleared before each call, so a weight is read from HBM)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=reps, return_mode="median") / 1e3


def _layer(n: int, k: int, scheme: str, w: torch.Tensor):
    from ember.layers.linear import ReplicatedLinear
    from ember.layers.quantization.fp8 import Fp8Config

    cfg = Fp8Config() if scheme == "online" else Fp8Config(True, weight_block_size=(128, 128))
    with torch.device("cuda"):
        layer = ReplicatedLinear(k, n, dtype=torch.bfloat16, quant_config=cfg, prefix="bench")
    if scheme == "online":
        layer.weight.data.copy_(w)
    else:
        blocks = w.float().view(n // 128, 128, k // 128, 128)
        scale = blocks.abs().amax((1, 3)) / 448
        layer.weight.data.copy_((blocks / scale[:, None, :, None]).view(n, k).to(torch.float8_e4m3fn))
        layer.weight_scale_inv.data.copy_(scale)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def run_kernels(result: dict, gemv_tiles: bool = True) -> None:
    from ember.entrypoints.bench.roofline import measure_ceilings
    from ember.kernels.triton_fp8 import fp8_skinny_linear

    ceil = measure_ceilings(torch.device("cuda"))
    result["device"] = ceil.name
    result["copy_gb_s"] = ceil.copy_bytes_per_s / 1e9
    torch.manual_seed(0)
    for proj, (n, k) in LLAMA_8B.items():
        w = (torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16)
        layers = {s: _layer(n, k, s, w) for s in ("online", "block")}
        for m in (1, 16, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = _bench(lambda: F.linear(x, w))
            row = {"bf16_us": t_bf16 * 1e6}
            for scheme, layer in layers.items():
                t = _bench(lambda: layer(x))
                y = layer(x)
                ref = layer.quant_method.apply_reference(layer, x.float(), None)
                row[f"{scheme}_us"] = t * 1e6
                row[f"{scheme}_speedup"] = t_bf16 / t
                row[f"{scheme}_rel_err"] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                if m == 1:
                    row[f"{scheme}_weight_gb_s"] = n * k / t / 1e9
                    row[f"{scheme}_frac_copy_bw"] = n * k / t / ceil.copy_bytes_per_s
            if m > 16:  # the block scheme's Triton GEMM (where cuBLASLt's block recipe is missing)
                from ember.kernels.triton_fp8 import quant_fp8_per_token_group, w8a8_scaled_mm
                bl = layers["block"]

                def triton_block():
                    qa, sa = quant_fp8_per_token_group(x, 128)
                    return w8a8_scaled_mm(qa, sa, bl.weight, bl.weight_scale_inv, 128, 128, None, x.dtype)
                row["block_triton_us"] = _bench(triton_block) * 1e6
                row["block_triton_speedup"] = t_bf16 * 1e6 / row["block_triton_us"]
            if m <= 16 and proj == "gate_up_proj":  # the decode path: SwiGLU in the GEMV's epilogue
                layer = layers["online"]
                t = _bench(lambda: layer.quant_method.apply_gated(layer, x))
                row["online_gated_us"] = t * 1e6
                if m == 1:
                    row["online_gated_frac_copy_bw"] = n * k / t / ceil.copy_bytes_per_s
            if m == 1:
                row["bf16_weight_gb_s"] = 2 * n * k / t_bf16 / 1e9
            result[f"{proj}_m{m}"] = row
            print(f"{proj:<13} M={m:<5} " + "  ".join(f"{key} {v:.4g}" for key, v in row.items()), flush=True)
        if not gemv_tiles:
            continue
        # Tile sweep of the decode GEMV (per-channel scales), M = 1.
        layer = layers["online"]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        sweep = {}
        for tiles in ((32, 1024, 4), (64, 512, 4), (32, 512, 4), (64, 256, 4), (64, 512, 3), (128, 256, 3),
                      (16, 1024, 4)):
            try:
                t = _bench(lambda: fp8_skinny_linear(x, layer.weight, layer.weight_scale, tiles=tiles))
            except Exception as e:  # a tile that does not fit shared memory
                sweep[str(tiles)] = f"failed: {type(e).__name__}"
                continue
            sweep[str(tiles)] = round(n * k / t / 1e9, 1)
        result[f"{proj}_m1_gemv_tiles_gb_s"] = sweep
        print(f"{proj:<13} M=1 GEMV tiles (BLOCK_N, BLOCK_K, stages) -> weight GB/s: {sweep}", flush=True)



def _cli(args: list[str], out: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "ember.entrypoints.cli", "bench", *args, "--output-json", out]
    print("$ " + " ".join(cmd[1:]), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
        return {"error": f"exit {proc.returncode}"}
    with open(out) as f:
        res = json.load(f)
    res["wall_s"] = time.perf_counter() - t
    return res


def run_engine(result: dict, model: str, num_prompts: int, timeout: int) -> None:
    common = ["--model", model, "--load-format", "dummy", "--max-model-len", "4096"]
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("bf16", "fp8"):
            q = [] if quant == "bf16" else ["--quantization", "fp8"]
            lat = _cli(["latency", *common, *q, "--batch-size", "1", "--input-len", "128", "--output-len", "256"],
                       os.path.join(tmp, f"lat_{quant}.json"), timeout)
            keep = ("decode_tok_s", "decode_step_ms", "weight_gb", "weight_gb_read_per_step", "mbu", "bound_step_ms",
                    "host_ms_per_step", "copy_gb_s", "wall_s", "error")
            result[f"latency_b1_128_256_{quant}"] = {k: lat[k] for k in keep if k in lat}
            print(f"latency b1 128/256 {quant}: {result[f'latency_b1_128_256_{quant}']}", flush=True)
        for quant in ("bf16", "fp8"):
            q = [] if quant == "bf16" else ["--quantization", "fp8"]
            thr = _cli(["throughput", *common, *q, "--no-progress", "--num-prompts", str(num_prompts),
                        "--input-len", "1024", "--output-len", "1024"], os.path.join(tmp, f"thr_{quant}.json"),
                       timeout)
            keep = ("output_tok_s", "total_tok_s", "elapsed_s", "fraction_of_bound", "host_ms_per_step",
                    "num_preemptions", "wall_s", "error")
            result[f"throughput_{num_prompts}x1024_1024_{quant}"] = {k: thr[k] for k in keep if k in thr}
            print(f"throughput {num_prompts} x 1024/1024 {quant}: "
                  f"{result[f'throughput_{num_prompts}x1024_1024_{quant}']}", flush=True)
    b, f = result["latency_b1_128_256_bf16"], result["latency_b1_128_256_fp8"]
    if "decode_tok_s" in b and "decode_tok_s" in f:
        result["decode_speedup_fp8"] = f["decode_tok_s"] / b["decode_tok_s"]
    b, f = (result[f"throughput_{num_prompts}x1024_1024_{q}"] for q in ("bf16", "fp8"))
    if "output_tok_s" in b and "output_tok_s" in f:
        result["throughput_speedup_fp8"] = f["output_tok_s"] / b["output_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["kernels", "engine"], choices=["kernels", "engine"])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--num-prompts", type=int, default=500, help="offline throughput prompts (1024 in / 1024 out)")
    ap.add_argument("--timeout", type=int, default=240, help="seconds per engine run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-gemv-tiles", action="store_true", help="skip the decode GEMV's tile sweep")
    args = ap.parse_args()
    result: dict = {}
    start = time.perf_counter()
    if "kernels" in args.parts:
        run_kernels(result, not args.no_gemv_tiles)
        torch.cuda.empty_cache()
    if "engine" in args.parts:
        run_engine(result, args.model, args.num_prompts, args.timeout)
    result["total_s"] = time.perf_counter() - start
    for key in ("decode_speedup_fp8", "throughput_speedup_fp8", "total_s"):
        if key in result:
            print(f"{key}  {result[key]:.4g}")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
