"""Speculative decoding with an EAGLE-3 head (``method: "eagle3"``).

* The head's forward and logits equal an independent float32 PyTorch
  implementation of the published layout, on a checkpoint saved with
  safetensors (a draft vocabulary mapped through ``d2t``), for catch-up
  positions (conditioned on the target's three depths through ``fc``) and a
  later proposal (conditioned on the head's own output).
* The target writes its residual stream at the head's depths (the streams
  entering layers 2, N // 2, N - 3) and returns the same hidden states as without.
* Greedy output with a random head equals greedy output without speculation,
  token for token, on a tiny random Llama and on both bundled models, for
  each prompt alone and batched with staggered arrivals, chunked prefill and
  preemption forced.
* Sampled proposals hand their q to the verifier; bad settings fail before
  anything loads, naming the setting.
"""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.spec_decode.hidden_states import HiddenStateProposer
# K and GREEDY are those the shared staggered run uses.
from tests.spec_decode import test_draft_model
from tests.spec_decode.test_draft_model import GPU_KW, GREEDY, K, assert_speculated_preempted_equal, staggered

# The draft-model tests' six prompts and two more.
PROMPTS = test_draft_model.PROMPTS + [
    "Once upon a time, in a small village by the river,",
    "import numpy as np\nx = np.arange(10)\nprint(",
]


def save_eagle3_head(path, *, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, vocab: int,
                     draft_vocab: int | None = None, seed: int = 0, d2t: torch.Tensor | None = None,
                     with_embed: bool = False, rope_theta: float = 10000.0, scale: float = 0.3,
                     config_overrides: dict | None = None) -> str:
    """A random EAGLE-3 head in the published checkpoint layout (``fc``,
    ``midlayer.*``, ``norm``, ``lm_head``, ``d2t``, ``t2d``), as safetensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    dv = draft_vocab or vocab

    def w(*shape):
        return torch.randn(*shape, generator=g) * scale

    def norm_w(n):
        return 1 + 0.2 * torch.randn(n, generator=g)

    if d2t is None:
        # Draft id d -> target id: a sorted random subset of the target vocabulary.
        hot = torch.randperm(vocab, generator=g)[:dv].sort().values
        d2t = hot - torch.arange(dv)
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[(torch.arange(dv) + d2t).clamp(0, vocab - 1)] = True
    m = "midlayer."
    tensors = {
        "fc.weight": w(hidden, 3 * hidden),
        m + "input_layernorm.weight": norm_w(hidden), m + "hidden_norm.weight": norm_w(hidden),
        m + "post_attention_layernorm.weight": norm_w(hidden),
        m + "self_attn.q_proj.weight": w(heads * head_dim, 2 * hidden),
        m + "self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        m + "self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * hidden),
        m + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
        m + "mlp.gate_proj.weight": w(inter, hidden), m + "mlp.up_proj.weight": w(inter, hidden),
        m + "mlp.down_proj.weight": w(hidden, inter),
        "norm.weight": norm_w(hidden), "lm_head.weight": w(dv, hidden),
        "d2t": d2t.to(torch.int64), "t2d": t2d,
    }
    if with_embed:
        tensors["embed_tokens.weight"] = w(vocab, hidden)
    config = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "draft_vocab_size": dv,
              "target_hidden_size": hidden, "rms_norm_eps": 1e-5, "rope_theta": rope_theta,
              "max_position_embeddings": 8192, "tie_word_embeddings": False, **(config_overrides or {})}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


def head_for(target_path: str, path, **kw) -> str:
    """A random head of the target's shape (hidden size, heads, vocabulary)."""
    from ember.loader import read_hf_config, resolve_model_source

    cfg = read_hf_config(resolve_model_source(target_path))
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return save_eagle3_head(path, hidden=cfg.hidden_size, heads=cfg.num_attention_heads, kv_heads=kv, head_dim=hd,
                            inter=2 * cfg.hidden_size, vocab=cfg.vocab_size,
                            draft_vocab=min(cfg.vocab_size, kw.pop("draft_vocab", 4096)), **kw)


def _spec(head: str, **kw) -> dict:
    return {"method": "eagle3", "model": head, "num_speculative_tokens": K, **kw}


