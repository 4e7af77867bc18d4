"""Where prefill and decode steps spend their GPU time.

Builds the engine in-process (dummy weights), times a prefill of
``--prompt-len`` tokens (CUDA events, median of repeats) and prints
torch.profiler's CUDA-kernel table for one prefill; with ``--decode-batch B``
it then profiles ``--decode-steps`` decode steps of B such prompts (CUDA-graph
replays included) and prints the kernel table per step.
Usage (GPU): python benchmarks/profile_step.py --model Llama-3.1-8B [--decode-batch 4]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from ember import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="Llama-3.1-8B")
    p.add_argument("--prompt-len", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--decode-batch", type=int, default=0)
    p.add_argument("--decode-steps", type=int, default=50)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, max_num_batched_tokens=args.budget,
              enable_prefix_caching=False)
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
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
        profile_decode(llm, prompt, args.decode_batch, args.decode_steps)


def profile_decode(llm: LLM, prompt: list[int], batch: int, steps: int) -> None:
    """Kernel table of ``steps`` decode steps at batch ``batch`` (after their prefill)."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"d{i}", [t + i for t in prompt], params, prompt_token_ids=[t + i for t in prompt])
    while any(len(r.output_token_ids) < 4 for r in engine.engine_core.scheduler.running) or \
            engine.engine_core.scheduler.waiting:
        engine.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(steps):
            engine.step()
        end.record()
        torch.cuda.synchronize()
    print(f"decode batch {batch}: {start.elapsed_time(end) / steps:.3f} ms per step (wall, under the profiler)")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60)
    print(table)
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    print(f"kernel time per step: {total_us / steps / 1000:.3f} ms")
    while engine.has_unfinished_requests():
        engine.step()


if __name__ == "__main__":
    main()
