"""Greedy decoding with n-gram speculation gives exactly the tokens of greedy
decoding without it, on both bundled models, for each prompt alone and for
all of them batched with staggered arrivals, chunked prefill and preemption
forced; plus acceptance, seeded sampling, penalties and logprobs with drafts."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from tests.engine.test_batching import run_staggered

pytestmark = pytest.mark.slow

NUM_NEW = 24
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PROMPTS = [
    "Repeat this line three times: the quick brown fox jumps over the lazy dog. the quick brown fox",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "The capital of France is",
    "A B C D E F G A B C D E F G A B C",
    "Write a haiku about the sea.",
    "red green blue red green blue red green",
    "Question: what is 2 + 2? Answer:",
]


def _tokenize(llm: LLM) -> list[list[int]]:
    return [llm.llm_engine.input_processor.tokenize(p) for p in PROMPTS]


def _staggered(model: str, prompts: list[list[int]], params: SamplingParams, spec: dict | None,
               async_scheduling: bool = False) -> tuple[dict[str, list[int]], LLMEngine, bool]:
    block_size = 16
    longest = max(len(p) for p in prompts) + NUM_NEW + SPEC["num_speculative_tokens"]
    num_blocks = -(-longest // block_size) + 6  # far too few for all at once: preemption
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, max_model_len=longest + 16, block_size=block_size, num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=24, max_num_seqs=8, speculative_config=spec, async_scheduling=async_scheduling))
    results, chunked = run_staggered(engine, prompts, params)
    return results, engine, chunked


@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def model_and_reference(request, one_torch_thread):
    path = request.getfixturevalue(f"{request.param}_path")
    llm = LLM(path, max_model_len=512, kv_cache_memory=48 << 20)
    prompts = _tokenize(llm)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in llm.generate(
        prompts, params, use_tqdm=False)]
    return path, prompts, ref


def test_greedy_alone_equals_no_speculation(model_and_reference):
    path, prompts, ref = model_and_reference
    llm = LLM(path, max_model_len=512, kv_cache_memory=48 << 20, speculative_config=SPEC)
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    for p, want in zip(prompts, ref):
        got = llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want
    stats = llm.llm_engine.engine_core.scheduler.counters
    assert stats.spec_num_draft_tokens > 0
    assert stats.spec_num_accepted_tokens > 0, "repetitive prompts should get drafts accepted"


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_batched_chunked_preempted_equals_no_speculation(model_and_reference, async_scheduling):
    path, prompts, ref = model_and_reference
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    # With asynchronous scheduling, speculation also turns off and on as the
    # batch crosses disable_by_batch_size (steps scheduled ahead in between).
    spec = {**SPEC, "disable_by_batch_size": 3} if async_scheduling else SPEC
    results, engine, chunked = _staggered(path, prompts, params, spec, async_scheduling)
    sched = engine.engine_core.scheduler
    assert chunked and sched.num_preemptions_total > 0
    assert sched.counters.spec_num_accepted_tokens > 0
    for i, want in enumerate(ref):
        assert results[f"p{i}"] == want, f"prompt {i}"


def test_stop_token_and_max_tokens_inside_an_accepted_run(smollm2_path, one_torch_thread):
    # The counting prompt accepts whole runs of drafts; a stop token or the
    # length limit inside a run truncates it there.
    base = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 << 20)
    spec = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 << 20, speculative_config=SPEC)
    prompt = _tokenize(base)[1]
    ref = base.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop = ref[9]
    first = ref.index(stop)
    for params, want in [
        (SamplingParams(temperature=0, max_tokens=7, ignore_eos=True), ref[:7]),
        (SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop]), ref[: first + 1]),
    ]:
        out = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == want
    # A stop string completed inside an accepted run: same text and tokens.
    text = base.generate([prompt], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].text
    stop_str = text[len(text) // 2: len(text) // 2 + 2]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_str])
    want = base.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    got = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, "stop")
    assert len(got.token_ids) < 20
    assert spec.llm_engine.engine_core.scheduler.counters.spec_num_accepted_tokens > 0


def test_penalties_logprobs_and_seeded_sampling_with_drafts(smollm2_path, one_torch_thread):
    base = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 << 20)
    spec = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 << 20, speculative_config=SPEC)
    prompts = _tokenize(base)[:3]
    # Greedy with a penalty: each verified position sees the drafts before it.
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.2, logprobs=2)
    want = base.generate(prompts, params, use_tqdm=False)
    got = spec.generate(prompts, params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.outputs[0].logprobs) == len(w.outputs[0].logprobs) == 16
        for lw, lg in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
            assert (lg.token_id, lg.rank) == (lw.token_id, lw.rank)
            assert lg.logprob == pytest.approx(lw.logprob, abs=1e-3)
            assert [t for t, _ in lg.top] == [t for t, _ in lw.top]
    # Seeded sampling with drafts is reproducible.
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=16, ignore_eos=True, seed=7)
    a = [o.outputs[0].token_ids for o in spec.generate(prompts, seeded, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in spec.generate(prompts[::-1], seeded, use_tqdm=False)][::-1]
    assert a == b
