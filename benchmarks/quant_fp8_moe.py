"""FP8 routed experts on the GPU: the grouped-GEMM kernels, then decode of the
DeepSeek-V3 preset cut in depth at full width, bf16 against FP8.

1. Kernel: ``fused_experts_triton`` (bf16 weights) against
   ``fused_experts_fp8_triton`` (FP8 weights; 128 x 128 block scales with 1 x 128
   activation groups, and per-channel scales with per-token activations) at
   DeepSeek-V3 (256 experts, hidden 7168, expert width 2048, top-8) and
   Qwen3-30B-A3B (128 experts, 2048, 768, top-8) expert shapes, for 1, 64 and
   1024 tokens: median ms per call (replays of a CUDA graph of 8 calls, each
   with its own random routing, so the experts touched are not all in L2) and
   the bytes of the experts the tokens touch per second (weights only).
2. Engine: the DeepSeek-V3 preset with ``--hf-overrides`` ``num_hidden_layers``
   (default 3: one dense layer, two MoE layers: bf16 weights ~50 GB, what one
   80 GB H100 holds with room for the KV cache) and random weights
   (``--load-format dummy``), decode tok/s at batch 1 and 64 for
   ``bf16``; ``fp8-experts`` (a block-FP8 checkpoint description whose
   ``ignored_layers`` leave every other linear layer bf16: only the experts
   change); and, where the FP8 linear method is installed, ``fp8-block`` (every
   linear layer block FP8) and ``fp8-online`` (``--quantization fp8``: bf16
   weights quantized at load). Decode time is the difference between
   ``generate`` with ``1 + output_len`` and with 1 new token, so the prefill
   is left out. Each FP8 engine's experts are checked to be stored in
   ``float8_e4m3fn`` (decode runs without dequantizing them).

    python benchmarks/quant_fp8_moe.py [--layers 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import time

import torch

from ember.entrypoints.bench.offline import print_and_save

SHAPES = {"deepseek-v3": (256, 8, 7168, 2048), "qwen3-30b-a3b": (128, 8, 2048, 768)}
TOKENS = (1, 64, 1024)


def _graph_ms(fn, replays: int = 10, repeats: int = 5) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (so
    that host launch gaps do not count)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / replays)
    del graph
    return sorted(times)[len(times) // 2]


ROUTINGS = 8  # calls per timed graph, each with its own routing (so the touched experts are not all in L2)


def kernel_bench() -> dict:
    from ember.kernels.triton_moe import fused_experts_fp8_triton, fused_experts_triton

    out: dict = {}
    for name, (num_experts, top_k, hidden, inter) in SHAPES.items():
        gen = torch.Generator(device="cuda").manual_seed(0)
        w13 = torch.randn(num_experts, 2 * inter, hidden, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        w2 = torch.randn(num_experts, hidden, inter, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        q13, q2 = (w13 * 100).to(torch.float8_e4m3fn), (w2 * 100).to(torch.float8_e4m3fn)
        blk13 = torch.full((num_experts, 2 * inter // 128, hidden // 128), 0.01, device="cuda")
        blk2 = torch.full((num_experts, hidden // 128, inter // 128), 0.01, device="cuda")
        ch13 = torch.full((num_experts, 2 * inter), 0.01, device="cuda")
        ch2 = torch.full((num_experts, hidden), 0.01, device="cuda")
        for n in TOKENS:
            x = torch.randn(n, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
            routings = [torch.randn(n, num_experts, device="cuda", generator=gen).softmax(-1).topk(top_k, dim=-1)
                        for _ in range(ROUTINGS)]
            # bytes of bf16 expert weights the calls touch, per call
            touched = sum(int(ids.unique().numel()) for _, ids in routings) / ROUTINGS
            bytes_bf16 = touched * 3 * hidden * inter * 2
            runs = {
                "bf16": lambda: [fused_experts_triton(x, w13, w2, w, i) for w, i in routings],
                "fp8_block": lambda: [fused_experts_fp8_triton(x, q13, q2, blk13, blk2, w, i, (128, 128))
                                      for w, i in routings],
                "fp8_channel": lambda: [fused_experts_fp8_triton(x, q13, q2, ch13, ch2, w, i, None)
                                        for w, i in routings],
            }
            row = {"experts_touched": touched}
            for kind, fn in runs.items():
                ms = _graph_ms(fn) / ROUTINGS
                row[f"{kind}_ms"] = round(ms, 4)
                row[f"{kind}_weight_gb_s"] = round(bytes_bf16 / (1 if kind == "bf16" else 2) / ms / 1e6, 1)
            row["fp8_block_speedup"] = round(row["bf16_ms"] / row["fp8_block_ms"], 3)
            row["fp8_channel_speedup"] = round(row["bf16_ms"] / row["fp8_channel_ms"], 3)
            out[f"kernel_{name}_t{n}"] = row
            print(f"kernel {name} tokens={n}: {row}", flush=True)
    return out


def _experts_only_ignored(layers: int, first_dense: int) -> list[str]:
    """Every non-expert linear layer of the cut DeepSeek-V3 by prefix."""
    ignored = [f"model.layers.{i}.self_attn" for i in range(layers)]
    ignored += [f"model.layers.{i}.mlp" for i in range(first_dense)]
    ignored += [f"model.layers.{i}.mlp.shared_experts" for i in range(first_dense, layers)]
    return ignored


def engine_bench(variant: str, layers: int, output_len: int, batches: tuple[int, ...],
                 extra_overrides: dict | None = None) -> dict:
    from ember import LLM, SamplingParams
    from ember.layers.moe import FusedMoE

    first_dense = 1
    overrides: dict = {"num_hidden_layers": layers, "first_k_dense_replace": first_dense} | (extra_overrides or {})
    block_fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [128, 128]}
    quantization = None
    if variant == "fp8-experts":
        overrides["quantization_config"] = block_fp8 | {"ignored_layers": _experts_only_ignored(layers, first_dense)}
    elif variant == "fp8-block":
        overrides["quantization_config"] = block_fp8
    elif variant == "fp8-online":
        quantization = "fp8"
    start = time.perf_counter()
    llm = LLM("DeepSeek-V3", load_format="dummy", hf_overrides=overrides, quantization=quantization,
              max_model_len=1024, max_num_seqs=max(batches), skip_tokenizer_init=True)
    load_s = time.perf_counter() - start
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    experts = [m for m in runner.model.modules() if isinstance(m, FusedMoE)]
    dtypes = sorted({str(m.w13_weight.dtype).removeprefix("torch.") for m in experts})
    weight_gb = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / 1e9
    result = {"variant": variant, "layers": layers, "moe_layers": len(experts), "experts_dtype": ",".join(dtypes),
              "weight_gb": round(weight_gb, 2), "load_s": round(load_s, 1),
              "cuda_graphs": runner.cuda_graphs is not None}
    if variant != "bf16":
        assert dtypes == ["float8_e4m3fn"], f"{variant}: experts stored as {dtypes}, not FP8"
    prompts = [[100 + (7 * i + j) % 20000 for j in range(32)] for i in range(max(batches))]

    def run(batch: int, new: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(prompts[:batch], params, use_tqdm=False)
        return time.perf_counter() - t0

    for batch in batches:
        run(batch, 4)  # warm-up at this batch size (kernel compilation, first-use checks)
        prefill = min(run(batch, 1) for _ in range(2))
        total = min(run(batch, 1 + output_len) for _ in range(2))
        result[f"b{batch}_decode_tok_s"] = round(batch * output_len / (total - prefill), 1)
        result[f"b{batch}_decode_step_ms"] = round((total - prefill) / output_len * 1e3, 3)
    llm.llm_engine.shutdown()
    print(f"engine {result}", flush=True)
    return result


def _release() -> None:
    """Free the last run's GPU memory: the next engine sizes its KV cache from what is free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=3, help="decoder layers of the cut DeepSeek-V3 (first one dense)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--variants", default=None,
                    help="comma-separated engine variants (default: bf16, fp8-experts and, with the FP8 linear "
                         "method installed, fp8-block and fp8-online)")
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--extra-overrides", type=json.loads, default=None,
                    help="more config fields for the engine runs (a JSON object; e.g. a narrower model for a "
                         "CPU smoke run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    result: dict = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    if not args.skip_kernels:
        result.update(kernel_bench())
        _release()
    has_linear = importlib.util.find_spec("ember.layers.quantization.fp8_linear") is not None
    variants = (args.variants.split(",") if args.variants else
                ["bf16", "fp8-experts"] + (["fp8-block", "fp8-online"] if has_linear else []))
    if not has_linear:
        print("note: ember.layers.quantization.fp8_linear is not installed: fp8-block and fp8-online skipped")
    engines = {}
    for v in variants:
        engines[v] = engine_bench(v, args.layers, args.output_len, (1, 64), args.extra_overrides)
        _release()
    for v, r in engines.items():
        for key, value in r.items():
            result[f"{v}_{key}"] = value
    if "bf16" in engines:
        for v in engines:
            for b in (1, 64):
                result[f"{v}_b{b}_speedup_vs_bf16"] = round(engines[v][f"b{b}_decode_tok_s"]
                                                            / engines["bf16"][f"b{b}_decode_tok_s"], 3)
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
