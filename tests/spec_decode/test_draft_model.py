"""Speculative decoding with a draft model (``method: "draft_model"``).

* A draft identical to the target accepts every draft (acceptance rate 1.0)
  and the output equals decoding without speculation.
* Other drafts with the target's vocabulary (the target's first layers, and
  a tiny random Llama) give greedy output token for token equal to decoding
  without speculation, for each prompt alone and batched with staggered
  arrivals, chunked prefill and preemption (recompute and swap) forced, and
  with asynchronous scheduling while speculation turns off and on.
* Sampled drafts: the verifier with the draft's q keeps the target
  distribution (chi-square), and a sampled draft equal to the target is
  accepted almost always (q is used, not a point mass).
* Bad settings fail before anything loads, naming the setting.
"""

from __future__ import annotations

import json

import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from ember.sample.rejection_sampler import draw_noise, emitted_tokens, rejection_sample
from tests.sample.test_rejection_sampler import ALPHA, P, P_NEXT, chi_square_pvalue
from tests.engine.test_batching import run_staggered

NUM_NEW = 16
K = 3
PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "Write a haiku about the sea.",
    "red green blue red green blue red green",
    "Question: what is 2 + 2? Answer:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
# The GPU tests' engines: float32 keeps near-ties apart; a fixed KV size, as engines of
# earlier tests may still hold device memory that sizing by a memory fraction would count.
GPU_KW = dict(device="cuda", dtype="float32", max_model_len=512, kv_cache_memory=256 << 20)


def _save_llama(path, config: dict, tensors: dict[str, torch.Tensor]) -> str:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


def _smollm2_config(smollm2_path: str) -> dict:
    from ember.loader import read_hf_config, resolve_model_source

    cfg = read_hf_config(resolve_model_source(smollm2_path))
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads, "head_dim": 64, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
            "bos_token_id": 1, "eos_token_id": 2}


@pytest.fixture(scope="module")
def truncated_draft(smollm2_path, tmp_path_factory) -> str:
    """The target's first 4 layers (and its embeddings and final norm) as a
    safetensors checkpoint: a draft that agrees with the target often."""
    from ember.loader import iter_weights, resolve_model_source

    keep = 4
    tensors = {n: t for n, t in iter_weights(resolve_model_source(smollm2_path), torch.float32, False)
               if not n.startswith("model.layers.") or int(n.split(".")[2]) < keep}
    config = {**_smollm2_config(smollm2_path), "num_hidden_layers": keep}
    return _save_llama(tmp_path_factory.mktemp("draft") / "truncated", config, tensors)


