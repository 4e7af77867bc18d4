"""``ember bench throughput --step-trace``: the engine's per-step records and
their summary."""

from __future__ import annotations

import pytest

from ember.entrypoints.bench.offline import summarize_step_trace
from ember.sampling_params import SamplingParams


def test_summary_splits_steps_by_kind_and_times_them_from_the_previous_collection() -> None:
    # (collect time, requests, decode tokens, prefill tokens, preemptions)
    trace = [(10.5, 2, 0, 200, 0),    # mixed: 0.5 s after the start
             (10.6, 4, 2, 100, 0),    # mixed: 0.1 s
             (10.7, 4, 4, 0, 0),      # full decode (4 >= 0.9 * 4): 0.1 s
             (11.0, 3, 3, 0, 1)]      # partial decode: 0.3 s, one preemption
    s = summarize_step_trace(trace, start=10.0, max_batch=4)
    assert s["trace_steps"] == 4 and s["trace_preemptions"] == 1
    assert s["trace_mixed_steps"] == 2 and s["trace_mixed_s"] == pytest.approx(0.6)
    assert s["trace_mixed_ms_per_step"] == pytest.approx(300.0)
    assert s["trace_mixed_mean_prefill_tokens"] == pytest.approx(150.0)
    assert s["trace_mixed_mean_decode"] == pytest.approx(1.0)
    assert s["trace_decode_full_steps"] == 1 and s["trace_decode_full_s"] == pytest.approx(0.1)
    assert s["trace_decode_partial_steps"] == 1 and s["trace_decode_partial_mean_decode"] == pytest.approx(3.0)
    assert s["trace_decode_partial_ms_per_step"] == pytest.approx(300.0)
    assert s["trace_mask_s"] == 0
    masked = summarize_step_trace([(*step, 0.002) for step in trace], start=10.0, max_batch=4)
    assert masked["trace_mask_s"] == pytest.approx(0.008)


def test_engine_records_one_entry_per_step_with_its_token_counts(smollm2_path, one_torch_thread) -> None:
    from ember.engine.llm import LLM

    from ember.engine.step_stats import StepTimes, StepTrace

    llm = LLM(model=smollm2_path, max_num_seqs=2, max_num_batched_tokens=64)
    core = llm.llm_engine.engine_core
    tracer, times = StepTrace(), StepTimes()
    core.add_step_observer(tracer)
    core.add_step_observer(times)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm.generate([[5] * 40, [6] * 40, [7] * 10], params, use_tqdm=False)
    trace = tracer.steps
    assert len(trace) == times.num_steps > 0
    times = [t for t, *_ in trace]
    assert times == sorted(times)
    # Every prompt token and every output token but the prompts' first is computed once.
    assert sum(p for _, _, _, p, *_ in trace) + sum(d for _, _, d, *_ in trace) == 90 + 3 * 2
    assert all(n <= 2 and d <= n for _, n, d, *_ in trace)
    assert all(s[5] == 0 for s in trace)  # no constrained request: no mask time
    assert trace[0][3] == 64 and trace[0][2] == 0  # the first step: one budget of prefill
