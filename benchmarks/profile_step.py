"""Where prefill and decode steps spend their GPU time.

Builds the engine in-process (dummy weights), times a prefill of
``--prompt-len`` tokens (CUDA events, median of repeats) and prints
torch.profiler's CUDA-kernel table for one prefill; with ``--decode-batch B``
it then profiles ``--decode-steps`` decode steps of B such prompts (CUDA-graph
replays included) and prints the kernel table per step. ``--hf-overrides``,
``--quantization``, ``--kv-cache-dtype`` and ``--speculative-config`` take the engine's JSON and
names; ``--prompt-len`` 0 skips the prefill part.
Usage (GPU): python benchmarks/profile_step.py --model Llama-3.1-8B [--decode-batch 4]
    python benchmarks/profile_step.py --model DeepSeek-V3 --hf-overrides '{"num_hidden_layers": 4}' \
        --prompt-len 0 --decode-batch 1
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ember import LLM, SamplingParams


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine options these profiling scripts share (see :func:`engine_kwargs`)."""
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--hf-overrides", default=None, help="JSON, as the engine's --hf-overrides")
    p.add_argument("--quantization", default=None)
    p.add_argument("--kv-cache-dtype", default=None, help="as the engine's --kv-cache-dtype (e.g. fp8)")
    p.add_argument("--speculative-config", default=None, help="JSON, as the engine's --speculative-config")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The ``LLM`` keyword arguments of :func:`add_engine_args`' options that were given."""
    extra = {}
    for name in ("hf_overrides", "speculative_config"):
        if getattr(args, name):
            extra[name] = json.loads(getattr(args, name))
    for name in ("quantization", "kv_cache_dtype"):
        if getattr(args, name):
            extra[name] = getattr(args, name)
    return extra


def main() -> None:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=0)
    p.add_argument("--decode-steps", type=int, default=50)
    p.add_argument("--host-table", action="store_true", help="also print the decode steps' host-time table")
    args = p.parse_args()
    extra = engine_kwargs(args)
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, max_num_batched_tokens=args.budget,
              enable_prefix_caching=False, **extra)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    if not args.prompt_len:
        profile_decode(llm, list(range(1000, 1128)), args.decode_batch or 1, args.decode_steps, args.host_table)
        return
    prompt = list(range(1000, 1000 + args.prompt_len))
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)

    def prefill_ms() -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        llm.generate([prompt], params, use_tqdm=False)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    prefill_ms()
    times = [prefill_ms() for _ in range(args.repeats)]
    print(f"prefill {args.prompt_len} tokens (whole request, wall on CUDA events): median "
          f"{statistics.median(times):.2f} ms, all {[round(t, 2) for t in times]}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    print(f"runner prepare_s total {runner.prepare_s:.3f}")
    if args.decode_batch:
        profile_decode(llm, prompt, args.decode_batch, args.decode_steps, args.host_table)


def profile_decode(llm: LLM, prompt: list[int], batch: int, steps: int, host_table: bool = False) -> None:
    """Kernel table of ``steps`` decode steps at batch ``batch`` (after their
    prefill); with ``host_table`` also the host-time table of the operators."""
    engine = llm.llm_engine
    # Enough tokens that the first requests are still decoding when the last
    # one's prompt is done (the prompts prefill a token budget at a time).
    budget = engine.engine_core.config.scheduler_config.max_num_batched_tokens
    params = SamplingParams(temperature=0, max_tokens=steps + 8 + batch * len(prompt) // budget + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{i}", [t + i for t in prompt], params, prompt_token_ids=[t + i for t in prompt])
    scheduler = engine.engine_core.scheduler
    while scheduler.waiting or any(len(r.output_token_ids) < 4 for r in scheduler.running):
        engine.step()
    assert len(scheduler.running) == batch, f"{len(scheduler.running)} of {batch} requests decoding"
    torch.cuda.synchronize()
    proposer = engine.engine_core.executor.worker.model_runner.draft_proposer
    propose_s = proposer.propose_s if proposer is not None else 0.0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    activities = [torch.profiler.ProfilerActivity.CUDA]
    if host_table:
        activities.append(torch.profiler.ProfilerActivity.CPU)
    with torch.profiler.profile(activities=activities) as prof:
        start.record()
        for _ in range(steps):
            engine.step()
        end.record()
        torch.cuda.synchronize()
    print(f"decode batch {batch}: {start.elapsed_time(end) / steps:.3f} ms per step (wall, under the profiler)")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60)
    print(table)
    if host_table:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    print(f"kernel time per step: {total_us / steps / 1000:.3f} ms")
    if proposer is not None:
        print(f"proposer host wall time per step: {(proposer.propose_s - propose_s) * 1000 / steps:.3f} ms")
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