def _random_llama(path, vocab_size: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    h, inter, layers, heads, kv, hd = 64, 128, 2, 4, 2, 16

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    tensors = {"model.embed_tokens.weight": w(vocab_size, h), "model.norm.weight": torch.ones(h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({p + "input_layernorm.weight": torch.ones(h),
                        p + "post_attention_layernorm.weight": torch.ones(h),
                        p + "self_attn.q_proj.weight": w(heads * hd, h), p + "self_attn.k_proj.weight": w(kv * hd, h),
                        p + "self_attn.v_proj.weight": w(kv * hd, h), p + "self_attn.o_proj.weight": w(h, heads * hd),
                        p + "mlp.gate_proj.weight": w(inter, h), p + "mlp.up_proj.weight": w(inter, h),
                        p + "mlp.down_proj.weight": w(h, inter)})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
              "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True,
              "bos_token_id": 1, "eos_token_id": 2}
    return _save_llama(path, config, tensors)


@pytest.fixture(scope="module")
def random_draft(tmp_path_factory) -> str:
    return _random_llama(tmp_path_factory.mktemp("draft") / "random", 49152)


@pytest.fixture(scope="module")
def reference(smollm2_path, one_torch_thread):
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory=16 << 20)
    prompts = [llm.llm_engine.input_processor.tokenize(p) for p in PROMPTS]
    return prompts, [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _spec(model: str, **kw) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": K, **kw}


def _counters(llm_or_engine):
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    return engine.engine_core.scheduler.counters


@pytest.mark.slow
def test_draft_equal_to_target_accepts_everything(smollm2_path, reference):
    prompts, ref = reference
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory=32 << 20, speculative_config=_spec(smollm2_path))
    for p, want in zip(prompts[:3], ref):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    assert got == ref
    c = _counters(llm)
    assert c.spec_num_draft_tokens > 0 and c.spec_acceptance_rate == 1.0
    assert c.spec_accepted_per_pos == c.spec_drafts_per_pos and len(c.spec_drafts_per_pos) == K
    assert c.spec_mean_accepted_length == pytest.approx(K + 1, abs=0.5)  # the last steps are capped by max_tokens


def staggered(model: str, prompts: list[list[int]], spec: dict, preemption_mode: str, block_size: int = 16, **kw
              ) -> tuple[dict, LLMEngine, bool]:
    """Greedy ``prompts`` arriving one by one (tests.engine.test_batching.run_staggered) on an engine with
    chunked prefill and too few KV blocks for all at once; ``kw`` goes to EngineArgs."""
    longest = max(len(p) for p in prompts) + NUM_NEW + 2 * K
    num_blocks = -(-longest // block_size) + 5  # far too few for all at once: preemption
    engine = LLMEngine.from_engine_args(EngineArgs(
        model=model, max_model_len=longest + 16, block_size=block_size, num_gpu_blocks_override=num_blocks,
        max_num_batched_tokens=20, max_num_seqs=6, speculative_config=spec, preemption_mode=preemption_mode,
        swap_space=64 << 20, **kw))
    results, chunked = run_staggered(engine, prompts, GREEDY)
    return results, engine, chunked


def assert_speculated_preempted_equal(results: dict, engine: LLMEngine, chunked: bool, ref: list[list[int]],
                                      preemption_mode: str, label: str = "") -> None:
    """A staggered run chunked a prefill, preempted (swapped out under "swap"), speculated, and produced
    ``ref`` (the output without speculation) for every prompt."""
    sched = engine.engine_core.scheduler
    assert chunked and sched.num_preemptions_total > 0
    if preemption_mode == "swap":
        assert sched.counters.num_swap_outs > 0
    assert sched.counters.spec_num_draft_tokens > 0
    for i, want in enumerate(ref):
        assert results[f"p{i}"] == want, f"{label}prompt {i}"


@pytest.mark.slow
def test_truncated_draft_greedy_alone_equals_no_speculation(smollm2_path, truncated_draft, reference):
    prompts, ref = reference
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory=32 << 20, speculative_config=_spec(truncated_draft))
    for p, want in zip(prompts, ref):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    c = _counters(llm)
    assert 0 < c.spec_num_accepted_tokens < c.spec_num_draft_tokens  # some accepted, some rejected


@pytest.mark.slow
@pytest.mark.parametrize("draft, preemption_mode, async_scheduling", [
    ("truncated", "recompute", False), ("truncated", "swap", False), ("random", "recompute", False),
    ("truncated", "recompute", True)])
def test_greedy_batched_chunked_preempted_equals_no_speculation(smollm2_path, truncated_draft, random_draft,
                                                                reference, draft, preemption_mode, async_scheduling):
    # With asynchronous scheduling, speculation also turns off and on as the
    # batch crosses disable_by_batch_size (steps scheduled ahead in between,
    # the draft catching up after them).
    prompts, ref = reference
    path = truncated_draft if draft == "truncated" else random_draft
    spec = _spec(path, disable_by_batch_size=3) if async_scheduling else _spec(path)
    results, engine, chunked = staggered(smollm2_path, prompts, spec, preemption_mode,
                                         async_scheduling=async_scheduling)
    assert_speculated_preempted_equal(results, engine, chunked, ref, preemption_mode)


@pytest.mark.slow
def test_sampled_draft_equal_to_target_is_accepted_with_its_q(smollm2_path, reference):
    # With q kept, a sampled draft equal to the target is accepted with
    # probability min(1, p/q) ~ 1; as a point mass it would be accepted with
    # probability p(d) only. Seeded sampling stays reproducible.
    prompts, _ = reference
    llm = LLM(smollm2_path, max_model_len=256, kv_cache_memory=32 << 20, speculative_config=_spec(smollm2_path))
    params = SamplingParams(temperature=1.0, max_tokens=NUM_NEW, ignore_eos=True, seed=5)
    a = [o.outputs[0].token_ids for o in llm.generate(prompts[:3], params, use_tqdm=False)]
    c = _counters(llm)
    assert c.spec_num_draft_tokens > 20 and c.spec_acceptance_rate > 0.95
    b = [o.outputs[0].token_ids for o in llm.generate(prompts[:3][::-1], params, use_tqdm=False)][::-1]
    assert a == b


# ------------------------------------------------------------- sampling (q)
N = 40_000
DRAFT_QS = {
    "target": P,
    "uniform": torch.full((6,), 1 / 6),
    "reversed": P.flip(0),
    "least_likely": torch.tensor([0.01, 0.01, 0.01, 0.01, 0.01, 0.95]),
    "off_support": torch.tensor([0.0, 0.0, 0.0, 0.5, 0.5, 0.0]),
}


def _verify_with_q(p_rows: list[torch.Tensor], q: torch.Tensor, k: int, seed: int
                   ) -> tuple[list[list[int]], list[list[int]]]:
    """N requests with k drafts each drawn from ``q`` and verified with that q."""
    g = torch.Generator().manual_seed(seed)
    drafts = torch.multinomial(q, N * k, replacement=True, generator=g).view(N, k)
    probs = torch.stack(p_rows).repeat(N, 1)
    q_rows = torch.cat([q.expand(k, -1), torch.zeros(1, 6)]).repeat(N, 1)
    draft_rows = torch.cat([drafts, torch.full((N, 1), -1)], dim=1).reshape(-1)
    uniform, noise = draw_noise(N * (k + 1), 6, [None] * (N * (k + 1)), torch.device("cpu"), g)
    res = rejection_sample(draft_rows, probs.argmax(dim=1), probs, torch.zeros(N * (k + 1), dtype=torch.bool),
                           uniform, noise, q_rows)
    return emitted_tokens(drafts.tolist(), res.accepted.tolist(), res.fallback.tolist()), drafts.tolist()


@pytest.mark.parametrize("name", sorted(DRAFT_QS))
def test_verification_with_draft_q_keeps_the_target_distribution(name):
    p_third = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.1, 0.1])
    out, drafts = _verify_with_q([P, P_NEXT, p_third], DRAFT_QS[name], 2, seed=11)
    first = torch.bincount(torch.tensor([o[0] for o in out]), minlength=6)
    assert chi_square_pvalue(first, P) > ALPHA, (name, first.tolist())
    second = torch.tensor([o[1] for o, d in zip(out, drafts) if o[0] == d[0]])
    if len(second) > 1000:
        assert chi_square_pvalue(torch.bincount(second, minlength=6), P_NEXT) > ALPHA, name


