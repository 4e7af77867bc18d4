"""Continuous batching on the bundled SmolLM2: the same prompts, arriving at
different steps, chunked (small token budget) and preempted (small KV cache),
give exactly the tokens each gives alone; no block leaks."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams
from ember.engine.llm_engine import LLMEngine
from ember.engine.arg_utils import EngineArgs
from tests.models.prompts import CHAT_PROMPTS, RAW_PROMPTS

pytestmark = pytest.mark.slow
NUM_NEW = 48


def run_staggered(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, every: int = 2
                  ) -> tuple[dict[str, list[int]], bool]:
    """Outputs by request id ("p<i>") with a new prompt every ``every``
    steps; whether some step ran a chunked prefill. Checks that every block
    is free and no request is left afterwards."""
    results, pending, step, chunked = {}, list(enumerate(prompts)), 0, False
    scheduler = engine.engine_core.scheduler
    while pending or engine.has_unfinished_requests():
        if pending and step % every == 0:
            i, p = pending.pop(0)
            engine.add_request(f"p{i}", p, params, prompt_token_ids=p)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        chunked |= any(0 < r.num_computed_tokens < r.num_prompt_tokens for r in scheduler.running)
        step += 1
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks and not scheduler.requests
    return results, chunked


@pytest.fixture(scope="module")
def prompts_and_alone(smollm2_path):
    llm = LLM(smollm2_path, max_model_len=1024, kv_cache_memory=64 << 20)
    ip = llm.llm_engine.input_processor
    prompts = [ip.tokenize(p) for p in RAW_PROMPTS] + [ip.apply_chat_template(m) for m in CHAT_PROMPTS]
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return prompts, alone


def test_staggered_chunked_preempted_equals_alone(smollm2_path, prompts_and_alone):
    prompts, alone = prompts_and_alone
    block_size = 16
    # Room for the longest request plus a little: far too small for all at once.
    longest = max(len(p) for p in prompts) + NUM_NEW
    num_blocks = -(-longest // block_size) + 8
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=smollm2_path, max_model_len=longest + 16, block_size=block_size,
        num_gpu_blocks_override=num_blocks, max_num_batched_tokens=64, max_num_seqs=8))
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    results, chunked = run_staggered(engine, prompts, params, every=3)  # one new arrival every third step
    scheduler = engine.engine_core.scheduler
    assert chunked, "the token budget should have split a prefill"
    assert scheduler.num_preemptions_total > 0, "the small KV cache should have forced preemption"
    for i in range(len(prompts)):
        assert results[f"p{i}"] == alone[i], f"prompt {i} differs from its solo run"
    pool = scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert not scheduler.requests and not engine.output_processor.states


def test_seeded_sampling_reproducible_across_batches(smollm2_path, prompts_and_alone):
    prompts, _ = prompts_and_alone
    llm = LLM(smollm2_path, max_model_len=1024, kv_cache_memory=64 << 20)
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24)
    target = prompts[4]
    alone = llm.generate([target], seeded, use_tqdm=False)[0].outputs[0]
    again = llm.generate([target], seeded, use_tqdm=False)[0].outputs[0]
    unseeded = SamplingParams(temperature=1.0, max_tokens=24)
    mixed = llm.generate([prompts[0], target, prompts[2]], [unseeded, seeded, unseeded], use_tqdm=False)
    assert alone.text == again.text == mixed[1].outputs[0].text
    assert alone.token_ids == mixed[1].outputs[0].token_ids
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_tokens=24)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone.token_ids
