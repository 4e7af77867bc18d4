"""Speculative decoding with the target's MTP layer (``method: "mtp"``) on a
tiny random DeepSeek-V3 checkpoint with one MTP layer (float32).

* The proposals are the MTP module's: after every step, a request's first
  proposal is the argmax of the float32 reference MTP step
  (:func:`tests.models.test_deepseek_mtp.reference_mtp_logits`) over its
  tokens so far, so every MTP position was fed the right token and target
  hidden state (rejected proposals' MTP K/V overwritten).
* Greedy output equals decoding without speculation, token for token (random
  MTP weights: acceptance is low), for each prompt alone and for all batched
  with staggered arrivals, chunked prefill and preemption (recompute and
  swap) forced.
* Bad settings fail before anything loads, naming the setting.
"""

from __future__ import annotations

import gc

import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from ember.spec_decode.mtp import MTPProposer
from tests.engine.test_batching import run_staggered
from tests.spec_decode.test_draft_model import assert_speculated_preempted_equal
from tests.models.test_deepseek_mtp import reference_mtp_logits, write_mtp_checkpoint
from tests.models.tiny import make_prompts, make_tokenizer, runner_of

NUM_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_torch_thread):
    path, target, deep, extra = write_mtp_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt")
    make_tokenizer(target.config.vocab_size).save_pretrained(path)
    return str(path), target, deep, extra


@pytest.fixture(scope="module")
def reference(checkpoint):
    path, target, _, _ = checkpoint
    prompts = make_prompts((5, 9, 13, 3, 17, 7, 11, 21), vocab=target.config.vocab_size, seed=3)
    llm = _llm(path, None)
    return prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _llm(path: str, spec: dict | None, **kw) -> LLM:
    return LLM(path, dtype="float32", block_size=4, kv_cache_memory=4 << 20, max_model_len=96,
               speculative_config=spec, **kw)


def _spec(k: int, **kw) -> dict:
    return {"method": "mtp", "num_speculative_tokens": k, **kw}


def _counters(llm_or_engine):
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    return engine.engine_core.scheduler.counters


def _record_proposals(monkeypatch) -> list[tuple[str, int, list[int]]]:
    """Patch MTPProposer's proposing (after the emitted tokens are read, and the uniform steps' launch
    before it) to record (request, tokens known after the step, proposals) per request."""
    seen: list[tuple[str, int, list[int]]] = []
    original, finish_uniform = MTPProposer.propose, MTPProposer.finish_uniform

    def record(self, out, known):  # out: req_id -> count; the ids stay on the device
        seen.extend((r, known[r], self.states[r].proposed()) for r, n in out.items())
        assert all(len(d) == out[r] for r, _, d in seen[len(seen) - len(out):])
        return out

    def recording(self, sched, host, emitted, hidden=None):
        known = {r: len(self.runner.requests[r].token_ids) + len(emitted.get(r, ())) for r in host.req_ids}
        return record(self, original(self, sched, host, emitted, hidden), known)

    def recording_uniform(self, emitted):
        known = {r: len(self.runner.requests[r].token_ids) + len(t) for r, t in emitted.items()}
        return record(self, finish_uniform(self, emitted), known)

    monkeypatch.setattr(MTPProposer, "propose", recording)
    monkeypatch.setattr(MTPProposer, "finish_uniform", recording_uniform)
    return seen


@pytest.mark.parametrize("k", [1, 3])
def test_proposals_are_the_reference_mtp_argmax(checkpoint, reference, monkeypatch, k):
    path, target, deep, extra = checkpoint
    prompts, ref = reference
    seen = _record_proposals(monkeypatch)
    llm = _llm(path, _spec(k), max_num_batched_tokens=8)  # chunked prefill of the longer prompts
    outs = llm.generate(prompts[:3], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref[:3]
    full = {o.request_id: list(o.prompt_token_ids) + list(o.outputs[0].token_ids) for o in outs}
    assert len(seen) >= 3 * 4
    for req_id, m, drafts in seen:
        assert 1 <= len(drafts) <= k
        logits = reference_mtp_logits(target, deep, extra, full[req_id][:m])
        assert drafts[0] == int(logits[-1].argmax()), (req_id, m)
    c = _counters(llm)
    assert c.spec_num_draft_tokens > 0


def test_checkpoint_without_mtp_embedding_shares_the_targets(tmp_path, monkeypatch):
    # Released checkpoints carry model.layers.{N}.embed_tokens; without it the
    # MTP layer uses the target's embedding module (no copy).
    path, target, deep, extra = write_mtp_checkpoint(tmp_path / "ckpt", seed=1, own_embed=False)
    make_tokenizer(target.config.vocab_size).save_pretrained(path)
    seen = _record_proposals(monkeypatch)
    llm = _llm(str(path), _spec(1))
    runner = runner_of(llm)
    assert runner.draft_proposer.model.layer.embed_tokens is runner.model.model.embed_tokens
    prompt = make_prompts((7,), vocab=target.config.vocab_size, seed=4)[0]
    out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
    full = prompt + list(out.outputs[0].token_ids)
    assert len(seen) >= 4
    for _, m, drafts in seen:
        assert drafts[0] == int(reference_mtp_logits(target, deep, extra, full[:m])[-1].argmax())


@pytest.mark.parametrize("k", [1, 2])
def test_greedy_alone_equals_no_speculation(checkpoint, reference, k):
    path = checkpoint[0]
    prompts, ref = reference
    llm = _llm(path, _spec(k))
    for i, (p, want) in enumerate(zip(prompts, ref)):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want, f"prompt {i}"
    c = _counters(llm)
    assert c.spec_num_draft_tokens > 0 and c.spec_num_accepted_tokens < c.spec_num_draft_tokens
    assert runner_of(llm).draft_proposer.model is not None


@pytest.mark.parametrize("preemption_mode, async_scheduling", [("recompute", False), ("swap", False),
                                                               ("recompute", True)])
def test_greedy_batched_chunked_preempted_equals_no_speculation(checkpoint, reference, preemption_mode,
                                                                async_scheduling):
    # With asynchronous scheduling, speculation also turns off and on as the
    # batch crosses disable_by_batch_size (steps scheduled ahead in between).
    path = checkpoint[0]
    prompts, ref = reference
    k, block_size = 2, 4
    spec = _spec(k, disable_by_batch_size=3) if async_scheduling else _spec(k)
    longest = max(len(p) for p in prompts) + NUM_NEW + 2 * k
    num_blocks = -(-longest // block_size) + 6  # far too few for all at once: preemption
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=path, dtype="float32", max_model_len=longest + 8, block_size=block_size,
        num_gpu_blocks_override=num_blocks, max_num_batched_tokens=10, max_num_seqs=6, speculative_config=spec,
        preemption_mode=preemption_mode, swap_space=8 << 20, async_scheduling=async_scheduling))
    results, chunked = run_staggered(engine, prompts, GREEDY)
    assert_speculated_preempted_equal(results, engine, chunked, ref, preemption_mode)


