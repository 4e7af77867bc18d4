"""Where the device waits for the host in steady decode steps.

Runs one greedy batch (dummy weights) under torch.profiler with the engine's
host stages marked (``record_function`` around the scheduler, the runner's
launch/prepare/forward/collect, verification, the proposer's passes and the
output processor), exports the Chrome trace, and prints per decode step:

- the wall time, the device's busy time (union of kernels and copies) and its
  idle time;
- the idle time split by the innermost host stage that was running when each
  gap (> ``--min-gap-us``) began: what the device was waiting for;
- the CUDA runtime calls per step by name and stage (a long
  ``cudaStreamSynchronize``/``cudaEventSynchronize``/pageable copy is the host
  waiting for the device);
- the host time of each stage (inclusive) and the kernels' time by name.

Times are under the profiler (the host runs somewhat slower than without it).
Usage (GPU):
    python benchmarks/step_timeline.py --model Llama-3.1-8B \
        --speculative-config '{"method": "eagle3", "model": "Llama-3.1-8B-EAGLE3", "num_speculative_tokens": 3}'
    python benchmarks/step_timeline.py --model Llama-3.1-8B --quantization fp8 [--trace PATH]
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_step import add_engine_args, engine_kwargs  # noqa: E402  (the profiling scripts' engine options)

from ember import LLM, SamplingParams  # noqa: E402

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def mark(obj: object, name: str, label: str) -> None:
    """Wrap ``obj.name`` (a bound method or module function) in a profiler range ``label``."""
    fn = getattr(obj, name, None)
    if fn is None:
        return

    @functools.wraps(fn)
    def marked(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    setattr(obj, name, marked)


def mark_stages(llm: LLM) -> None:
    import ember.spec_decode.verify as verify

    engine = llm.llm_engine
    core = engine.engine_core
    runner = core.executor.worker.model_runner
    mark(engine, "step", "step")
    mark(engine.output_processor, "process_outputs", "output_processor")
    mark(core.scheduler, "schedule", "schedule")
    mark(core.scheduler, "update_from_output", "update_from_output")
    if core.drafter is not None:
        mark(core.drafter, "propose", "drafter.propose")
    for name in ("launch", "collect", "_prepare_spec_inputs", "_prepare_host_inputs", "_forward", "_sample"):
        mark(runner, name, f"runner.{name}")
    mark(verify, "launch_verification", "launch_verification")
    mark(verify.Verification, "finish", "verification.finish")
    proposer = runner.draft_proposer
    if proposer is not None:
        for name in ("launch_uniform", "finish_uniform", "propose", "_run_extend", "_forward_decode", "_draw"):
            mark(proposer, name, f"proposer.{name}")


def innermost(spans: list[tuple[float, float, str]], starts: list[float], t: float) -> str:
    """The latest-starting span that contains ``t`` (spans sorted by start)."""
    i = bisect.bisect_right(starts, t) - 1
    best = None
    for j in range(i, max(-1, i - 400), -1):
        s, e, name = spans[j]
        if s <= t < e:
            best = name
            break
    return best or "(none)"


def union_busy(intervals: list[tuple[float, float]], lo: float, hi: float) -> tuple[float, list[tuple[float, float]]]:
    """Busy time within [lo, hi) of sorted ``intervals`` and the gaps between them."""
    busy, gaps, cur = 0.0, [], lo
    for s, e in intervals:
        if e <= lo or s >= hi:
            continue
        s, e = max(s, lo), min(e, hi)
        if s > cur:
            gaps.append((cur, s))
        if e > cur:
            busy += e - max(s, cur)
            cur = e
    if cur < hi:
        gaps.append((cur, hi))
    return busy, gaps


def summarize(trace: dict, skip: int, min_gap_us: float, top: int) -> dict:
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") in GPU_CATS)
    spans = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "user_annotation")
    runtime = [e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")]
    starts = [s for s, _, _ in spans]
    steps = [(s, e) for s, e, n in spans if n == "step"]
    # A step's window runs from its start to the next step's start.
    windows = [(steps[i][0], steps[i + 1][0]) for i in range(len(steps) - 1)][skip:]
    if not windows:
        raise SystemExit("too few steps in the trace")
    lo, hi = windows[0][0], windows[-1][1]
    n = len(windows)
    busy, gaps = union_busy([(s, e) for s, e, _ in gpu], lo, hi)
    idle_by_stage: dict[str, float] = defaultdict(float)
    small = 0.0
    for s, e in gaps:
        if e - s < min_gap_us:
            small += e - s
            continue
        idle_by_stage[innermost(spans, starts, s)] += e - s
    calls: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for e in runtime:
        if lo <= e["ts"] < hi:
            c = calls[(e["name"], innermost(spans, starts, e["ts"]))]
            c[0] += 1
            c[1] += e["dur"]
    stage_time: dict[str, float] = defaultdict(float)
    for s, e, name in spans:
        if lo <= s < hi:
            stage_time[name] += e - s
    kernels: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for s, e, name in gpu:
        if lo <= s < hi:
            kernels[name][0] += 1
            kernels[name][1] += e - s
    ms = 1e-3 / n
    return {
        "steps": n,
        "step_ms": (hi - lo) * ms,
        "device_busy_ms": busy * ms,
        "device_idle_ms": (hi - lo - busy) * ms,
        "idle_in_small_gaps_ms": small * ms,
        "idle_by_host_stage_ms": dict(sorted(((k, v * ms) for k, v in idle_by_stage.items()), key=lambda kv: -kv[1])),
        "runtime_calls": [{"call": c, "stage": st, "per_step": cnt / n, "ms": d * ms}
                          for (c, st), (cnt, d) in sorted(calls.items(), key=lambda kv: -kv[1][1])[:top]],
        "host_stage_ms": dict(sorted(((k, v * ms) for k, v in stage_time.items()), key=lambda kv: -kv[1])),
        "kernels": [{"name": k[:90], "per_step": c / n, "ms": d * ms}
                    for k, (c, d) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_engine_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=96)
    p.add_argument("--skip-steps", type=int, default=16, help="steps at the start left out (prefill, warm-up)")
    p.add_argument("--min-gap-us", type=float, default=5.0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", default=None, help="also keep the Chrome trace here")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=args.prompt_len + args.output_len + 64,
              skip_tokenizer_init=True, enable_prefix_caching=False, **engine_kwargs(args))
    vocab = llm.llm_engine.engine_core.executor.worker.model_runner.model_config.vocab_size
    prompts = [[(1000 + 7 * b + i) % vocab for i in range(args.prompt_len)] for b in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    mark_stages(llm)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    path = args.trace or os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        summary = summarize(json.load(f), args.skip_steps, args.min_gap_us, args.top)
    summary["args"] = vars(args)
    summary["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps(summary, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