def _counters(llm_or_engine):
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    return engine.engine_core.scheduler.counters


def _runner(llm_or_engine):
    engine = getattr(llm_or_engine, "llm_engine", llm_or_engine)
    return engine.engine_core.executor.worker.model_runner


# ------------------------------------------------------------------ tiny
@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> str:
    from tests.models.tiny import random_llama, save_tiny

    return save_tiny(random_llama(num_hidden_layers=6), tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def tiny_head(tiny_target, tmp_path_factory) -> str:
    return head_for(tiny_target, tmp_path_factory.mktemp("head") / "eagle3", draft_vocab=48, seed=1)


@pytest.fixture(scope="module")
def tiny_head_with_embedding(tiny_target, tmp_path_factory) -> str:
    """A head with its own token embedding (and, as saved by some trainers,
    names under ``model.`` with the layer as ``layers.0``)."""
    from safetensors.torch import load_file, save_file

    path = head_for(tiny_target, tmp_path_factory.mktemp("head") / "eagle3_embed", draft_vocab=64, seed=4,
                    with_embed=True)
    tensors = load_file(f"{path}/model.safetensors")
    renamed = {("model." + k.replace("midlayer.", "layers.0.")) if k.startswith(("midlayer.", "embed_tokens")) else k:
               v for k, v in tensors.items()}
    save_file(renamed, f"{path}/model.safetensors")
    return path


def _reference_head(path: str, target_embed: torch.Tensor, eps: float = 1e-5):
    """Independent float32 implementation of one EAGLE-3 head over a whole
    sequence (causal attention over its positions, RoPE at ``positions``)."""
    from safetensors.torch import load_file

    t = {k.removeprefix("model.").replace("layers.0.", "midlayer."): v.float() if v.is_floating_point() else v
         for k, v in load_file(f"{path}/model.safetensors").items()}
    cfg = json.loads(open(f"{path}/config.json").read())
    heads, kv, hd, theta = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["rope_theta"]

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rope(x, pos):  # x [n, h, d], rotate-half convention
        inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = pos.float()[:, None] * inv[None]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None], torch.cat([ang.sin(), ang.sin()], -1)[:, None]
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def layer(ids, hidden, pos):
        m = "midlayer."
        emb = target_embed[ids]
        x = torch.cat([rms(emb, t[m + "input_layernorm.weight"]), rms(hidden, t[m + "hidden_norm.weight"])], -1)
        n = x.shape[0]
        q = (x @ t[m + "self_attn.q_proj.weight"].T).view(n, heads, hd)
        k = (x @ t[m + "self_attn.k_proj.weight"].T).view(n, kv, hd)
        v = (x @ t[m + "self_attn.v_proj.weight"].T).view(n, kv, hd)
        q, k = rope(q, pos), rope(k, pos)
        k, v = k.repeat_interleave(heads // kv, 1), v.repeat_interleave(heads // kv, 1)
        att = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5
        att = att.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
        o = torch.einsum("hqk,khd->qhd", att, v).reshape(n, heads * hd) @ t[m + "self_attn.o_proj.weight"].T
        s = o + hidden
        a = rms(s, t[m + "post_attention_layernorm.weight"])
        mlp = (torch.nn.functional.silu(a @ t[m + "mlp.gate_proj.weight"].T) * (a @ t[m + "mlp.up_proj.weight"].T))
        return s + mlp @ t[m + "mlp.down_proj.weight"].T

    def logits(out, vocab):
        draft = rms(out, t["norm.weight"]) @ t["lm_head.weight"].T
        full = torch.full((out.shape[0], vocab), float("-inf"))
        full[:, torch.arange(draft.shape[1]) + t["d2t"]] = draft
        return full

    return t, layer, logits


@pytest.mark.parametrize("own_embedding", [False, True])
def test_head_forward_matches_reference(tiny_target, tiny_head, tiny_head_with_embedding, own_embedding,
                                        one_torch_thread):
    """Catch-up over a prompt (conditioned on fc of the target's three depths),
    then one proposal conditioned on the head's own output, against the
    float32 reference (the target's embedding, or the head's own); and the
    target's stream at depths (2, 3, 3) of 6."""
    from ember.loader import iter_weights, resolve_model_source
    from ember.models.llama_eagle3 import eagle3_target_layers

    head_path = tiny_head_with_embedding if own_embedding else tiny_head
    llm = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20,
              speculative_config=_spec(head_path))
    runner = _runner(llm)
    head = runner.draft_proposer.model
    assert runner.aux_hidden.layers == eagle3_target_layers(6) == (2, 3, 3)
    assert (head.embed_tokens is not None) == own_embedding
    if own_embedding:
        from safetensors.torch import load_file

        embed = load_file(f"{head_path}/model.safetensors")["model.embed_tokens.weight"]
    else:
        embed = dict(iter_weights(resolve_model_source(tiny_target), torch.float32, False))[
            "model.embed_tokens.weight"]
    t, layer, logits = _reference_head(head_path, embed)
    vocab_in_draft = 64 if own_embedding else 48

    ids = torch.tensor([5, 17, 3, 40, 22, 9, 31], dtype=torch.int64)
    n = len(ids)
    feats = torch.randn(n, 3 * 64, generator=torch.Generator().manual_seed(3))
    # Ember: the head over positions 0..n-1, in the draft's KV cache blocks 0.. (engine idle).
    from ember.layers.attention import AttentionMetadata, ForwardContext

    bs = runner.block_size
    blocks = list(range(-(-(n + 1) // bs)))

    def meta(start, count):
        pos = torch.arange(start, start + count)
        table = torch.tensor([blocks], dtype=torch.int32)
        return pos, AttentionMetadata(
            slot_mapping=table[0, pos // bs].long() * bs + pos % bs,
            query_start_loc=torch.tensor([0, count], dtype=torch.int32),
            seq_lens=torch.tensor([start + count], dtype=torch.int32), block_table=table,
            max_query_len=count, max_seq_len=start + count, query_start_loc_cpu=[0, count],
            seq_lens_cpu=[start + count], num_decodes=int(count == 1))

    kv = runner.draft_proposer.kv_caches
    with torch.inference_mode():
        head.set_condition(head.condition_target(feats))
        pos, m = meta(0, n)
        out = head(ids, pos, ForwardContext(m, kv))
        got_logits = head.compute_logits(out)
        nxt = got_logits[-1].argmax().view(1)
        head.set_condition(out[-1:])
        pos2, m2 = meta(n, 1)
        out2 = head(nxt, pos2, ForwardContext(m2, kv))
        got_logits2 = head.compute_logits(out2)

    hidden = feats @ t["fc.weight"].T
    ref_out = layer(ids, hidden, torch.arange(n))
    ref_logits = logits(ref_out, 64)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    finite = torch.isfinite(ref_logits)
    assert torch.equal(finite, torch.isfinite(got_logits)) and finite.sum(1).tolist() == [vocab_in_draft] * n
    torch.testing.assert_close(got_logits[finite], ref_logits[finite], rtol=1e-4, atol=1e-4)
    # The proposal step: position n attends to the catch-up positions' K/V too.
    ref_out2 = layer(torch.cat([ids, nxt]), torch.cat([hidden, ref_out[-1:]]), torch.arange(n + 1))[-1:]
    torch.testing.assert_close(out2, ref_out2, rtol=1e-4, atol=1e-4)
    f2 = torch.isfinite(got_logits2)
    torch.testing.assert_close(got_logits2[f2], logits(ref_out2, 64)[f2], rtol=1e-4, atol=1e-4)
    # Greedy proposals skip the target-vocabulary rows: the same ids as their argmax.
    with torch.inference_mode():
        both = torch.cat([out, out2])
        assert torch.equal(head.greedy_tokens(both), head.compute_logits(both).argmax(-1))

    # The target's streams at its depths, written by its forward (eager here).
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_target, torch_dtype=torch.float32).eval()
    prompt = [3, 9, 27, 1, 14, 60, 2]
    with torch.no_grad():
        states = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states  # [embeddings, after layer i]
    with torch.inference_mode():
        host = runner.aux_hidden
        from ember.layers.attention import AttentionMetadata as AM

        pos = torch.arange(len(prompt))
        table = torch.tensor([list(range(-(-len(prompt) // bs)))], dtype=torch.int32)
        m = AM(slot_mapping=table[0, pos // bs].long() * bs + pos % bs,
               query_start_loc=torch.tensor([0, len(prompt)], dtype=torch.int32),
               seq_lens=torch.tensor([len(prompt)], dtype=torch.int32), block_table=table,
               max_query_len=len(prompt), max_seq_len=len(prompt), query_start_loc_cpu=[0, len(prompt)],
               seq_lens_cpu=[len(prompt)])
        runner.model(torch.tensor(prompt), pos, ForwardContext(m, runner.kv_caches, aux_hidden=host))
    rows = host.rows(len(prompt)).view(len(prompt), 3, 64)
    for j, d in enumerate(host.layers):
        torch.testing.assert_close(rows[:, j], states[d][0], rtol=1e-4, atol=1e-4)


def test_greedy_tiny_target_alone_and_batched(tiny_target, tiny_head, one_torch_thread):
    prompts = [[(7 * i + 3 * j) % 60 + 1 for j in range(5 + 3 * i)] for i in range(6)]
    base = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20)
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20,
              speculative_config=_spec(tiny_head))
    for p, want in zip(prompts, ref):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
    c = _counters(llm)
    assert c.spec_num_draft_tokens > 0
    # Staggered arrivals, chunked prefill, preemption by recompute and by swap;
    # with asynchronous scheduling speculation also turns off and on as the
    # batch crosses disable_by_batch_size (the head then skips the positions
    # whose target hidden states are gone).
    for mode, async_scheduling, spec in [("recompute", False, _spec(tiny_head)), ("swap", False, _spec(tiny_head)),
                                         ("recompute", True, _spec(tiny_head, disable_by_batch_size=3))]:
        results, engine, chunked = staggered(tiny_target, prompts, spec, mode, block_size=4, dtype="float32",
                                             async_scheduling=async_scheduling)
        assert_speculated_preempted_equal(results, engine, chunked, ref, mode, f"{mode} async={async_scheduling}: ")


def test_proposals_reach_the_host_only_after_the_next_launch(tiny_target, tiny_head, one_torch_thread,
                                                               monkeypatch):
    # The head's proposals are scheduled by count (DRAFT_ON_WORKER) and the
    # step verifying them reads their ids on the device: no proposal is read
    # on the host in the step that made it nor before the next step's launch,
    # and the output is still plain decoding's.
    from ember.core.sched_output import DRAFT_ON_WORKER
    from ember.spec_decode import draft_model
    from ember.worker.model_runner import ModelRunner

    launches, reads = [0], []
    launch, init, row = ModelRunner.launch, draft_model._ProposalTable.__init__, draft_model._ProposalTable.row

    def counted_launch(self, sched):
        launches[0] += 1
        return launch(self, sched)

    def noted_init(self, table):
        init(self, table)
        self.made_in = launches[0]

    def noted_row(self, i):
        reads.append((self.made_in, launches[0]))
        return row(self, i)

    monkeypatch.setattr(ModelRunner, "launch", counted_launch)
    monkeypatch.setattr(draft_model._ProposalTable, "__init__", noted_init)
    monkeypatch.setattr(draft_model._ProposalTable, "row", noted_row)
    prompts = [[(5 * i + 2 * j) % 60 + 1 for j in range(4 + 5 * i)] for i in range(3)]
    base = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20)
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY, use_tqdm=False)]
    llm = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20,
              speculative_config=_spec(tiny_head))
    scheduled = []
    llm.llm_engine.engine_core.add_step_observer(
        lambda record: scheduled.extend(record.sched.scheduled_spec_decode_tokens.values()))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
    assert scheduled and all(d and set(d) == {DRAFT_ON_WORKER} for d in scheduled)
    assert reads and all(at > made_in for made_in, at in reads)


_PROPOSE, _FINISH_UNIFORM = HiddenStateProposer.propose, HiddenStateProposer.finish_uniform


def _forced_acceptance(monkeypatch):
    """Make verification accept ``(step + i) % (K + 1)`` drafts of request ``i`` (then the target's
    argmax), whatever they are, so that every accepted count 0..K occurs; returns the step counter."""
    from ember.sample.rejection_sampler import RejectionResult
    from ember.spec_decode import verify

    real, steps = verify.rejection_sample, [0]

    def forced(draft_ids, argmax, *args, **kw):
        result = real(draft_ids, argmax, *args, **kw)
        accepted, j, req = [], 0, 0
        for d in draft_ids.tolist():
            if d < 0:  # a request's last row
                accepted.append(False)
                j, req = 0, req + 1
                continue
            accepted.append(j < (steps[0] + req) % (K + 1))
            j += 1
        steps[0] += 1
        return RejectionResult(torch.tensor(accepted, device=draft_ids.device), result.fallback)

    monkeypatch.setattr(verify, "rejection_sample", forced)
    return steps


def _proposals_and_tokens(target: str, head: str, prompts: list[list[int]], uniform: bool, monkeypatch, steps,
                          **engine_kw) -> tuple[list[list[int]], list[tuple[str, int, list[int]]], int]:
    """Greedy outputs of ``prompts`` (batched) and every proposal made (request, tokens known, proposals),
    with the head's uniform launch on or off; and how many steps launched uniformly."""
    monkeypatch.setattr(HiddenStateProposer, "uniform_launch", uniform)
    steps[0] = 0
    seen, uniform_steps = [], [0]
    propose, finish_uniform = _PROPOSE, _FINISH_UNIFORM  # as defined, not an earlier call's recording wrappers

    def record(self, out, known):
        seen.extend((r, known[r], self.states[r].proposed()) for r in sorted(out))
        return out

    def recording(self, sched, host, emitted, hidden=None):
        known = {r: len(self.runner.requests[r].token_ids) + len(emitted.get(r, ())) for r in host.req_ids}
        return record(self, propose(self, sched, host, emitted, hidden), known)

    def recording_uniform(self, emitted):
        uniform_steps[0] += 1
        known = {r: len(self.runner.requests[r].token_ids) + len(t) for r, t in emitted.items()}
        return record(self, finish_uniform(self, emitted), known)

    monkeypatch.setattr(HiddenStateProposer, "propose", recording)
    monkeypatch.setattr(HiddenStateProposer, "finish_uniform", recording_uniform)
    llm = LLM(target, speculative_config=_spec(head),
              **{"dtype": "float32", "max_model_len": 128, "kv_cache_memory": 4 << 20, **engine_kw})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    if engine_kw.get("device") == "cuda":
        assert _runner(llm).draft_proposer.cuda_graphs is not None, "the head's proposals ran in its CUDA graphs"
    return [o.outputs[0].token_ids for o in outs], seen, uniform_steps[0]


@pytest.mark.parametrize("block_size", [4, 16])
def test_uniform_launch_proposes_what_the_planned_catch_up_does(tiny_target, tiny_head, one_torch_thread,
                                                               monkeypatch, block_size):
    # A uniform step launches the head before the host reads which drafts
    # stand: it feeds all k + 1 verified positions and derives the proposals'
    # positions and slots on the device from the accepted counts. With every
    # accepted count 0..k forced in turn, its proposals (all k of them, every
    # step) and the tokens equal those of the catch-up the host plans from the
    # emitted tokens; blocks of 4 put proposals across block boundaries.
    _assert_uniform_launch_equals_planned(tiny_target, tiny_head, monkeypatch, block_size=block_size)


@pytest.mark.gpu
def test_gpu_uniform_launch_proposes_what_the_planned_catch_up_does(tiny_target, tiny_head, monkeypatch):
    # On CUDA the proposals replay the head's decode graphs, whose positions,
    # slots and sequence lengths are shifted by the accepted counts on the device.
    _assert_uniform_launch_equals_planned(tiny_target, tiny_head, monkeypatch, block_size=16,
                                          **{**GPU_KW, "max_model_len": 128})


def _assert_uniform_launch_equals_planned(target: str, head: str, monkeypatch, **engine_kw) -> None:
    steps = _forced_acceptance(monkeypatch)
    prompts = [[(7 * i + 3 * j) % 60 + 1 for j in range(5 + 3 * i)] for i in range(4)]
    for batch in ([prompts[0]], prompts):
        planned = _proposals_and_tokens(target, head, batch, False, monkeypatch, steps, **engine_kw)
        launched = _proposals_and_tokens(target, head, batch, True, monkeypatch, steps, **engine_kw)
        assert planned[2] == 0 and launched[2] >= 4, "the uniform launch ran (and only where enabled)"
        assert launched[0] == planned[0]
        assert len(launched[1]) == len(planned[1]) and launched[1] == planned[1]
        assert all(len(p) == K for _, _, p in launched[1])


class _PromptRun(NamedTuple):
    """What :func:`_head_kv_after_prompt` saw of one prompt."""

    kv: torch.Tensor  # the head's K/V rows of the prompt's positions, [layers, 2, len(prompt), ...] float32
    silent: int  # steps that computed some of the prompt and sampled nothing (prefill chunks before the last)
    fed: list[int]  # the head positions fed for the prompt until its first token, in order
    hits: int  # prefix-cache hits (tokens)
    runner: object  # the model runner


def _head_kv_after_prompt(target: str, head: str, prompt: list[int], budget: int, *, companion: bool = False,
                          again: bool = False, **engine_kw) -> _PromptRun:
    """Run ``prompt`` (greedy) until it has sampled its first token on an engine with a token budget of
    ``budget`` (blocks of 4 tokens; ``engine_kw`` goes to EngineArgs) and read the head's K/V there.
    ``companion``: a short request decodes (with drafts) while the prompt prefills (mixed steps);
    ``again``: the prompt runs to the end once first, so the measured run takes its blocks from the prefix cache."""
    from ember.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(**{
        "model": target, "dtype": "float32", "max_model_len": 128, "block_size": 4, "kv_cache_memory": 4 << 20,
        "max_num_batched_tokens": budget, "max_num_seqs": 4, "speculative_config": _spec(head), **engine_kw}))
    scheduler, runner = engine.engine_core.scheduler, _runner(engine)
    proposer = runner.draft_proposer
    computed_at_start = {}
    add_request = proposer.add_request

    def note_start(req_id: str, num_computed_tokens: int) -> None:
        computed_at_start[req_id] = num_computed_tokens
        add_request(req_id, num_computed_tokens)

    proposer.add_request = note_start
    fed = []
    catch_up = proposer._catch_up

    def note_feeds(plan):
        fed.extend(p.start + i for p in plan if p.req_id == "long" for i in range(len(p.tokens)))
        return catch_up(plan)

    proposer._catch_up = note_feeds
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    if companion:
        engine.add_request("short", [4, 8, 15, 16, 23], params, prompt_token_ids=[4, 8, 15, 16, 23])
        while scheduler.requests["short"].num_output_tokens < 2:
            engine.step()
    if again:
        engine.add_request("first", prompt, params, prompt_token_ids=prompt)
        while "first" in scheduler.requests:
            engine.step()
        fed.clear()
    engine.add_request("long", prompt, params, prompt_token_ids=prompt)
    silent = 0
    while scheduler.requests["long"].num_output_tokens == 0:
        engine.step()
        silent += scheduler.requests["long"].num_output_tokens == 0
    if companion:
        assert scheduler.requests["short"].num_output_tokens > 2, "the companion decoded while the prompt prefilled"
    blocks, bs, lead = runner.requests["long"].block_ids, runner.block_size, proposer.block_dim()
    rows = []
    for cache in proposer.kv_caches:
        rows.append(torch.stack([cache[(slice(None),) * lead + (blocks[j // bs], j % bs)]
                                 for j in range(len(prompt))], dim=lead).float().cpu())
    return _PromptRun(torch.stack(rows), silent, fed, computed_at_start["long"], runner)


def test_head_kv_of_a_chunked_prompt_equals_unchunked(tiny_target, tiny_head, one_torch_thread):
    """Every prompt position's head K/V is written, with the target's hidden
    states of the step that computed it, whatever the prompt's chunking: the
    steps of earlier prefill chunks sample nothing but feed the head too. The
    same holds for a prompt chunked next to a decoding request with drafts
    (mixed steps), and for one whose first blocks come from the prefix cache."""
    prompt = [(11 * j + 5) % 60 + 1 for j in range(34)]  # chunks of 8 (and a last one of 2) under budget 8
    everything = list(range(len(prompt)))
    whole = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 64)
    assert whole.silent == 0 and whole.fed == everything
    # A fresh cache holds zeros: a position never fed keeps them.
    assert bool((whole.kv.flatten(3).abs().amax(-1) > 0).all()), "the unchunked run fed every position"
    # Each position fed once, in order: none twice or skipped at a chunk boundary.
    chunked = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 8)
    assert chunked.silent == 4 and chunked.fed == everything
    torch.testing.assert_close(chunked.kv, whole.kv, rtol=1e-4, atol=1e-5)
    mixed = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 8, companion=True)
    assert mixed.silent > 4 and mixed.fed == everything
    torch.testing.assert_close(mixed.kv, whole.kv, rtol=1e-4, atol=1e-5)
    # Prefix-cache hits: the head keeps the K/V the first run wrote there; only computed positions are fed.
    cached = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 8, again=True)
    assert cached.hits >= len(prompt) - 4 and cached.fed == everything[cached.hits:]
    torch.testing.assert_close(cached.kv, whole.kv, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_gpu_head_kv_of_a_chunked_prompt_equals_unchunked(tiny_target, tiny_head):
    # On CUDA the prefill chunks run in the target's piecewise graphs (which write
    # its three depths) and the head's catch-ups in graphs of its own; the
    # tolerance covers TF32 dots in the attention kernels.
    prompt = [(11 * j + 5) % 60 + 1 for j in range(100)]  # 6 chunks of 16 and one of 4 under budget 16
    everything = list(range(len(prompt)))
    whole = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 128, device="cuda")
    assert whole.fed == everything and bool((whole.kv.flatten(3).abs().amax(-1) > 0).all())
    for companion in (False, True):
        run = _head_kv_after_prompt(tiny_target, tiny_head, prompt, 16, companion=companion, device="cuda")
        assert run.silent >= 6 and run.fed == everything
        assert run.runner.piecewise_graphs.num_runs >= 6 and run.runner.draft_proposer.piecewise_graphs.num_runs >= 6
        torch.testing.assert_close(run.kv, whole.kv, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------- bundled models
@pytest.fixture(scope="module", params=["smollm2", "qwen"])
def bundled(request, tmp_path_factory, one_torch_thread):
    path = request.getfixturevalue(f"{request.param}_path")
    head = head_for(path, tmp_path_factory.mktemp("head") / request.param, seed=2)
    llm = LLM(path, max_model_len=256, kv_cache_memory=16 << 20)
    prompts = [llm.llm_engine.input_processor.tokenize(p) for p in PROMPTS]
    ref = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return path, head, prompts, ref


@pytest.mark.slow
def test_bundled_greedy_alone_equals_no_speculation(bundled):
    path, head, prompts, ref = bundled
    llm = LLM(path, max_model_len=256, kv_cache_memory=32 << 20, speculative_config=_spec(head))
    for p, want in zip(prompts, ref):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert _counters(llm).spec_num_draft_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_bundled_greedy_batched_chunked_preempted_equals_no_speculation(bundled, preemption_mode):
    path, head, prompts, ref = bundled
    results, engine, chunked = staggered(path, prompts, _spec(head), preemption_mode)
    assert_speculated_preempted_equal(results, engine, chunked, ref, preemption_mode)


# --------------------------------------------------------------- sampling
def test_sampled_proposals_hand_q_to_the_verifier(tiny_target, tiny_head, one_torch_thread, monkeypatch):
    """Sampled proposals are draws from q = softmax(head logits / T) over the
    target vocabulary (zero outside the draft vocabulary), and the verifier
    receives those q rows, not point masses."""
    import ember.spec_decode.verify as verify

    seen = []
    orig = verify.rejection_sample

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return orig(*args, **kwargs)

    monkeypatch.setattr(verify, "rejection_sample", spy)
    llm = LLM(tiny_target, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20,
              speculative_config=_spec(tiny_head))
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=7)
    out = llm.generate([[1, 2, 3, 4, 5]], params, use_tqdm=False)[0].outputs[0].token_ids
    assert len(out) == 12 and _counters(llm).spec_num_draft_tokens > 0
    proposer = _runner(llm).draft_proposer
    # rejection_sample(draft_ids, argmax, probs, is_greedy, uniform, noise, draft_probs)
    qs = [args[6] if len(args) > 6 else kwargs.get("draft_probs") for args, kwargs in seen]
    qs = [q for q in qs if q is not None]
    assert qs and all(bool(((q > 0) & (q < 1)).any()) for q in qs), "the verifier got no sampled q rows"
    head = proposer.model
    outside = torch.ones(64, dtype=torch.bool)
    outside[head._target_ids] = False
    for q in qs:
        live = q.sum(1) > 0
        torch.testing.assert_close(q[live].sum(1), torch.ones(int(live.sum())), rtol=1e-5, atol=1e-5)
        assert not q[live][:, outside].any()


# ----------------------------------------------------------- bad settings
def test_bad_head_settings_fail_before_loading(tiny_target, tmp_path, no_load):
    kw = dict(heads=4, kv_heads=2, head_dim=16, inter=96, vocab=64)
    wrong_hidden = save_eagle3_head(tmp_path / "h32", hidden=32, **{**kw, "head_dim": 8})
    bad_d2t = save_eagle3_head(tmp_path / "d2t", hidden=64, draft_vocab=8, d2t=torch.full((8,), 60), **kw)
    too_big = save_eagle3_head(tmp_path / "big", hidden=64, **kw, config_overrides={"draft_vocab_size": 80})
    not_head = str(tiny_target)
    cases = [
        ({"method": "eagle3", "num_speculative_tokens": 2}, "speculative_config.model must name the head"),
        (_spec(str(tmp_path / "missing")), "speculative_config.model"),
        (_spec(wrong_hidden), r"speculative_config.model .* hidden_size 32.* hidden_size 64"),
        (_spec(bad_d2t), r"speculative_config.model .* d2t"),
        (_spec(too_big), r"speculative_config.model .* draft_vocab_size 80"),
        (_spec(not_head), r"speculative_config.model .* not an EAGLE-3 head"),
        (_spec(tiny_target, num_speculative_tokens=0), "num_speculative_tokens"),
    ]
    for spec, match in cases:
        with pytest.raises(ConfigError, match=match):
            LLM(tiny_target, max_model_len=128, speculative_config=spec)


def test_llama_8b_head_preset_config():
    cfg = EngineArgs(model="Llama-3.1-8B", load_format="dummy", max_model_len=256,
                     speculative_config=_spec("Llama-3.1-8B-EAGLE3")).create_engine_config()
    sc = cfg.speculative_config
    hc = sc.draft_model_config.hf_config
    assert sc.method == "eagle3" and sc.draft_model_config.architecture == "LlamaForCausalLMEagle3"
    assert hc.hidden_size == 4096 and hc.draft_vocab_size == 32000 and hc.vocab_size == 128256
    assert cfg.scheduler_config.num_lookahead_tokens == K


@pytest.mark.gpu
def test_gpu_head_with_cuda_graphs_equals_no_speculation(smollm2_path, tmp_path):
    # On CUDA the target writes its three depths inside its decode and piecewise
    # graphs, and the head's proposals and short catch-ups replay graphs of
    # their own; float32 keeps near-ties apart.
    head = head_for(smollm2_path, tmp_path / "head", seed=2)
    base = LLM(smollm2_path, **GPU_KW)
    prompts = [base.llm_engine.input_processor.tokenize(p) for p in PROMPTS]
    ref = [o.outputs[0].token_ids for o in base.generate(prompts, GREEDY, use_tqdm=False)]
    base.llm_engine.shutdown()
    del base
    llm = LLM(smollm2_path, speculative_config=_spec(head), **GPU_KW)
    runner = _runner(llm)
    assert runner.cuda_graphs is not None and runner.cuda_graphs.aux_hidden is runner.aux_hidden
    assert runner.draft_proposer.cuda_graphs is not None and runner.draft_proposer.piecewise_graphs is not None
    for p, want in zip(prompts[:3], ref):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == want
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)] == ref
    assert _counters(llm).spec_num_draft_tokens > 0
    llm.llm_engine.shutdown()
