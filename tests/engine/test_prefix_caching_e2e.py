"""Prefix caching, preemption and swap on the bundled SmolLM2: a shared-prefix
workload gives exactly the greedy tokens with caching on as with caching off,
whether requests arrive together or staggered, under eviction pressure with
chunked prefill and preemption by recompute, and with preemption by swap under
the priority policy. No block (device or host) leaks."""

from __future__ import annotations

import pytest

from ember import SamplingParams
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from tests.models.prompts import LONG_TEXT

pytestmark = pytest.mark.slow
NUM_NEW = 16
BLOCK_SIZE = 16
QUESTIONS = ["Who wrote this?", "Name one layer.", "What came first?", "Why does abstraction help?",
             "Give a date.", "Summarize it in five words."]
# 12 blocks (192 tokens): about 1.3 requests' worth without sharing, so blocks are
# evicted and requests preempted; a 64-token budget splits every prefill.
TIGHT = dict(num_gpu_blocks_override=12, max_model_len=192, max_num_batched_tokens=64, max_num_seqs=8)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def workload(smollm2_path):
    ref = _engine(smollm2_path, enable_prefix_caching=False, max_num_seqs=16)
    tok = ref.input_processor
    prefix = tok.tokenize(LONG_TEXT * 2)  # ~125 tokens: 7 full blocks shared by all
    prompts = [prefix + tok.tokenize(" " + q)[1:] for q in QUESTIONS]
    prompts += [prompts[0], prompts[3]]  # whole-prompt repeats: the last token is still computed
    prompts.append(tok.tokenize("The capital of France is"))  # shares nothing
    outputs, stats = _run(ref, prompts, stagger=0)
    assert stats.prefix_cache.queries == 0  # caching off: no lookups
    return prompts, outputs


def _engine(model: str, **kw) -> LLMEngine:
    args = dict(model=model, max_model_len=256, block_size=BLOCK_SIZE, kv_cache_memory=32 << 20)
    args.update(kw)
    return LLMEngine.from_engine_args(EngineArgs(**args))


def _run(engine: LLMEngine, prompts: list[list[int]], stagger: int, priorities: list[int] | None = None):
    """Add one prompt every ``stagger`` steps (all at once for 0); returns the
    output token ids in prompt order and the engine stats."""
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    pending = list(enumerate(prompts))
    results: dict[str, list[int]] = {}
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and (stagger == 0 or step % stagger == 0):
            i, p = pending.pop(0)
            engine.add_request(f"p{i}", p, params, prompt_token_ids=p, priority=priorities[i] if priorities else 0)
            if stagger:
                break
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    kv = engine.engine_core.scheduler.kv_cache_manager
    assert kv.block_pool.get_num_free_blocks() == kv.num_blocks
    assert all(b.ref_cnt == 0 for b in kv.block_pool.blocks)
    assert len(kv.free_host_blocks) == kv.num_host_blocks and not kv.req_to_host_blocks
    return [results[f"p{i}"] for i in range(len(prompts))], engine.get_stats()


def test_caching_on_equals_off_staggered(smollm2_path, workload):
    prompts, expected = workload
    engine = _engine(smollm2_path, max_num_seqs=16)
    outputs, stats = _run(engine, prompts, stagger=2)
    assert outputs == expected
    pc = stats.prefix_cache
    # Every prompt after the first reuses the 7 shared blocks; the repeats reuse 8.
    assert pc.hits >= 7 * BLOCK_SIZE * (len(prompts) - 2)
    assert stats.num_preemptions == 0


def test_caching_on_equals_off_under_eviction_and_recompute(smollm2_path, workload):
    prompts, expected = workload
    engine = _engine(smollm2_path, **TIGHT)
    outputs, stats = _run(engine, prompts, stagger=1)
    assert outputs == expected
    assert stats.prefix_cache.hits > 0
    assert stats.num_preemptions > 0 and stats.num_swap_outs == 0
    assert stats.num_evicted_blocks > 0


def test_caching_on_equals_off_with_swap_and_priorities(smollm2_path, workload):
    prompts, expected = workload
    # 16 MiB of swap space: 22 blocks, two requests' worth; a third victim is recomputed.
    engine = _engine(smollm2_path, **TIGHT, preemption_mode="swap", swap_space=16 << 20,
                     scheduling_policy="priority")
    priorities = [i % 3 for i in range(len(prompts))]
    outputs, stats = _run(engine, prompts, stagger=1, priorities=priorities)
    assert outputs == expected
    assert stats.num_swap_outs > 0 and stats.num_swap_ins == stats.num_swap_outs
    assert stats.prefix_cache.hits > 0
