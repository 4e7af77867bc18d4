"""Beam search (``ember.beam_search``, ``LLM.beam_search``).

- The search's step rule, finishing and scoring on hand-made log-probabilities;
  parameter validation.
- On the bundled SmolLM2 (float32): width 1 equals greedy decoding; width 4
  returns 4 distinct sequences whose tokens, cumulative log-probabilities and
  order equal a plain-PyTorch beam search over HF transformers' model on the same
  GGUF weights (full recompute each step, float32); the beams of a step share the
  prompt's KV blocks (one block id, ``ref_cnt`` = width) and the prompt is
  computed once.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from ember import LLM, SamplingParams
from ember.beam_search import BeamSearch, BeamSearchParams, beam_score
from ember.outputs import SampleLogprob
from tests.engine.beam_reference import reference_beam_search
from tests.models.prompts import LONG_TEXT
from tests.models.tiny import load_hf_gguf

EOS = 0


def _entry(top: list[tuple[int, float]]) -> SampleLogprob:
    return SampleLogprob(top[0][0], top[0][1], 1, top)


# ------------------------------------------------------------ the algorithm

def test_step_keeps_the_best_width_of_all_candidates_and_finishes_stop_tokens():
    search = BeamSearch([5, 6], BeamSearchParams(beam_width=2, max_tokens=3, logprobs=1), frozenset({EOS}), 100)
    assert search.step_prompts() == [[5, 6]]
    search.advance([_entry([(10, -0.1), (EOS, -0.5), (11, -2.0), (12, -3.0)])])
    # EOS is among the best two: that beam finishes, one stays live.
    assert search.step_prompts() == [[5, 6, 10]]
    assert [(b.token_ids, b.stopped, b.stop_reason) for b in search.finished] == [([EOS], True, None)]
    search.advance([_entry([(20, -0.2), (21, -0.3), (EOS, -4.0), (22, -5.0)])])
    assert search.step_prompts() == [[5, 6, 10, 20], [5, 6, 10, 21]]
    search.advance([_entry([(30, -1.0), (31, -1.5), (32, -2.0), (33, -2.5)]),
                    _entry([(40, -0.1), (EOS, -0.2), (41, -3.0), (42, -4.0)])])
    assert search.done  # max_tokens reached
    seqs = search.result(None)
    assert len(seqs) == 2
    # Finished: [EOS] (score -0.5 / 1), [10, 21, 40] (-0.5 / 3) and [10, 21, EOS] (-0.6 / 2: the
    # stop token does not count); no [10, 20, ...] candidate made the last step's best two.
    assert [s.token_ids for s in seqs] == [[10, 21, 40], [10, 21, EOS]]
    assert seqs[0].cum_logprob == pytest.approx(-0.5) and seqs[0].score == pytest.approx(-0.5 / 3)
    assert seqs[0].finish_reason == "length" and seqs[0].stop_reason is None
    assert seqs[1].finish_reason == "stop" and seqs[1].stop_reason is None  # EOS, as the engine reports it
    assert seqs[1].score == pytest.approx(-0.6 / 2)
    assert [e.token_id for e in seqs[1].logprobs] == [10, 21, EOS]
    assert [e.rank for e in seqs[1].logprobs] == [1, 2, 2]
    assert seqs[1].logprobs[2].top == [(40, -0.1)]
    assert seqs[0].tokens == [5, 6, 10, 21, 40]


def test_length_penalty_and_ties():
    assert beam_score(-6.0, 3, False, 1.0) == -2.0
    assert beam_score(-6.0, 4, True, 1.0) == -2.0  # the stop token is not counted
    assert beam_score(-6.0, 4, False, 0.0) == -6.0
    assert beam_score(-1.0, 1, True, 2.0) == -1.0  # a lone stop token counts as length 1
    # Equal cumulative log-probabilities: the earlier beam, then the more likely token.
    search = BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=2), frozenset(), 100)
    search.advance([_entry([(7, -1.0), (8, -1.0), (9, -2.0), (6, -3.0)])])
    assert search.step_prompts() == [[1, 7], [1, 8]]
    search.advance([_entry([(3, -1.0), (4, -1.0), (5, -5.0), (6, -6.0)]),
                    _entry([(3, -1.0), (4, -1.0), (5, -5.0), (6, -6.0)])])
    assert [s.token_ids for s in search.result(None)] == [[7, 3], [7, 4]]


def test_ignore_eos_stop_token_ids_and_context_window():
    params = BeamSearchParams(beam_width=1, max_tokens=50, ignore_eos=True, stop_token_ids=[9])
    search = BeamSearch([1, 2, 3], params, frozenset({EOS}), max_model_len=6)
    assert search.max_tokens == 3
    search.advance([_entry([(EOS, -0.1), (4, -2.0)])])
    assert not search.done
    search.advance([_entry([(9, -0.1), (4, -2.0)])])
    (seq,) = search.result(None)
    assert seq.token_ids == [EOS, 9] and seq.finish_reason == "stop" and seq.stop_reason == 9
    with pytest.raises(ValueError, match="no room"):
        BeamSearch([1] * 6, params, frozenset(), max_model_len=6)
    search = BeamSearch([1], BeamSearchParams(beam_width=2, max_tokens=4), frozenset(), 100)
    with pytest.raises(ValueError, match="4 most likely"):
        search.advance([_entry([(2, -1.0), (3, -2.0)])])


@pytest.mark.parametrize("kwargs, field", [
    (dict(beam_width=0), "beam_width"), (dict(beam_width=11), "beam_width"), (dict(beam_width=True), "beam_width"),
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=0.5), "temperature"),
    (dict(length_penalty=math.inf), "length_penalty"), (dict(length_penalty="1"), "length_penalty"),
    (dict(logprobs=21), "logprobs"),
])
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} "):
        BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kwargs})


def test_step_requests_ask_for_twice_the_width():
    p = BeamSearchParams(beam_width=10, max_tokens=4, logprobs=3).step_sampling_params()
    assert (p.max_tokens, p.greedy, p.logprobs) == (1, True, 20)
    assert BeamSearchParams(beam_width=2, max_tokens=4, logprobs=7).step_sampling_params().logprobs == 7


def test_a_failing_step_request_cancels_its_siblings():
    from ember.engine.async_llm import gather_or_cancel

    ended = []

    async def step_request(i: int, fail: bool) -> int:
        try:
            await asyncio.sleep(0 if fail else 60)
            if fail:
                raise ValueError("rejected")
            return i
        finally:
            ended.append(i)  # where AsyncLLM.generate aborts its engine request

    async def main() -> None:
        assert await gather_or_cancel([step_request(i, False) for i in range(0)]) == []
        with pytest.raises(ValueError, match="rejected"):
            await gather_or_cancel([step_request(0, False), step_request(1, True), step_request(2, False)])
        # Every sibling has ended (cancelled) by the time the error reaches the caller.
        assert sorted(ended) == [0, 1, 2]

    asyncio.run(asyncio.wait_for(main(), 10))


# ------------------------------------------------------------- on the model

@pytest.fixture(scope="module")
def _one_thread(one_torch_thread):
    """The model tests run with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def llm(smollm2_path, _one_thread):
    return LLM(smollm2_path, dtype="float32", max_model_len=512, block_size=16, kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def hf(smollm2_path, _one_thread):
    return load_hf_gguf(smollm2_path)


@pytest.mark.slow
def test_width_one_equals_greedy(llm):
    chat = llm.llm_engine.input_processor.apply_chat_template([{"role": "user", "content": "What is 2 + 2?"}])
    for prompt, max_tokens in (("The capital of France is", 12), (chat, 40)):
        greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)[0]
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        (beam,) = llm.beam_search([{key: prompt}], BeamSearchParams(beam_width=1, max_tokens=max_tokens))
        (seq,) = beam.sequences
        g = greedy.outputs[0]
        assert seq.token_ids == g.token_ids and seq.text == g.text
        assert (seq.finish_reason, seq.stop_reason) == (g.finish_reason, g.stop_reason)
    assert g.finish_reason == "stop"  # the chat answer ended on EOS within the budget


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ignore_eos", "eos"])
def test_width_four_equals_reference_beam_search(llm, hf, case):
    tok = llm.get_tokenizer()
    ip = llm.llm_engine.input_processor
    if case == "ignore_eos":
        prompt, params = ip.tokenize("The best thing about living by the sea is"), BeamSearchParams(
            beam_width=4, max_tokens=6, ignore_eos=True)
    else:
        prompt = ip.apply_chat_template([{"role": "user", "content": "Say hi."}])
        params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=0.5, logprobs=2)
    (out,) = llm.beam_search([prompt], params)
    stop_ids = set() if params.ignore_eos else set(ip.eos_token_ids)
    ref, gap = reference_beam_search(hf, prompt, 4, params.max_tokens, stop_ids, params.length_penalty)
    assert gap > 1e-3, "the reference's cut is a near tie: pick another prompt"
    seqs = out.sequences
    assert out.prompt_token_ids == prompt and len(seqs) == 4
    assert len({tuple(s.token_ids) for s in seqs}) == 4
    assert [s.token_ids for s in seqs] == [r.token_ids for r in ref]
    for s, r in zip(seqs, ref):
        assert s.cum_logprob == pytest.approx(r.cum_logprob, abs=1e-3)
        assert s.score == pytest.approx(r.score, abs=1e-3)
        assert s.finish_reason == r.finish_reason
        stop = r.finish_reason == "stop"
        assert s.text == tok.decode(s.token_ids[:-1] if stop else s.token_ids, skip_special_tokens=True)
    assert [s.score for s in seqs] == sorted((s.score for s in seqs), reverse=True)
    if case == "eos":
        assert any(s.finish_reason == "stop" for s in seqs)
        for s in seqs:  # per-token log-probabilities add up to the cumulative one
            assert [e.token_id for e in s.logprobs] == s.token_ids
            assert sum(e.logprob for e in s.logprobs) == pytest.approx(s.cum_logprob, abs=1e-9)
            assert all(len(e.top) == 2 for e in s.logprobs)
    else:  # equal lengths: the score order is the cumulative log-probability order
        assert [s.cum_logprob for s in seqs] == sorted((s.cum_logprob for s in seqs), reverse=True)


