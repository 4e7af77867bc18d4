"""``ember bench latency`` and ``ember bench throughput``: offline benchmarks on
token-id prompts (no tokenizer needed), with the device's measured roofline.

latency: a fixed batch of ``batch_size`` requests, ``input_len`` prompt tokens
and ``output_len`` new tokens each (``ignore_eos``). Decode-step time is the
end-to-end time minus a prefill-only run, over ``output_len - 1`` steps. MBU
(model-bandwidth utilisation) = (weight bytes + KV bytes read per step) / step
time / measured copy bandwidth, the weights counted as stored (quantized ones
at their packed size, scales included; MoE: only the experts a step's tokens
are expected to touch, see ``roofline.expected_distinct_experts``) and the KV
bytes in the cache dtype.

throughput: ``num_prompts`` requests (fixed lengths, or uniform in
``[len * (1 - range_ratio), len * (1 + range_ratio)]``) submitted at once.
The bound is max(FLOPs / matmul rate, bytes / bandwidth) with bytes = weights
once per step at the largest batch the engine runs (``max_num_seqs``) plus the
KV cache read by every decode step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import time
from typing import Any

import torch

from ember.engine.arg_utils import EngineArgs
from ember.engine.step_stats import StepTimes, StepTrace
from ember.entrypoints.bench.roofline import ModelCost, measure_ceilings, model_cost
from ember.sampling_params import SamplingParams


def _engine(args: argparse.Namespace) -> tuple[Any, StepTimes]:
    """The offline LLM, and a :class:`StepTimes` observer on its core."""
    from ember.engine.llm import LLM

    llm = LLM(**dataclasses.asdict(EngineArgs.from_cli_args(args)))
    times = StepTimes()
    llm.llm_engine.engine_core.add_step_observer(times)
    return llm, times


def _random_prompts(n: int, length: int, vocab: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def _runner(llm):
    """The in-process model runner; None when the model runs in worker
    processes (``--distributed-executor-backend mp``)."""
    worker = getattr(llm.llm_engine.engine_core.executor, "worker", None)
    return None if worker is None else worker.model_runner


def _prepare_s(llm) -> float:
    """Host time the runner spent packing inputs; 0 when it runs in worker
    processes (then the host time per step is the engine core's only)."""
    runner = _runner(llm)
    return 0.0 if runner is None else runner.prepare_s


def _device_and_cost(llm) -> tuple[torch.device, ModelCost]:
    """The device the model runs on and its roofline cost; with worker
    processes, the cost of the whole model built on the meta device here."""
    runner = _runner(llm)
    mc = llm.llm_engine.model_config
    if runner is not None:
        return runner.device, model_cost(runner.model, mc, runner.kv_cache_spec().dtype)
    from ember.layers.attention import get_attention_backend
    from ember.layers.quantization import get_quant_config
    from ember.models.registry import ModelRegistry

    config = llm.llm_engine.config
    with torch.device("meta"):
        saved = torch.get_default_dtype()
        torch.set_default_dtype(mc.dtype)
        try:
            model = ModelRegistry.load_class(mc.architecture)(mc.hf_config, get_attention_backend("torch"),
                                                              quant_config=get_quant_config(mc.quantization,
                                                                                            mc.hf_config))
        finally:
            torch.set_default_dtype(saved)
    kv_dtype = config.cache_config.kv_cache_torch_dtype(mc.dtype)
    return config.device_config.torch_device, model_cost(model, mc, kv_dtype)


def _host_time_per_step(llm, st: StepTimes, before: tuple[float, int]) -> float:
    host = st.schedule_s + st.update_s + _prepare_s(llm)
    return (host - before[0]) / max(1, st.num_steps - before[1])


def _host_mark(llm, st: StepTimes) -> tuple[float, int]:
    return st.schedule_s + st.update_s + _prepare_s(llm), st.num_steps


def run_latency(args: argparse.Namespace) -> dict[str, Any]:
    llm, times = _engine(args)
    mc = llm.llm_engine.model_config
    rng = random.Random(0)

    def fresh() -> list[list[int]]:
        # NOTE: new prompts for every call: with prefix caching on, a repeated
        # prompt would skip its prefill and the timings would not be a prefill's.
        return _random_prompts(args.batch_size, args.input_len, mc.vocab_size, rng)

    full = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    prefill_only = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    for _ in range(args.warmup):
        llm.generate(fresh(), full, use_tqdm=False)
    device, cost = _device_and_cost(llm)
    ceilings = measure_ceilings(device)
    prefill_times, total_times = [], []
    mark = _host_mark(llm, times)
    cache_mark = llm.get_stats().prefix_cache
    for _ in range(args.iters):
        t = time.perf_counter()
        llm.generate(fresh(), prefill_only, use_tqdm=False)
        prefill_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        llm.generate(fresh(), full, use_tqdm=False)
        total_times.append(time.perf_counter() - t)
    host_per_step = _host_time_per_step(llm, times, mark)
    prefill = sorted(prefill_times)[len(prefill_times) // 2]
    total = sorted(total_times)[len(total_times) // 2]
    steps = max(1, args.output_len - 1)
    step_time = (total - prefill) / steps
    avg_ctx = args.input_len + args.output_len / 2
    weight_read = cost.weight_bytes_read(args.batch_size)
    bytes_per_step = weight_read + args.batch_size * avg_ctx * cost.kv_bytes_per_token
    return {
        "benchmark": "latency", "batch_size": args.batch_size, "input_len": args.input_len,
        "output_len": args.output_len, "kv_cache_dtype": args.kv_cache_dtype, "latency_s": total, "prefill_s": prefill,
        "decode_step_ms": step_time * 1e3,
        "decode_tok_s_per_seq": 1 / step_time, "decode_tok_s": args.batch_size / step_time,
        "host_ms_per_step": host_per_step * 1e3,
        "weight_gb": cost.weight_bytes / 1e9, "weight_gb_read_per_step": weight_read / 1e9,
        "bound_step_ms": bytes_per_step / ceilings.copy_bytes_per_s * 1e3,
        "mbu": bytes_per_step / step_time / ceilings.copy_bytes_per_s,
        **_prefix_cache_fields(llm, cache_mark),
        **spec_decode_fields(llm.get_stats()),
        **_ceiling_fields(ceilings),
        **rank_fields(llm, args.batch_size),
    }


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    llm, times = _engine(args)
    mc = llm.llm_engine.model_config
    rng = random.Random(0)

    def length(base: int) -> int:
        lo, hi = int(base * (1 - args.range_ratio)), int(base * (1 + args.range_ratio))
        return max(1, rng.randint(lo, hi))

    in_lens = [length(args.input_len) for _ in range(args.num_prompts)]
    out_lens = [length(args.output_len) for _ in range(args.num_prompts)]
    prompts = [_random_prompts(1, n, mc.vocab_size, rng)[0] for n in in_lens]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in out_lens]
    # Warm-up on other prompts of the same lengths, so prefix caching has nothing of the timed run.
    warm = [_random_prompts(1, n, mc.vocab_size, rng)[0] for n in in_lens[:8]]
    llm.generate(warm, params[: len(warm)], use_tqdm=False)
    device, cost = _device_and_cost(llm)
    ceilings = measure_ceilings(device)
    mark = _host_mark(llm, times)
    cache_mark = llm.get_stats().prefix_cache
    core = llm.llm_engine.engine_core
    tracer = StepTrace() if args.step_trace else None
    if tracer is not None:
        core.add_step_observer(tracer)
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    elapsed = time.perf_counter() - t
    trace_fields = {}
    if tracer is not None:
        core.remove_step_observer(tracer)
        trace = tracer.steps
        trace_fields = summarize_step_trace(trace, t, llm.llm_engine.config.scheduler_config.max_num_seqs)
        with open(args.step_trace, "w") as f:
            json.dump({"start": t, "fields": list(StepTrace.FIELDS), "steps": trace}, f)
    host_per_step = _host_time_per_step(llm, times, mark)
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    num_in = sum(in_lens)
    flops = cost.flops_per_token * (num_in + num_out)
    flops += sum(cost.attn_flops_per_token_ctx * (i * i / 2 + o * (i + o / 2)) for i, o in zip(in_lens, out_lens))
    max_batch = llm.llm_engine.config.scheduler_config.max_num_seqs
    min_steps = max(out_lens) if len(out_lens) <= max_batch else -(-num_out // max_batch)
    kv_read = sum(cost.kv_bytes_per_token * o * (i + o / 2) for i, o in zip(in_lens, out_lens))
    bytes_moved = cost.weight_bytes_read(min(len(out_lens), max_batch)) * min_steps + kv_read
    bound = max(flops / ceilings.matmul_flops_per_s, bytes_moved / ceilings.copy_bytes_per_s)
    return {
        "benchmark": "throughput", "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "kv_cache_dtype": args.kv_cache_dtype, "range_ratio": args.range_ratio, "elapsed_s": elapsed,
        "requests_per_s": len(outs) / elapsed, "output_tok_s": num_out / elapsed,
        "total_tok_s": (num_in + num_out) / elapsed, "host_ms_per_step": host_per_step * 1e3,
        "bound_s": bound, "fraction_of_bound": bound / elapsed,
        "bound_output_tok_s": num_out / bound,
        **_prefix_cache_fields(llm, cache_mark),
        **spec_decode_fields(llm.get_stats()),
        **_ceiling_fields(ceilings),
        **trace_fields,
        **rank_fields(llm, min(max_batch, args.num_prompts)),
    }


def summarize_step_trace(trace: list[tuple], start: float, max_batch: int) -> dict[str, Any]:
    """Where a run's wall time went, from a :class:`StepTrace`'s steps.

    A step's time is the gap between its collection and the previous one's
    (the first from ``start``, in ``time.perf_counter`` seconds), so with
    asynchronous scheduling it is the device step plus any host time the
    device waited on. Steps are decode-only (every request computes one
    token) or mixed (some prefill tokens); decode-only steps are split into
    full ones (batch >= 90% of ``max_batch``) and the rest.

    Returns:
        ``trace_*`` fields: counts, seconds, mean batch / prefill tokens and
        ms per step of each kind.
    """
    kinds: dict[str, list[tuple[float, int, int]]] = {"decode_full": [], "decode_partial": [], "mixed": []}
    prev = start
    for t, _num_reqs, num_decode, num_prefill, *_ in trace:
        kind = "mixed" if num_prefill else ("decode_full" if num_decode >= 0.9 * max_batch else "decode_partial")
        kinds[kind].append((t - prev, num_decode, num_prefill))
        prev = t
    out: dict[str, Any] = {"trace_steps": len(trace),
                           "trace_preemptions": sum(s[4] for s in trace),
                           "trace_mask_s": sum(s[5] for s in trace if len(s) > 5)}  # older traces: 5 fields
    for kind, steps in kinds.items():
        secs = sum(d for d, _, _ in steps)
        n = max(1, len(steps))
        out[f"trace_{kind}_steps"] = len(steps)
        out[f"trace_{kind}_s"] = secs
        out[f"trace_{kind}_ms_per_step"] = secs / n * 1e3
        out[f"trace_{kind}_mean_decode"] = sum(b for _, b, _ in steps) / n
        if kind == "mixed":
            out["trace_mixed_mean_prefill_tokens"] = sum(p for _, _, p in steps) / n
    return out


def _prefix_cache_fields(llm, before) -> dict[str, Any]:
    """Prefix-cache queries and hits (tokens) since ``before``, and preemptions so far."""
    stats = llm.get_stats()
    queries = stats.prefix_cache.queries - before.queries
    hits = stats.prefix_cache.hits - before.hits
    return {"prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0, "num_preemptions": stats.num_preemptions}


def spec_decode_fields(stats) -> dict[str, Any]:
    """Speculative decoding counters since start-up (warm-up included):
    acceptance rate, mean accepted length (tokens per request-step with
    drafts, the bonus token included) and per-position acceptance; empty when
    no draft was verified."""
    if not stats.spec_num_drafts:
        return {}
    out = {"spec_num_drafts": stats.spec_num_drafts, "spec_num_draft_tokens": stats.spec_num_draft_tokens,
           "spec_num_accepted_tokens": stats.spec_num_accepted_tokens,
           "spec_acceptance_rate": stats.spec_acceptance_rate,
           "spec_mean_accepted_length": stats.spec_mean_accepted_length}
    for j, (acc, n) in enumerate(zip(stats.spec_accepted_per_pos, stats.spec_drafts_per_pos)):
        out[f"spec_acceptance_rate_pos{j}"] = acc / n if n else 0.0
    return out


def _ceiling_fields(c) -> dict[str, Any]:
    return {"device": c.name, "copy_gb_s": c.copy_bytes_per_s / 1e9, "matmul_tflop_s": c.matmul_flops_per_s / 1e12}


def rank_fields(llm, num_tokens: int) -> dict[str, Any]:
    """Per-rank memory and communication (``ranks``: weights, KV cache and
    peak device memory in GB; an eager forward of ``num_tokens`` tokens with
    its tensor-parallel collectives' count and time), and ``comm_share``: the
    largest rank's share of that forward spent in collectives (0 with one
    rank). The eager forward launches every kernel from the host, so the
    share of a CUDA-graph step may differ."""
    reports = llm.llm_engine.engine_core.executor.rank_reports(num_tokens)
    ranks = [{"rank": r["rank"], "weight_gb": r["weight_bytes"] / 1e9, "kv_cache_gb": r["kv_cache_bytes"] / 1e9,
              "peak_gb": None if r["peak_bytes"] is None else r["peak_bytes"] / 1e9,
              "forward_tokens": r["forward_tokens"], "forward_ms": r["forward_ms"], "collectives": r["collectives"],
              "collective_mb": r["collective_bytes"] / 1e6, "comm_ms": r["comm_ms"], "comm_share": r["comm_share"]}
             for r in reports]
    return {"ranks": ranks, "comm_share": max(r["comm_share"] for r in ranks)}


def print_and_save(result: dict[str, Any], path: str | None) -> None:
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def add_bench_parsers(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add ``ember bench latency|throughput``; returns the ``bench`` sub-parsers (for more kinds)."""
    bench = sub.add_parser("bench", help="offline latency / throughput benchmarks with a measured roofline; "
                                         "serve: load an OpenAI-compatible server")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    lat = kinds.add_parser("latency", help="fixed batch, fixed input/output lengths")
    lat.add_argument("--batch-size", type=int, default=1)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--warmup", type=int, default=1)
    lat.add_argument("--iters", type=int, default=3)
    thr = kinds.add_parser("throughput", help="N requests submitted at once")
    thr.add_argument("--num-prompts", type=int, default=1000)
    thr.add_argument("--input-len", type=int, default=1024)
    thr.add_argument("--output-len", type=int, default=1024)
    thr.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in len*(1 +- ratio)")
    thr.add_argument("--no-progress", action="store_true")
    thr.add_argument("--step-trace", default=None, metavar="PATH",
                     help="record every step (time, batch, prefill tokens) to this JSON file and "
                          "summarize where the time went (trace_* fields)")
    for p in (lat, thr):
        p.add_argument("--output-json", default=None)
        p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
        EngineArgs.add_cli_args(p)
        p.set_defaults(func=cmd_bench)
    return kinds


def cmd_bench(args: argparse.Namespace) -> int:
    run = run_latency if args.bench_kind == "latency" else run_throughput
    print_and_save(run(args), args.output_json)
    return 0
