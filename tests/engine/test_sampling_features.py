"""n > 1, logprobs and penalties through the engine.

- OutputProcessor fan-out and aggregation (CUMULATIVE / DELTA / FINAL_ONLY,
  stop strings, aborts) on hand-made engine-core outputs, with the tokenizer's
  own ``decode`` as the text reference;
- on the bundled SmolLM2 (float32): logprobs against HF transformers'
  ``log_softmax`` of its logits on the same GGUF weights; n = 3 completions
  (seeded, greedy), prefix-cache sharing between siblings, streaming, aborts
  and a stop string that ends one sibling.
"""

from __future__ import annotations

import msgspec
import pytest
import torch

from ember import LLM, SamplingParams
from ember.core.sched_output import EngineCoreOutput
from ember.engine.output_processor import OutputProcessor
from ember.outputs import SampleLogprob
from ember.sampling_params import RequestOutputKind
from tests.models.prompts import LONG_TEXT
from tests.models.tiny import load_hf_gguf

pytestmark = pytest.mark.slow
PROMPT = "The three most useful things to pack for a long hike are"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see tests/conftest.py)."""


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", max_model_len=512, block_size=16, kv_cache_memory=64 << 20)


@pytest.fixture(scope="module")
def tokenizer(llm):
    return llm.get_tokenizer()


def _run(engine, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    """Add one request and step until it finishes; all its RequestOutputs."""
    engine.add_request(request_id, prompt, params, prompt_token_ids=prompt)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == request_id]
    return outs


# ------------------------------------------------------- OutputProcessor only

def _words(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _feed(tokenizer, kind: RequestOutputKind, logprobs: int | None = None):
    """Three completions of one request fed over four steps: 0 and 2 get tokens
    in steps 1, 2 and 4, 1 gets tokens in 1 and 3 and finishes in 3 (length); in
    step 4, 0 ends on EOS and 2 on its length. Returns the processor's outputs
    per step and the tokens each completion got."""
    eos = tokenizer.eos_token_id
    toks = {0: [_words(tokenizer, " alpha beta"), _words(tokenizer, " gamma"), None, [eos]],
            1: [_words(tokenizer, " red"), None, _words(tokenizer, " green blue"), None],
            2: [_words(tokenizer, " one"), _words(tokenizer, " two three"), None, _words(tokenizer, " four")]}
    finish = {(0, 3): "stop", (1, 2): "length", (2, 3): "length"}
    op = OutputProcessor(tokenizer)
    params = SamplingParams(n=3, seed=7, max_tokens=10, output_kind=kind, logprobs=logprobs)
    children = op.add_request("r", "p", [1, 2, 3], params, arrival_time=0.0)
    assert [c for c, _ in children] == ["0_r", "1_r", "2_r"]
    assert [(p.n, p.seed) for _, p in children] == [(1, 7), (1, 8), (1, 9)]
    per_step = []
    for step in range(4):
        outs = []
        for i in range(3):
            new = toks[i][step]
            if new is None:
                continue
            lps = None if logprobs is None else [SampleLogprob(t, -0.5, 2, []) for t in new]
            outs.append(EngineCoreOutput(f"{i}_r", new, finish.get((i, step)), None, lps))
        results, stopped = op.process_outputs(outs)
        assert stopped == []
        per_step.append(results)
    assert not op.states and not op.has_unfinished_requests()
    got = {i: [t for chunk in toks[i] if chunk for t in chunk] for i in range(3)}
    return per_step, got


def test_delta_reports_only_changed_completions(tokenizer):
    per_step, got = _feed(tokenizer, RequestOutputKind.DELTA, logprobs=1)
    assert all(len(step) == 1 for step in per_step)
    outs = [step[0] for step in per_step]
    assert [[c.index for c in o.outputs] for o in outs] == [[0, 1, 2], [0, 2], [1], [0, 2]]
    assert [o.finished for o in outs] == [False, False, False, True]
    text = {i: "" for i in range(3)}
    tokens = {i: [] for i in range(3)}
    for o in outs:
        for c in o.outputs:
            text[c.index] += c.text
            tokens[c.index] += c.token_ids
            assert len(c.logprobs) == len(c.token_ids)
            assert [lp.token_id for lp in c.logprobs] == c.token_ids
    for i in range(3):
        assert tokens[i] == got[i]
        assert text[i] == tokenizer.decode(got[i], skip_special_tokens=True)
    assert [c.finish_reason for c in outs[2].outputs] == ["length"]
    assert [c.finish_reason for c in outs[3].outputs] == ["stop", "length"]
    assert outs[3].metrics["num_generation_tokens"] == sum(len(t) for t in got.values())
    assert outs[3].metrics["finished_time"] >= outs[3].metrics["first_token_time"]


def test_cumulative_and_final_only(tokenizer):
    per_step, got = _feed(tokenizer, RequestOutputKind.CUMULATIVE)
    for step, results in enumerate(per_step):
        (out,) = results
        assert [c.index for c in out.outputs] == [0, 1, 2]
        assert out.finished == (step == 3)
        assert out.outputs[0].logprobs is None
    final = per_step[-1][0]
    assert [c.token_ids for c in final.outputs] == [got[0], got[1], got[2]]
    assert [c.finish_reason for c in final.outputs] == ["stop", "length", "length"]
    # Step 2 (index 1): completion 1 has its first chunk only, unfinished.
    assert per_step[1][0].outputs[1].token_ids == _words(tokenizer, " red")
    assert per_step[1][0].outputs[1].finish_reason is None

    per_step, got = _feed(tokenizer, RequestOutputKind.FINAL_ONLY)
    assert [len(r) for r in per_step] == [0, 0, 0, 1]
    final = per_step[-1][0]
    assert final.finished and [c.index for c in final.outputs] == [0, 1, 2]
    for c in final.outputs:
        assert c.text == tokenizer.decode(got[c.index], skip_special_tokens=True)


def test_stop_string_ends_one_child_and_abort_ends_the_rest(tokenizer):
    op = OutputProcessor(tokenizer)
    op.add_request("r", None, [1, 2], SamplingParams(n=3, stop=["three"], max_tokens=20), 0.0)
    outs, stopped = op.process_outputs([
        EngineCoreOutput("0_r", _words(tokenizer, " one two")),
        EngineCoreOutput("1_r", _words(tokenizer, " one two three four")),
        EngineCoreOutput("2_r", _words(tokenizer, " five")),
    ])
    assert stopped == ["1_r"]  # only that child is aborted in the core
    (out,) = outs
    assert [(c.finish_reason, c.stop_reason) for c in out.outputs] == [(None, None), ("stop", "three"), (None, None)]
    assert out.outputs[1].text == " one two "
    assert not out.finished
    # A late output of the stopped child (already in flight) is ignored.
    outs, stopped = op.process_outputs([EngineCoreOutput("1_r", _words(tokenizer, " more"))])
    assert outs == [] and stopped == []
    with pytest.raises(ValueError, match="already in use"):
        op.add_request("r", None, [1], SamplingParams(), 0.0)
    with pytest.raises(ValueError, match="already in use"):
        op.add_request("2_r", None, [1], SamplingParams(), 0.0)
    finals, engine_ids = op.abort_requests(["r", "unknown"])
    assert engine_ids == ["0_r", "2_r"]
    (final,) = finals
    assert final.finished
    assert [c.finish_reason for c in final.outputs] == ["abort", "stop", "abort"]
    assert not op.states and op.parent_request_id("0_r") is None
    assert op.abort_requests(["r"]) == ([], [])


# ------------------------------------------------------------- on the model

def _check_top(ours: list[tuple[int, float]], ref_lp: torch.Tensor, k: int) -> None:
    """Top-k ids equal HF's wherever HF's values are not (near-)tied; values within 1e-3."""
    ref_vals, ref_ids = ref_lp.topk(k + 1)
    assert len(ours) == k
    for j, (tok, lp) in enumerate(ours):
        assert abs(lp - ref_lp[tok].item()) < 1e-3
        gaps = [abs(ref_vals[j] - ref_vals[m]).item() for m in (j - 1, j + 1) if 0 <= m <= k]
        if min(gaps) > 1e-3:
            assert tok == ref_ids[j].item(), (j, ours, ref_ids.tolist())


def test_logprobs_match_hf(llm, smollm2_path, tokenizer):
    hf = load_hf_gguf(smollm2_path)
    prompt = llm.llm_engine.input_processor.apply_chat_template([{"role": "user", "content": "Name a planet."}])
    cases = [SamplingParams(temperature=0, max_tokens=8, logprobs=5, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=3, max_tokens=8, logprobs=3, ignore_eos=True)]
    outs = llm.generate([prompt, prompt], cases, use_tqdm=False)
    for params, out in zip(cases, outs):
        comp = out.outputs[0]
        assert len(comp.logprobs) == len(comp.token_ids) == 8
        ids = prompt + comp.token_ids
        with torch.inference_mode():
            logits = hf(input_ids=torch.tensor([ids])).logits[0].float()
        ref = logits[len(prompt) - 1: len(ids) - 1].log_softmax(dim=-1)
        for pos, (tok, lp) in enumerate(zip(comp.token_ids, comp.logprobs)):
            assert lp.token_id == tok
            assert abs(lp.logprob - ref[pos, tok].item()) < 1e-3
            ref_rank = 1 + int((ref[pos] > ref[pos, tok]).sum())
            near = int(((ref[pos] - ref[pos, tok]).abs() < 1e-3).sum()) - 1
            assert abs(lp.rank - ref_rank) <= near, (pos, lp.rank, ref_rank)
            if params.greedy:
                assert lp.rank == 1
            _check_top(lp.top, ref[pos], params.logprobs)
    # Plain values only (they cross processes as msgpack).
    lp = outs[0].outputs[0].logprobs[0]
    assert type(lp.logprob) is float and type(lp.rank) is int and all(type(t) is int for t, _ in lp.top)
    core_out = EngineCoreOutput("x", [lp.token_id], "stop", None, [lp])
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(core_out), type=EngineCoreOutput) == core_out


def test_n3_seeded_reproducible_and_equal_to_single_requests(llm, tokenizer):
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    first = llm.generate([PROMPT], params, use_tqdm=False)[0]
    again = llm.generate([PROMPT], params, use_tqdm=False)[0]
    assert first.finished and [c.index for c in first.outputs] == [0, 1, 2]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1, "different seeds should give different samples"
    singles = llm.generate([PROMPT] * 3, [SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12, ignore_eos=True)
                                         for i in range(3)], use_tqdm=False)
    for c, single in zip(first.outputs, singles):
        assert c.token_ids == single.outputs[0].token_ids
        assert c.text == single.outputs[0].text
    assert first.metrics["num_generation_tokens"] == 36


def test_greedy_n3_identical(llm):
    params = SamplingParams(n=3, temperature=0, max_tokens=10, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    single = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == single.outputs[0].token_ids for c in out.outputs)


def test_siblings_share_prompt_blocks(llm):
    engine = llm.llm_engine
    prompt = engine.input_processor.tokenize("Siblings test. " + LONG_TEXT)  # never seen before
    full_block_tokens = (len(prompt) - 1) // 16 * 16
    assert full_block_tokens >= 64
    before = llm.get_stats().prefix_cache
    _run(engine, "share", prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=2))
    after = llm.get_stats().prefix_cache
    assert after.queries - before.queries == 3 * len(prompt)
    # The first sibling computes the prompt; the other two take its full blocks.
    assert after.hits - before.hits == 2 * full_block_tokens


def test_delta_stream_adds_up_to_final_only(llm):
    engine = llm.llm_engine
    prompt = engine.input_processor.tokenize(PROMPT)
    base = dict(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    stream = _run(engine, "delta", prompt, SamplingParams(**base, output_kind=RequestOutputKind.DELTA, logprobs=1))
    final = _run(engine, "final", prompt, SamplingParams(**base, output_kind=RequestOutputKind.FINAL_ONLY))
    assert len(final) == 1 and final[0].finished
    assert [o.finished for o in stream] == [False] * (len(stream) - 1) + [True]
    tokens = {i: [] for i in range(3)}
    text = {i: "" for i in range(3)}
    for o in stream:
        indices = [c.index for c in o.outputs]
        assert len(set(indices)) == len(indices) and o.outputs
        for c in o.outputs:
            tokens[c.index] += c.token_ids
            text[c.index] += c.text
            assert [lp.token_id for lp in c.logprobs] == c.token_ids
    for c in final[0].outputs:
        assert tokens[c.index] == c.token_ids and text[c.index] == c.text


def test_abort_parent_frees_every_block(llm):
    engine = llm.llm_engine
    scheduler = engine.engine_core.scheduler
    prompt = engine.input_processor.tokenize(PROMPT)
    engine.add_request("abort-me", prompt, SamplingParams(n=3, temperature=1.0, max_tokens=100), prompt_token_ids=prompt)
    for _ in range(3):
        engine.step()
    assert sorted(scheduler.requests) == ["0_abort-me", "1_abort-me", "2_abort-me"]
    assert scheduler.kv_cache_manager.usage > 0
    (final,) = engine.abort_requests(["abort-me"])
    assert final.finished and [c.finish_reason for c in final.outputs] == ["abort"] * 3
    assert all(len(c.token_ids) == 3 for c in final.outputs)
    assert not scheduler.requests and not engine.has_unfinished_requests()
    assert scheduler.kv_cache_manager.usage == 0


def test_stop_string_ends_only_one_sibling(llm):
    engine = llm.llm_engine
    prompt = engine.input_processor.tokenize(PROMPT)
    base = dict(n=3, temperature=1.0, seed=42, max_tokens=16, ignore_eos=True,
                output_kind=RequestOutputKind.FINAL_ONLY)
    (free,) = _run(engine, "free", prompt, SamplingParams(**base))
    texts = [c.text for c in free.outputs]
    # A word of completion 1 (not its last) that the other two never write.
    words = texts[1].split()[:-1]
    stop = next(w for w in words if w not in texts[0] and w not in texts[2])
    (stopped,) = _run(engine, "stopped", prompt, SamplingParams(**base, stop=[stop]))
    one = stopped.outputs[1]
    assert (one.finish_reason, one.stop_reason) == ("stop", stop)
    assert one.text == texts[1][: texts[1].index(stop)]
    assert len(one.token_ids) < 16
    for i in (0, 2):
        assert stopped.outputs[i].token_ids == free.outputs[i].token_ids
        assert stopped.outputs[i].finish_reason == "length"
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0


def test_prompt_logprobs_match_hf(smollm2_path, tokenizer):
    """``prompt_logprobs``: every prompt token's log-probability, rank and top-k
    against HF's ``log_softmax``, with the prompt prefilled in chunks, after
    another request cached its prefix (the hit must not be taken), and n = 2."""
    hf = load_hf_gguf(smollm2_path)
    llm = LLM(smollm2_path, dtype="float32", max_model_len=512, block_size=16, kv_cache_memory=64 << 20,
              max_num_batched_tokens=32, max_num_seqs=4)
    prompt = tokenizer.encode(LONG_TEXT)[:90]
    llm.generate([prompt[:70]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # caches a prefix
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=4, logprobs=1, n=2, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    out, other = llm.generate([prompt, prompt[:50]], [params, plain], use_tqdm=False)
    assert other.prompt_logprobs is None
    plp = out.prompt_logprobs
    assert len(plp) == len(prompt) and plp[0] is None
    with torch.inference_mode():
        ref = hf(input_ids=torch.tensor([prompt])).logits[0].float().log_softmax(dim=-1)
    for pos in range(1, len(prompt)):
        lp, tok = plp[pos], prompt[pos]
        assert lp.token_id == tok
        assert abs(lp.logprob - ref[pos - 1, tok].item()) < 1e-3, pos
        ref_rank = 1 + int((ref[pos - 1] > ref[pos - 1, tok]).sum())
        near = int(((ref[pos - 1] - ref[pos - 1, tok]).abs() < 1e-3).sum()) - 1
        assert abs(lp.rank - ref_rank) <= near, (pos, lp.rank, ref_rank)
        _check_top(lp.top, ref[pos - 1], 4)
    # The generated tokens are unchanged by asking for prompt logprobs.
    alone = llm.generate([prompt], plain, use_tqdm=False)[0].outputs[0].token_ids
    assert [c.token_ids for c in out.outputs] == [alone, alone]
    assert llm.llm_engine.get_stats().kv_cache_usage == 0