@pytest.mark.slow
def test_beams_share_the_prompt_blocks(llm):
    engine = llm.llm_engine
    core = engine.engine_core
    scheduler, pool = core.scheduler, core.scheduler.kv_cache_manager.block_pool
    prompt = engine.input_processor.tokenize("Beam sharing test. " + LONG_TEXT[:300])  # never seen before
    num_full = (len(prompt) - 1) // 16
    assert num_full >= 3 and len(prompt) % 16 != 0
    width, max_tokens = 4, 5
    steps = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        if out.scheduled_new_reqs:
            steps.append((out.total_num_scheduled_tokens,
                          [(r.block_ids, [pool.blocks[b].ref_cnt for b in r.block_ids])
                           for r in out.scheduled_new_reqs]))
        return out

    scheduler.schedule = recording_schedule
    try:
        (out,) = llm.beam_search([prompt], BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                                            ignore_eos=True))
    finally:
        del scheduler.schedule
    assert len(out.sequences) == width
    assert len(steps) == max_tokens
    # Step 1: one request computes the whole prompt.
    first_tokens, [(first_blocks, _)] = steps[0]
    assert first_tokens == len(prompt)
    prompt_blocks = first_blocks[:num_full]
    for t, (num_tokens, reqs) in enumerate(steps[1:], 1):
        assert len(reqs) == width
        length = len(prompt) + t
        shared = (length - 1) // 16
        # Each beam computes only the tokens past the full blocks it shares.
        assert num_tokens == width * (length - shared * 16)
        for block_ids, ref_cnts in reqs:
            assert block_ids[:num_full] == prompt_blocks  # the prompt's blocks, not copies
            assert ref_cnts[:num_full] == [width] * num_full  # held by every beam of the step
            assert len(block_ids) == shared + 1  # one block of its own