def test_sampled_proposals_keep_q_and_seeded_output_reproduces(checkpoint, reference, monkeypatch):
    # Sampled requests draw the MTP's proposals from q (kept for the verifier);
    # seeded output does not depend on the batch it runs in.
    path = checkpoint[0]
    prompts, _ = reference
    kept = []
    original = MTPProposer.draft_probs

    def recording(self, req_ids, num_drafts, draft_ids, vocab):
        q = original(self, req_ids, num_drafts, draft_ids, vocab)
        kept.append(q is not None and bool(torch.allclose(q.sum(dim=1)[q.sum(dim=1) > 0], torch.tensor(1.0))))
        return q

    monkeypatch.setattr(MTPProposer, "draft_probs", recording)
    llm = _llm(path, _spec(2))
    params = SamplingParams(temperature=1.0, max_tokens=NUM_NEW, ignore_eos=True, seed=5)
    a = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
    b = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:3]]
    assert a == b
    assert _counters(llm).spec_num_draft_tokens > 0 and kept and all(kept)


# ------------------------------------------------------------ bad settings
def test_bad_mtp_settings_fail_before_loading(checkpoint, smollm2_path, tmp_path, no_load):
    import json
    import shutil

    no_mtp = tmp_path / "no_mtp"
    shutil.copytree(checkpoint[0], no_mtp)
    cfg = json.loads((no_mtp / "config.json").read_text())
    (no_mtp / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    cases = [
        (smollm2_path, _spec(1), r"method 'mtp' needs a model with multi-token-prediction layers; "
                                 r"LlamaForCausalLM has none"),
        (str(no_mtp), _spec(1), "num_nextn_predict_layers 0"),
        (checkpoint[0], _spec(1, model=checkpoint[0]), "speculative_config.model is only read by"),
        (checkpoint[0], _spec(0), "num_speculative_tokens"),
        (checkpoint[0], _spec(17), "num_speculative_tokens"),
    ]
    for model, spec, match in cases:
        with pytest.raises(ConfigError, match=match):
            LLM(model, dtype="float32", max_model_len=96, speculative_config=spec)


def test_missing_mtp_weights_are_named(checkpoint, tmp_path):
    import shutil

    path = tmp_path / "stripped"
    shutil.copytree(checkpoint[0], path)
    (path / "mtp.safetensors").unlink()
    with pytest.raises(Exception, match="lacks weights for"):
        _llm(str(path), _spec(1))


def test_engine_config_for_mtp(checkpoint):
    cfg = EngineArgs(model=checkpoint[0], max_model_len=96, speculative_config=_spec(3)).create_engine_config()
    assert cfg.speculative_config.method == "mtp" and cfg.speculative_config.draft_model_config is None
    assert cfg.scheduler_config.num_lookahead_tokens == 3  # the proposals' MTP K/V


def test_preset_has_an_mtp_layer():
    cfg = EngineArgs(model="DeepSeek-V3", load_format="dummy", hf_overrides={"num_hidden_layers": 2},
                     speculative_config=_spec(1), device="cpu").create_engine_config()
    assert cfg.model_config.hf_config.num_nextn_predict_layers == 1


@pytest.mark.gpu
def test_gpu_mtp_equals_no_speculation(checkpoint, reference):
    # The CUDA path (Triton MLA and MoE kernels, the target's CUDA graphs for
    # plain steps) with the MTP layer proposing, in float32.
    path = checkpoint[0]
    prompts, _ = reference
    # A fixed KV size: sizing by a memory fraction would count the device memory that
    # engines built before (here or in earlier tests) still hold.
    kw = dict(device="cuda", dtype="float32", max_model_len=96, kv_cache_memory=64 << 20)
    base = LLM(path, **kw)
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY, use_tqdm=False)]
    base.llm_engine.shutdown()
    del base
    gc.collect()
    torch.cuda.empty_cache()
    for k in (1, 3):
        llm = LLM(path, speculative_config=_spec(k), **kw)
        for p, want in zip(prompts[:2], ref):
            assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
        assert _counters(llm).spec_num_draft_tokens > 0
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
