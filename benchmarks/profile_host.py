"""Is a step with prefill tokens bound by the host's kernel launches?

1. Host cost per launch (no GPU work to speak of: 8-row inputs) of each Triton
   wrapper the model calls per layer, and of a plain torch op for scale:
   ``perf_counter`` over many back-to-back calls, without a sync in between.
2. Mixed steps (4 decodes + a prefill chunk of ``--chunks`` tokens) on the
   8B preset (dummy weights), as piecewise CUDA graphs or (``--no-piecewise``)
   eagerly: per step, the host time to issue the forward
   (CPU, until the last launch returns) against the device time of the same
   forward (CUDA events). Host ≈ device means the step is launch-bound.

Usage (GPU): python benchmarks/profile_host.py [--model Llama-3.1-8B] [--chunks 128 256 512 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from ember import LLM, SamplingParams


def launch_costs(num_calls: int = 2000) -> None:
    from ember.kernels import triton_attention as ta
    from ember.kernels import triton_ops as ops

    dev, dt = "cuda", torch.bfloat16
    n, hidden, heads, kv_heads, hd, blocks, bs = 8, 4096, 32, 8, 128, 64, 16
    x = torch.randn(n, hidden, device=dev, dtype=dt)
    res = torch.randn_like(x)
    w = torch.ones(hidden, device=dev, dtype=dt)
    gate_up = torch.randn(n, 2 * 14336, device=dev, dtype=dt)
    q = torch.randn(n, heads * hd, device=dev, dtype=dt)
    k = torch.randn(n, kv_heads * hd, device=dev, dtype=dt)
    v = torch.randn(n, kv_heads * hd, device=dev, dtype=dt)
    pos = torch.arange(n, device=dev)
    cos_sin = torch.randn(4096, hd, device=dev, dtype=torch.float32)
    kv = torch.zeros(2, blocks, bs, kv_heads, hd, device=dev, dtype=dt)
    slots = torch.arange(n, device=dev, dtype=torch.int64)
    bt = torch.arange(blocks, device=dev, dtype=torch.int32).view(1, -1).repeat(n, 1)
    seq = torch.full((n,), 64, device=dev, dtype=torch.int32)
    qsl = torch.arange(n + 1, device=dev, dtype=torch.int32)
    q3, out3 = q.view(n, heads, hd), torch.empty(n, heads, hd, device=dev, dtype=dt)
    k3, v3 = k.view(n, kv_heads, hd), v.view(n, kv_heads, hd)
    cases = {
        "torch.add (reference)": lambda: torch.add(x, res),
        "rms_norm + residual": lambda: ops.rms_norm(x, w, 1e-5, res),
        "silu_and_mul": lambda: ops.silu_and_mul(gate_up),
        "rotary_embedding_": lambda: ops.rotary_embedding_(pos, q, k, cos_sin, hd, hd),
        "store_kv_cache": lambda: ta.store_kv_cache(k3, v3, kv, slots),
        "decode_attention (split + merge)": lambda: ta.decode_attention(q3, kv, out3, bt, seq, 0.1, 4),
        "extend_attention": lambda: ta.extend_attention(q3, kv, out3, bt, qsl, seq, 1, 0.1),
        "torch.matmul 8x4096x4096": lambda: torch.matmul(x, w.view(-1, 1).expand(hidden, hidden)),
    }
    print(f"{'host cost per call (us)':36s} median of 5 x {num_calls} calls")
    for name, fn in cases.items():
        fn()
        torch.cuda.synchronize()
        runs = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(num_calls):
                fn()
            runs.append((time.perf_counter() - t) / num_calls * 1e6)
            torch.cuda.synchronize()
        print(f"  {name:34s} {statistics.median(runs):7.1f}")


def mixed_steps(model: str, chunks: list[int], decodes: int = 4, prompt_len: int = 1000,
                piecewise: bool = True) -> None:
    llm = LLM(model, load_format="dummy", max_model_len=4096, max_num_batched_tokens=max(chunks) + decodes,
              enable_prefix_caching=False, async_scheduling=False, piecewise_cuda_graphs=piecewise)
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    runner = engine.engine_core.executor.worker.model_runner
    records: list[tuple[int, float, float]] = []
    orig = runner._forward

    def timed(host):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t = time.perf_counter()
        out = orig(host)
        host_ms = (time.perf_counter() - t) * 1e3
        end.record()
        torch.cuda.synchronize()
        records.append((len(host.input_ids), host_ms, start.elapsed_time(end)))
        return out

    runner._forward = timed
    for chunk in chunks:
        # the token budget sets the chunk size (the scheduler reads it every step)
        scheduler.config = dataclasses.replace(scheduler.config, max_num_batched_tokens=chunk + decodes,
                                               max_num_seqs=min(scheduler.config.max_num_seqs, chunk + decodes))
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
        for i in range(decodes):
            engine.add_request(f"d{chunk}-{i}", [1000 + i] * 8, long, prompt_token_ids=[1000 + i] * 8)
        for _ in range(8):
            engine.step()
        for rep in range(3):
            records.clear()
            rid = f"p{chunk}-{rep}"
            p = [2000 + rep + j for j in range(prompt_len)]
            engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=1), prompt_token_ids=p)
            while any(r.request_id == rid for r in scheduler.running) or scheduler.waiting:
                engine.step()
            mixed = [r for r in records if r[0] > decodes]
            host = sum(r[1] for r in mixed)
            dev = sum(r[2] for r in mixed)
            print(f"chunk {chunk:5d}: {len(mixed)} mixed steps for a {prompt_len}-token prompt: host issue "
                  f"{host:6.1f} ms, device {dev:6.1f} ms (per step: " +
                  ", ".join(f"{r[0]} tok {r[1]:.1f}/{r[2]:.1f}" for r in mixed) + ")")
        engine.abort_requests([f"d{chunk}-{i}" for i in range(decodes)])
        while engine.has_unfinished_requests():
            engine.step()


def profile_mixed(model: str, chunk: int, decodes: int = 4, steps: int = 12) -> None:
    """cProfile (Python functions, by own time) and torch.profiler (CPU-side ops
    and CUDA runtime calls, by self CPU time) of ``steps`` eager mixed steps."""
    import cProfile
    import pstats

    llm = LLM(model, load_format="dummy", max_model_len=4096, max_num_batched_tokens=chunk + decodes,
              enable_prefix_caching=False, async_scheduling=False)
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    long = SamplingParams(temperature=0, max_tokens=2000, ignore_eos=True)
    for i in range(decodes):
        engine.add_request(f"d{i}", [1000 + i] * 8, long, prompt_token_ids=[1000 + i] * 8)
    for _ in range(4):
        engine.step()

    def run(n: int, tag: str) -> None:
        for j in range(n):
            p = [3000 + j + k for k in range(chunk * 4)]
            engine.add_request(f"{tag}{j}", p, SamplingParams(temperature=0, max_tokens=1), prompt_token_ids=p)
        for _ in range(n * 4):
            engine.step()
        torch.cuda.synchronize()

    run(2, "warm")
    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    run(steps // 4, "cp")
    prof.disable()
    print(f"{steps} mixed steps of {chunk}+{decodes} tokens under cProfile: "
          f"{(time.perf_counter() - start) / steps * 1e3:.1f} ms per step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(35)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as tprof:
        run(steps // 4, "tp")
    print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--chunks", type=int, nargs="*", default=[128, 256, 512, 1000])
    p.add_argument("--piecewise", action=argparse.BooleanOptionalAction, default=True,
                   help="piecewise CUDA graphs for the mixed steps (default: on)")
    p.add_argument("--skip-launch-costs", action="store_true")
    p.add_argument("--profile-chunk", type=int, default=0,
                   help="instead: cProfile and torch.profiler tables of eager mixed steps with this chunk")
    args = p.parse_args()
    print(torch.cuda.get_device_name())
    if args.profile_chunk:
        profile_mixed(args.model, args.profile_chunk)
        return
    if not args.skip_launch_costs:
        launch_costs()
    mixed_steps(args.model, args.chunks, piecewise=args.piecewise)


if __name__ == "__main__":
    main()