def test_q_equal_to_p_accepts_every_draft():
    out, _ = _verify_with_q([P, P_NEXT], P_NEXT, 1, seed=12)  # row 0's q != P: control below
    assert any(len(o) == 1 for o in out)
    out, _ = _verify_with_q([P, P_NEXT], P, 1, seed=13)
    assert all(len(o) == 2 for o in out)


def test_draft_sampling_draws_from_q(smollm2_path):
    # The proposer's draw (exponential race over q) follows q.
    from ember.spec_decode.draft_model import DraftModelProposer

    logits = torch.log(P).unsqueeze(0).repeat(N, 1)
    proposer = DraftModelProposer.__new__(DraftModelProposer)
    proposer.device, proposer.generator = torch.device("cpu"), torch.Generator().manual_seed(3)
    params = [SamplingParams(temperature=1.0)] * N
    tokens, q = proposer._choose(logits, params, list(range(N)))
    assert torch.allclose(q[0], P, atol=1e-6)
    assert chi_square_pvalue(torch.bincount(tokens, minlength=6), P) > ALPHA
    greedy, q = proposer._choose(logits[:4], [SamplingParams(temperature=0)] * 4, [0] * 4)
    assert q is None and greedy.tolist() == [0] * 4


# ------------------------------------------------------------ bad settings
def test_bad_draft_settings_fail_before_loading(smollm2_path, tmp_path, no_load):
    other_vocab = _random_llama(tmp_path / "other_vocab", 1000)
    cases = [
        (_spec(other_vocab), r"speculative_config.model .* vocabulary of 1000 tokens"),
        (_spec(str(tmp_path / "missing")), "speculative_config.model"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model must name"),
        (_spec(smollm2_path, num_speculative_tokens=0), "num_speculative_tokens"),
        (_spec(smollm2_path, num_speculative_tokens=17), "num_speculative_tokens"),
    ]
    for spec, match in cases:
        with pytest.raises(ConfigError, match=match):
            LLM(smollm2_path, max_model_len=256, speculative_config=spec)


def test_special_tokens_must_match(smollm2_path, tmp_path):
    path = _random_llama(tmp_path / "other_eos", 49152)
    cfg = json.loads((tmp_path / "other_eos" / "config.json").read_text())
    (tmp_path / "other_eos" / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 7}))
    with pytest.raises(ConfigError, match="eos_token_id 7"):
        EngineArgs(model=smollm2_path, speculative_config=_spec(path)).create_engine_config()


