"""Asynchronous scheduling end to end (a tiny Qwen3-shaped model with dummy
weights, float32; on CPU, or on CUDA with its graphs where there is one): the same tokens, finish reasons and log-probabilities as
synchronous scheduling, under stop tokens, length limits, seeded sampling,
``n``, penalties (which turn it off for their steps), shared prefixes,
preemption and aborts; and no KV block is left behind. The reference is the
synchronous engine, whose outputs the rest of the suite checks against HF."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ember import SamplingParams
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from ember.engine.step_stats import StepTimes
from ember.sampling_params import RequestOutputKind

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16}
# Token-id prompts (no tokenizer needed), sharing prefixes of various lengths.
PROMPTS = [[1000 + 37 * i % 5000 for i in range(n)] for n in (5, 9, 23, 14, 1)]
PROMPTS += [PROMPTS[1] + [77, 78, 79], PROMPTS[0] + [5, 6, 7, 8, 9, 10]]


def make_engine(async_scheduling: bool, **overrides) -> LLMEngine:
    args = {"model": "Qwen3-8B", "load_format": "dummy", "hf_overrides": TINY, "max_model_len": 256,
            "kv_cache_memory": 8 << 20, "skip_tokenizer_init": True, "max_num_batched_tokens": 32,
            "max_num_seqs": 4, "dtype": "float32", "async_scheduling": async_scheduling, **overrides}
    engine = LLMEngine.from_engine_args(EngineArgs(**args))
    engine.step_times = StepTimes()
    engine.engine_core.add_step_observer(engine.step_times)
    return engine


def run(engine: LLMEngine, params: list[SamplingParams], abort_at: dict[str, int] | None = None) -> dict:
    """Submit PROMPTS (one every other step), step to the end; abort request
    ``rid`` once it has ``abort_at[rid]`` output tokens. Returns {request id:
    [(tokens, finish reason, logprobs) per completion]}.

    NOTE: asynchronous scheduling admits a request one step later (the step
    in flight was launched before it arrived), hence aborts by progress, not
    by step number."""
    abort_at = dict(abort_at or {})
    pending = list(enumerate(zip(PROMPTS, params)))
    results, step = {}, 0
    scheduler = engine.engine_core.scheduler
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            i, (prompt, p) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, p)
        for rid, at in list(abort_at.items()):
            req = scheduler.requests.get(rid)
            if req is not None and req.num_output_tokens >= at:
                del abort_at[rid]
                for out in engine.abort_requests([rid]):
                    results[out.request_id] = out
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out
        step += 1
    return {rid: [(c.token_ids, c.finish_reason, c.logprobs) for c in out.outputs]
            for rid, out in results.items()}


def final(**kw) -> SamplingParams:
    return SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY, **kw)


def compare(params_for: Callable[[dict | None], list[SamplingParams]], abort_at: dict[str, int] | None = None,
            **overrides) -> tuple[dict, LLMEngine]:
    """Run sync, then async with params that may depend on the sync outputs;
    check equal outputs and a clean KV pool; returns (outputs, async engine)."""
    outputs, engines = [], []
    for a in (False, True):
        engine = make_engine(a, **overrides)
        outputs.append(run(engine, params_for(outputs[0] if outputs else None), abort_at))
        engines.append(engine)
    for engine in engines:
        assert engine.engine_core.scheduler.kv_cache_manager.usage == 0
        engine.shutdown()
    assert outputs[1] == outputs[0]
    return outputs[0], engines[1]


def test_same_tokens_as_sync_with_stops_lengths_seeds_n_logprobs() -> None:
    probe = make_engine(False)
    base = run(probe, [final(temperature=0, max_tokens=40, ignore_eos=True)] * len(PROMPTS))
    probe.shutdown()

    def params(_: dict | None) -> list[SamplingParams]:
        # Stop tokens taken from the greedy outputs end requests early, at various steps.
        stop = [base[f"r{i}"][0][0][3 + 2 * i] for i in range(len(PROMPTS))]
        return [
            final(temperature=0, max_tokens=40, stop_token_ids=[stop[0]]),
            final(temperature=0, max_tokens=1),
            final(temperature=0.9, seed=11, max_tokens=30, logprobs=3),
            final(temperature=0.7, top_k=20, top_p=0.9, seed=3, n=2, max_tokens=25),
            final(temperature=0, max_tokens=40, stop_token_ids=[stop[4]], logprobs=1),
            final(temperature=0, max_tokens=17, ignore_eos=True),
            final(temperature=0, max_tokens=40, stop_token_ids=[stop[6]]),
        ]

    out, engine = compare(params)
    assert {out[f"r{i}"][0][1] for i in (0, 4, 6)} == {"stop"} and out["r1"][0][1] == "length"
    assert len(out["r3"]) == 2 and out["r2"][0][2] is not None
    steps = engine.step_times
    assert steps.num_steps_ahead > steps.num_steps // 3, (steps.num_steps_ahead, steps.num_steps)


def test_penalties_turn_it_off_for_their_steps_only() -> None:
    def params(_: dict | None) -> list[SamplingParams]:
        ps = [final(temperature=0, max_tokens=12, ignore_eos=True) for _ in PROMPTS]
        ps[2] = final(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.5, presence_penalty=0.5)
        return ps

    _, engine = compare(params)
    assert engine.step_times.num_steps_ahead > 0


@pytest.mark.parametrize("preemption_mode,policy", [("recompute", "fcfs"), ("swap", "fcfs"),
                                                     ("recompute", "priority")])
def test_preemption_and_aborts(preemption_mode: str, policy: str) -> None:
    # 12 blocks of 16 tokens for up to 4 requests of up to ~70 tokens each: preemptions.
    def params(_: dict | None) -> list[SamplingParams]:
        return [final(temperature=0, max_tokens=60, ignore_eos=True) for _ in PROMPTS]

    out, engine = compare(params, abort_at={"r1": 5, "r5": 20}, num_gpu_blocks_override=12, kv_cache_memory=None,
                          max_model_len=128, preemption_mode=preemption_mode, scheduling_policy=policy,
                          swap_space=1 << 20)
    assert out["r1"][0][1] == "abort" and out["r5"][0][1] == "abort"
    stats = engine.engine_core.get_stats()
    assert stats.num_preemptions > 0 and (stats.num_swap_outs > 0) == (preemption_mode == "swap")
    assert engine.step_times.num_steps_ahead > 0


@pytest.mark.parametrize("caching", [True, False])
def test_shared_prefixes(caching: bool) -> None:
    def params(_: dict | None) -> list[SamplingParams]:
        return [final(temperature=0, max_tokens=35, ignore_eos=True, n=2) for _ in PROMPTS]

    compare(params, enable_prefix_caching=caching, block_size=4)


def test_request_id_reused_right_after_an_abort() -> None:
    params = final(temperature=0, max_tokens=12, ignore_eos=True)
    alone = make_engine(False)
    want = run(alone, [params])["r0"]  # PROMPTS[0] alone
    alone.shutdown()
    engine = make_engine(True)
    engine.add_request("x", PROMPTS[2], params)
    engine.add_request("y", PROMPTS[3], params)
    for _ in range(4):
        engine.step()
    assert engine.engine_core._in_flight is not None  # x has a step in flight
    engine.abort_requests(["x"])
    engine.add_request("x", PROMPTS[0], params)  # the same id, another prompt
    finals = {}
    while engine.has_unfinished_requests():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    got = [(c.token_ids, c.finish_reason, c.logprobs) for c in finals["x"].outputs]
    assert got == want
    engine.shutdown()
