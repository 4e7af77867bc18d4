"""DeepSeek-V3 MTP module (:mod:`ember.models.deepseek_mtp`) vs a float32
reference written here.

HF transformers' DeepseekV3 ignores MTP weights, so the reference composes
the MTP step by hand (DeepSeek-V3 Technical Report, section 2.2): embedding
and hidden-state norms, ``eh_proj`` over their concatenation, then one
decoder block, then ``shared_head``. The block is HF's own
``DeepseekV3DecoderLayer`` (MLA + MoE, eager attention with an explicit
causal mask), taken from an HF model one layer deeper than the target; the
target's hidden states come from HF's model. The checkpoint stores the MTP
layer under the released names (``model.layers.{N}.*``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ember.layers.attention import AttentionMetadata, ForwardContext
from ember.layers.attention.backend import get_attention_backend
from ember.models.deepseek_mtp import DeepseekV3MTP
from tests.models.test_deepseek_v3 import tiny_config, tiny_model
from tests.models.tiny import make_prompts, one_thread

BLOCK = 4


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def write_mtp_checkpoint(path, seed: int = 0, own_embed: bool = True, **overrides):
    """A tiny DeepSeek-V3 checkpoint (3 layers) with one MTP layer.

    Returns:
        ``(path, target HF model, HF model one layer deeper whose last layer
        is the MTP block, the MTP-only tensors)``.
    """
    config = tiny_config(num_nextn_predict_layers=1, **overrides)
    n = config.num_hidden_layers
    deep_config = tiny_config(num_hidden_layers=n + 1, **overrides)
    deep_config._attn_implementation = "eager"
    deep = tiny_model(deep_config, seed)
    target = tiny_model(config, seed)
    target.load_state_dict({k: v for k, v in deep.state_dict().items()
                            if not k.startswith(f"model.layers.{n}.")})
    g = torch.Generator().manual_seed(seed + 1)
    h, vocab = config.hidden_size, config.vocab_size
    extra = {f"model.layers.{n}.enorm.weight": 1 + 0.2 * torch.randn(h, generator=g),
             f"model.layers.{n}.hnorm.weight": 1 + 0.2 * torch.randn(h, generator=g),
             f"model.layers.{n}.eh_proj.weight": 0.2 * torch.randn(h, 2 * h, generator=g),
             f"model.layers.{n}.shared_head.norm.weight": 1 + 0.2 * torch.randn(h, generator=g),
             f"model.layers.{n}.shared_head.head.weight": 0.2 * torch.randn(vocab, h, generator=g)}
    if own_embed:
        extra[f"model.layers.{n}.embed_tokens.weight"] = 0.2 * torch.randn(vocab, h, generator=g)
    target.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    block = {k: v.clone().contiguous() for k, v in deep.state_dict().items() if k.startswith(f"model.layers.{n}.")}
    save_file(block | extra, str(path / "mtp.safetensors"))
    return path, target, deep, extra


@torch.inference_mode()
def reference_mtp_logits(target, deep, extra: dict, tokens: list[int]) -> torch.Tensor:
    """Plain float32 MTP over a whole sequence: row i uses ``h_i`` and
    ``t_{i+1}`` and gives logits for ``t_{i+2}`` ([len(tokens) - 1, vocab])."""
    cfg = target.config
    n, eps = cfg.num_hidden_layers, cfg.rms_norm_eps
    ids = torch.tensor([tokens])
    hidden = target.model(input_ids=ids).last_hidden_state[0, :-1]  # h_0 .. h_{L-2}, normed
    embed_w = extra.get(f"model.layers.{n}.embed_tokens.weight", target.model.embed_tokens.weight)
    e = F.embedding(ids[0, 1:], embed_w)  # t_1 .. t_{L-1}
    x = torch.cat([_rms(e, extra[f"model.layers.{n}.enorm.weight"], eps),
                   _rms(hidden, extra[f"model.layers.{n}.hnorm.weight"], eps)], dim=-1)
    x = (x @ extra[f"model.layers.{n}.eh_proj.weight"].T).unsqueeze(0)
    m = x.shape[1]
    positions = torch.arange(m).unsqueeze(0)
    mask = torch.full((m, m), float("-inf")).triu(1)[None, None]
    out = deep.model.layers[n](x, attention_mask=mask, position_ids=positions,
                               position_embeddings=deep.model.rotary_emb(x, positions))
    out = out[0] if isinstance(out, tuple) else out
    normed = _rms(out[0], extra[f"model.layers.{n}.shared_head.norm.weight"], eps)
    return normed @ extra[f"model.layers.{n}.shared_head.head.weight"].T


def _meta(starts: list[int], counts: list[int], num_blocks_per_req: int) -> AttentionMetadata:
    """Request r's tokens at positions starts[r] .. +counts[r], blocks r*nb .. (r+1)*nb - 1."""
    slots, qsl = [], [0]
    for r, (s, c) in enumerate(zip(starts, counts)):
        slots += [r * num_blocks_per_req * BLOCK + p for p in range(s, s + c)]
        qsl.append(qsl[-1] + c)
    seq_lens = [s + c for s, c in zip(starts, counts)]
    table = torch.tensor([[r * num_blocks_per_req + b for b in range(num_blocks_per_req)]
                          for r in range(len(starts))], dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=table, max_query_len=max(counts),
        max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
        num_decodes=sum(1 for c in counts if c == 1) if all(c == 1 for c in counts) else 0)