@pytest.mark.slow
def test_without_prefix_caching_same_result_with_full_recompute(llm, smollm2_path):
    prompt = llm.llm_engine.input_processor.tokenize("Beam search without a prefix cache. " + LONG_TEXT[:120])
    params = BeamSearchParams(beam_width=3, max_tokens=4, ignore_eos=True)
    (cached,) = llm.beam_search([prompt], params)
    plain = LLM(smollm2_path, dtype="float32", max_model_len=512, block_size=16, kv_cache_memory=64 << 20,
                enable_prefix_caching=False)
    scheduler = plain.llm_engine.engine_core.scheduler
    computed = []
    schedule = scheduler.schedule

    def recording_schedule():
        out = schedule()
        computed.append(out.total_num_scheduled_tokens)
        return out

    scheduler.schedule = recording_schedule
    (uncached,) = plain.beam_search([prompt], params)
    assert [s.token_ids for s in uncached.sequences] == [s.token_ids for s in cached.sequences]
    for a, b in zip(uncached.sequences, cached.sequences):
        assert a.cum_logprob == pytest.approx(b.cum_logprob, abs=1e-4)
    # Each step recomputes every beam from its first token.
    assert computed == [len(prompt)] + [3 * (len(prompt) + t) for t in range(1, 4)]
