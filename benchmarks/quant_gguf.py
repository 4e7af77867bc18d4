"""GGUF kept quantized on the GPU: kernel microbenchmarks and batch-1 decode (GPU).

1. Kernels, on random blocks with finite scales: for each ggml type the
   ``gguf`` method runs, at M = 1 and 16 rows of x and N x K = 4096 x 4096 and
   14336 x 4096, the GEMV (:func:`ember.kernels.triton_gguf.gguf_gemv`) timed
   inside one CUDA graph over enough weight copies to overflow the L2 (median
   of the replays), as GB/s of the quantized bytes; beside it the bf16 skinny
   GEMM Ember's dense decode runs at the same shape (its time, and the speed-up
   of the quantized kernel over it), the relative error of the kernel
   against the float32 product of the dequantized weight (``ok`` below 1e-2),
   and the GEMV's time at 16, 32 and 64 output features per program (the
   default picks by N).
2. Models: batch-1 decode tok/s of each GGUF file given (32-token prompt,
   256 new tokens, from the difference of a 16- and a 272-token run, so the
   prefill cancels), quantized (``--quantization gguf``) against the
   dequantized bf16 path (``--quantization none``), and each run's weight bytes.

    python benchmarks/quant_gguf.py [--models A.gguf B.gguf] [--json results/quant_gguf.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch

from ember.kernels.triton_gguf import gguf_gemv
from ember.layers.quantization.gguf import GGML_TYPE_NAMES, GGUF_BLOCK_SIZES, GT, dequantize_gguf

SHAPES = [(4096, 4096), (14336, 4096)]
ROWS = [1, 16]
BLOCK_NS = (16, 32, 64)  # the GEMV's output features per program, swept for tuning
L2_BYTES = 50 << 20
_SCALE_OFFSETS = {GT.Q4_0: (0,), GT.Q4_1: (0, 2), GT.Q5_0: (0,), GT.Q5_1: (0, 2), GT.Q8_0: (0,),
                  GT.Q4_K: (0, 2), GT.Q5_K: (0, 2), GT.Q6_K: (208,)}


def random_blocks(qtype: int, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, row_bytes] uint8 on CUDA: random quants, finite float16 scales (~0.01)."""
    elems, nbytes = GGUF_BLOCK_SIZES[qtype]
    blocks = torch.randint(0, 256, (n, k // elems, nbytes), dtype=torch.uint8, device="cuda", generator=gen)
    for off in _SCALE_OFFSETS[qtype]:
        scale = (torch.rand(n, k // elems, 1, device="cuda", generator=gen) * 0.02 - 0.01).to(torch.float16)
        blocks[:, :, off:off + 2] = scale.view(torch.uint8)
    return blocks.reshape(n, -1)


def graph_time_us(calls: list, replays: int = 20) -> float:
    """Median microseconds per call of ``calls`` run in turn inside one CUDA graph."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def bench_kernels() -> list[dict]:
    from ember.kernels.triton_gemm import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    print(f"{'type':<5} {'N x K':>12} {'M':>3} {'gguf_us':>8} {'GB/s':>7} {'bf16_us':>8} {'speedup':>7} "
          f"{'rel_err':>8} {'':>4}  " + " ".join(f"{f'us_bn{bn}':>6}" for bn in BLOCK_NS))
    for n, k in SHAPES:
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen)
                 for _ in range(max(2, -(-2 * L2_BYTES // (n * k * 2))))]
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            y_dense = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            bf16_us = graph_time_us([lambda w=w: skinny_linear(x, w, None) for w in dense])
            for qtype in sorted(GGUF_BLOCK_SIZES):
                w0 = random_blocks(qtype, n, k, gen)
                nbytes = w0.numel()
                copies = [w0] + [random_blocks(qtype, n, k, gen) for _ in range(max(1, -(-2 * L2_BYTES // nbytes)) - 1)]
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                us = graph_time_us([lambda w=w: gguf_gemv(x, w, qtype, out=out) for w in copies])
                by_block_n = {bn: graph_time_us([lambda w=w: gguf_gemv(x, w, qtype, out=out, block_n=bn)
                                                 for w in copies]) for bn in BLOCK_NS}
                gguf_gemv(x, w0, qtype, out=out)
                ref = x.float() @ dequantize_gguf(w0, qtype).T
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                row = dict(type=GGML_TYPE_NAMES[qtype], n=n, k=k, m=m, gguf_us=us, gb_s=nbytes / us / 1e3,
                           bf16_us=bf16_us, speedup=bf16_us / us, rel_err=err, ok=err < 1e-2,
                           us_by_block_n=by_block_n)
                rows.append(row)
                print(f"{row['type']:<5} {f'{n}x{k}':>12} {m:>3} {us:8.1f} {row['gb_s']:7.0f} {bf16_us:8.1f} "
                      f"{row['speedup']:7.2f} {err:8.1e} {'ok' if row['ok'] else 'FAIL':>4}  "
                      + " ".join(f"{by_block_n[bn]:6.1f}" for bn in BLOCK_NS), flush=True)
                del copies, w0
            del y_dense
        del dense
        torch.cuda.empty_cache()
    return rows


def bench_model(path: str, quantization: str, new_tokens: int = 256) -> dict:
    from ember import LLM, SamplingParams

    # Few captured batch sizes and no piecewise (prefill) graphs: start-up stays short, batch 1 is the same.
    llm = LLM(path, dtype="bfloat16", max_model_len=1024, kv_cache_memory=1 << 30, quantization=quantization,
              skip_tokenizer_init=True, max_num_seqs=4, piecewise_cuda_graphs=False)
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    prompt = [[(i * 7919) % 1000 + 100 for i in range(32)]]

    def run(max_tokens: int) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = llm.generate(prompt, params, use_tqdm=False)
        return time.perf_counter() - start, out[0].outputs[0].token_ids

    run(16)  # warm-up
    short = min(run(16)[0] for _ in range(2))
    long, tokens = run(16 + new_tokens)
    llm = model = None  # free the engine before the next one loads
    gc.collect()
    torch.cuda.empty_cache()
    return dict(model=os.path.basename(path), quantization=quantization, decode_tok_s=new_tokens / (long - short),
                weight_bytes=weight_bytes, tokens=tokens[:32])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=[], help="GGUF files to time at batch-1 decode")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    result: dict = {"device": torch.cuda.get_device_name()}
    if not args.skip_kernels:
        result["kernels"] = bench_kernels()
    result["models"] = []
    for path in args.models:
        runs = [bench_model(path, q) for q in ("gguf", "none")]
        same = sum(a == b for a, b in zip(runs[0]["tokens"], runs[1]["tokens"]))
        for r in runs:
            print(f"{r['model']:<45} {r['quantization']:<5} decode {r['decode_tok_s']:7.1f} tok/s  "
                  f"weights {r['weight_bytes'] / 2**20:7.1f} MiB", flush=True)
        print(f"{os.path.basename(path):<45} speed-up {runs[0]['decode_tok_s'] / runs[1]['decode_tok_s']:.2f}x, "
              f"first 32 greedy tokens equal in {same}/32", flush=True)
        result["models"] += runs
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if any(not r["ok"] for r in result.get("kernels", [])):
        raise SystemExit("a GGUF kernel disagrees with its float32 reference")


if __name__ == "__main__":
    main()