def _load_ember_mtp(path) -> DeepseekV3MTP:
    from ember.loader import iter_weights, read_hf_config, resolve_model_source

    source = resolve_model_source(str(path))
    config = read_hf_config(source)
    model = DeepseekV3MTP(config, get_attention_backend("torch")).eval()
    loaded = model.load_weights(iter_weights(source, torch.float32, False))
    assert loaded == {name for name, _ in model.named_parameters()}
    return model


@pytest.mark.parametrize("own_embed", [True, False], ids=["own-embedding", "shared-embedding"])
def test_mtp_step_matches_reference(tmp_path, own_embed):
    """Prefill (all positions), then per-position decode steps (the absorbed
    MLA path) over the MTP's own paged cache, for two requests packed."""
    path, target, deep, extra = write_mtp_checkpoint(tmp_path, own_embed=own_embed)
    model = _load_ember_mtp(path)
    prompts = make_prompts((9, 14), vocab=target.config.vocab_size)
    refs = [reference_mtp_logits(target, deep, extra, p) for p in prompts]
    with torch.inference_mode():
        hiddens = [target.model(input_ids=torch.tensor([p])).last_hidden_state[0, :-1] for p in prompts]
    spec = DeepseekV3MTP.kv_cache_spec(target.config, BLOCK, torch.float32)
    nb = 4
    caches = [torch.zeros(spec.layer_shape(2 * nb)) for _ in range(spec.num_layers)]
    assert spec.num_layers == 1
    with one_thread(), torch.inference_mode():
        # Prefill all but the last two MTP positions of each request, packed.
        counts = [len(p) - 3 for p in prompts]
        ids = torch.tensor([t for p, c in zip(prompts, counts) for t in p[1: 1 + c]])
        pos = torch.cat([torch.arange(c) for c in counts])
        prev = torch.cat([h[:c] for h, c in zip(hiddens, counts)])
        out = model(ids, pos, ForwardContext(_meta([0, 0], counts, nb), caches), prev)
        logits = model.compute_logits(out)
        ours = list(logits.split(counts))
        # Then two decode steps (one token per request each).
        for j in range(2):
            at = [c + j for c in counts]
            ids = torch.tensor([p[a + 1] for p, a in zip(prompts, at)])
            prev = torch.stack([h[a] for h, a in zip(hiddens, at)])
            out = model(ids, torch.tensor(at), ForwardContext(_meta(at, [1, 1], nb), caches), prev)
            step = model.compute_logits(out)
            ours = [torch.cat([o, step[r: r + 1]]) for r, o in enumerate(ours)]
    for r, (o, ref) in enumerate(zip(ours, refs)):
        assert o.shape == ref.shape
        err = float((o - ref).abs().max() / ref.abs().max())
        assert err < 1e-4, f"request {r}: relative logit error {err:.2e}"
    # The layer and its inputs matter (a wrong wiring would not match): sanity on the reference.
    assert not torch.allclose(refs[0][:, :], refs[0][:1].expand_as(refs[0]))


def test_mtp_output_hidden_feeds_the_next_depth(tmp_path):
    """k > 1 reuses the layer on its own output (before shared_head.norm)."""
    path, target, deep, extra = write_mtp_checkpoint(tmp_path)
    model = _load_ember_mtp(path)
    spec = DeepseekV3MTP.kv_cache_spec(target.config, BLOCK, torch.float32)
    caches = [torch.zeros(spec.layer_shape(4))]
    h = torch.randn(1, target.config.hidden_size)
    with torch.inference_mode():
        o1 = model(torch.tensor([5]), torch.tensor([0]), ForwardContext(_meta([0], [1], 4), caches), h)
        o2 = model(torch.tensor([7]), torch.tensor([1]), ForwardContext(_meta([1], [1], 4), caches), o1)
        # Reference for the second position: the same step over both positions at once.
        fresh = [torch.zeros(spec.layer_shape(4))]
        both = model(torch.tensor([5, 7]), torch.tensor([0, 1]), ForwardContext(_meta([0], [2], 4), fresh),
                     torch.cat([h, o1]))
    assert torch.allclose(o2[0], both[1], rtol=1e-4, atol=1e-5)


def test_mtp_requires_a_layer():
    config = tiny_config(num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="num_nextn_predict_layers"):
        DeepseekV3MTP(config, get_attention_backend("torch"))