def test_engine_config_for_a_draft(smollm2_path, random_draft):
    cfg = EngineArgs(model=smollm2_path, max_model_len=256, async_scheduling=True,
                     speculative_config=_spec(random_draft)).create_engine_config()
    sc = cfg.speculative_config
    assert sc.method == "draft_model" and sc.draft_model_config.hf_config.num_hidden_layers == 2
    assert sc.draft_model_config.dtype == cfg.model_config.dtype
    # k slots are reserved past each step (the proposals' K/V).
    assert cfg.scheduler_config.async_scheduling and cfg.scheduler_config.num_lookahead_tokens == K


def test_lookahead_slots_are_reserved_and_capped_at_max_model_len():
    from ember.config import SchedulerConfig
    from ember.core.kv_cache_manager import KVCacheManager
    from ember.core.scheduler import Scheduler
    from ember.request import Request

    mgr = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4, max_model_len=12,
                                      num_lookahead_tokens=3), mgr)
    sched.add_request(Request("a", list(range(1, 7)), SamplingParams(max_tokens=4), max_model_len=12))
    out = sched.schedule()
    # 6 prompt tokens + 3 lookahead slots: 3 blocks of 4 (not 2).
    assert out.num_scheduled_tokens == {"a": 6} and len(out.scheduled_new_reqs[0].block_ids) == 3
    # Only the prompt's full block is cached (lookahead slots hold no known token).
    assert mgr.num_cached_blocks.get("a") == 1
    # Near max_model_len the lookahead shrinks: 11 tokens + 1 slot fit 3 blocks.
    sched.add_request(Request("b", list(range(1, 12)), SamplingParams(max_tokens=1), max_model_len=12))
    out = sched.schedule()
    assert len(mgr.get_block_ids("b")) == 3


@pytest.mark.gpu
def test_gpu_draft_with_cuda_graphs_equals_no_speculation(smollm2_path, truncated_draft):
    # On CUDA the draft's proposals and short catch-ups replay CUDA graphs
    # (decode graphs and piecewise graphs); float32 keeps near-ties apart.
    base = LLM(smollm2_path, **GPU_KW)
    prompts = [base.llm_engine.input_processor.tokenize(p) for p in PROMPTS]
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY, use_tqdm=False)]
    base.llm_engine.shutdown()
    del base
    for draft, min_acceptance in [(smollm2_path, 0.95), (truncated_draft, 0.0)]:
        llm = LLM(smollm2_path, speculative_config=_spec(draft), **GPU_KW)
        runner = llm.llm_engine.engine_core.executor.worker.model_runner
        assert runner.draft_proposer.cuda_graphs is not None and runner.draft_proposer.piecewise_graphs is not None
        for p, want in zip(prompts[:2], ref):
            assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
        c = _counters(llm)
        assert c.spec_num_draft_tokens > 0 and c.spec_acceptance_rate >= min_acceptance
        llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
