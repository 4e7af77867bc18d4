"""DeepSeek-V3 (MLA + MoE) vs HF transformers on tiny random checkpoints.

Every feature is on: low-rank queries, MLA with v_head_dim != qk_nope_head_dim,
interleaved YaRN rope with mscale_all_dim (softmax scale and cos/sin factor
both != 1), a dense first layer, grouped sigmoid routing with a nonzero
e_score_correction_bias, shared experts, routed_scaling_factor. Also: a
checkpoint with an MTP layer (skipped), and FP8 block-quantized checkpoints (run in FP8).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from ember.layers.attention.mla import TorchMLABackend
from ember.loader.weight_utils import dequant_fp8_block
from tests.models.tiny import (BLOCK_SIZE, check_model_vs_hf, check_prefill_logits, ember_llm, make_prompts,
                               one_thread, randomize_norms_, runner_of, save_tiny)

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, mscale=1.0,
            mscale_all_dim=0.8, beta_fast=32, beta_slow=1)


def tiny_config(**overrides) -> DeepseekV3Config:
    fields = dict(
        vocab_size=80, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=24,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_group=4, topk_group=2,
        num_experts_per_tok=3, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        max_position_embeddings=128, initializer_range=0.2, rope_interleave=True, rope_parameters=dict(YARN))
    # NOTE: HF's default num_key_value_heads is 128; MLA ignores it but HF's
    # eager attention repeats K/V num_heads // num_key_value_heads times.
    return DeepseekV3Config(**(fields | overrides))


def tiny_model(config: DeepseekV3Config, seed: int = 0) -> DeepseekV3ForCausalLM:
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval()
    randomize_norms_(model, seed)
    with torch.no_grad():  # zeros at init: make the selection bias matter
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.normal_(0, 0.1)
    return model


def test_deepseek_v3_matches_hf(tmp_path):
    hf = tiny_model(tiny_config())
    check_model_vs_hf(hf, save_tiny(hf, tmp_path, max_shard_size="200KB"))


def test_mla_cache_layout_and_decode_path(tmp_path, monkeypatch):
    """The cache holds only the latent + rotary key per token, and decode steps
    run the absorbed form (prefill the decompressed one)."""
    config = tiny_config()
    llm = ember_llm(save_tiny(tiny_model(config), tmp_path))
    runner = runner_of(llm)
    caches = runner.kv_caches
    assert len(caches) == config.num_hidden_layers
    assert caches[0].shape[1:] == (BLOCK_SIZE, config.kv_lora_rank + config.qk_rope_head_dim)
    assert runner.kv_cache_bytes_per_block() == 3 * BLOCK_SIZE * (24 + 8) * 4
    calls = {"absorbed": 0, "decompressed": 0}
    for path, key in (("_decode_absorbed", "absorbed"), ("_prefill_decompressed", "decompressed")):
        orig = getattr(TorchMLABackend, path)

        def counted(*args, _orig=orig, _key=key, **kwargs):
            calls[_key] += 1
            return _orig(*args, **kwargs)

        monkeypatch.setattr(TorchMLABackend, path, counted)
    from ember import SamplingParams

    with one_thread():
        llm.generate([make_prompts()[1]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
    assert calls == {"absorbed": 4 * 3, "decompressed": 1 * 3}


def test_profile_pass_stays_within_the_served_positions(tmp_path, monkeypatch):
    """The memory-profiling forward of max_num_batched_tokens tokens (run on
    CUDA when no KV cache size is given) packs them as prompts of at most
    max_model_len tokens: a budget past the rotary cache (128 positions here)
    must not index the cos/sin cache out of bounds (the interleaved rope
    gathers rows by position)."""
    config = tiny_config()
    llm = ember_llm(save_tiny(tiny_model(config), tmp_path), max_model_len=96, max_num_batched_tokens=300)
    runner = runner_of(llm)
    seen = []
    orig = runner._run_model

    def run_model(input_ids, positions, ctx):
        seen.append((positions.clone(), list(ctx.attn_metadata.seq_lens_cpu)))
        return orig(input_ids, positions, ctx)

    monkeypatch.setattr(runner, "_run_model", run_model)
    saved = runner.kv_caches
    with one_thread():
        runner.profile_run()
    (positions, seq_lens), = seen
    assert seq_lens == [75, 75, 75, 75] and len(positions) == 300
    assert int(positions.max()) == 74
    assert runner.kv_caches is saved
    # The engine still serves the same logits afterwards.
    check_prefill_logits(llm, tiny_model(config), make_prompts()[:1])


@pytest.mark.parametrize("overrides", [
    dict(q_lora_rank=None, rope_interleave=False, n_shared_experts=2, first_k_dense_replace=0, n_group=1,
         topk_group=1, norm_topk_prob=False),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, num_experts_per_tok=1),
], ids=["plain-q-neox-no-groups", "no-yarn-top1"])
def test_deepseek_v3_variants_prefill(tmp_path, overrides):
    hf = tiny_model(tiny_config(**overrides))
    check_prefill_logits(ember_llm(save_tiny(hf, tmp_path)), hf, make_prompts())


def test_mtp_layers_are_skipped(tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP module as layer num_hidden_layers."""
    config = tiny_config()
    hf = tiny_model(config)
    path = save_tiny(hf, tmp_path)
    mtp = {f"model.layers.{config.num_hidden_layers}.{k.split('.', 3)[3]}": v.clone()
           for k, v in hf.state_dict().items() if k.startswith("model.layers.2.")}
    mtp[f"model.layers.{config.num_hidden_layers}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(mtp, str(tmp_path / "mtp.safetensors"))
    check_prefill_logits(ember_llm(path), hf, make_prompts()[:2])


def quantize_fp8_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block absmax scaling into float8_e4m3fn (max 448), as DeepSeek's FP8 checkpoints."""
    m, n = w.shape
    mb, nb = -(-m // block), -(-n // block)
    padded = torch.nn.functional.pad(w.float(), (0, nb * block - n, 0, mb * block - m))
    blocks = padded.view(mb, block, nb, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0
    q = (blocks / scale[:, None, :, None]).view(mb * block, nb * block)[:m, :n].to(torch.float8_e4m3fn)
    return q, scale


def _write_fp8_block_checkpoint(hf, tmp_path, block: int) -> str:
    """Save ``hf`` with every projection stored as FP8 + weight_scale_inv
    (``block`` x ``block``), and load HF's copy with the dequantized weights."""
    path = save_tiny(hf, tmp_path)
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    quantized = {}
    for name, w in state.items():
        if name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight"):
            q, scale_inv = quantize_fp8_block(w, block)
            quantized[name], quantized[name + "_scale_inv"] = q, scale_inv
            state[name] = dequant_fp8_block(q, scale_inv, (block, block), torch.float32)
        else:
            quantized[name] = w
    assert sum(n.endswith("_scale_inv") for n in quantized) > 10
    hf.load_state_dict(state)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    save_file(quantized, str(tmp_path / "model.safetensors"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [block, block]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return path


def _quantize_linear_inputs_(hf, group: int) -> None:
    """Forward pre-hooks giving every projection except kv_b_proj (kept dense
    by Ember: the absorbed MLA reads its weight) FP8 activations per token and
    ``group`` columns: the W8A8 math of Ember's block scheme."""
    from ember.layers.quantization.fp8_linear import dequantize_fp8, quant_fp8_reference

    def hook(mod, args):
        x = args[0]
        q, s = quant_fp8_reference(x.reshape(-1, x.shape[-1]), group=group)
        return (dequantize_fp8(q, s, (1, group)).view_as(x),)

    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.") and not name.endswith("kv_b_proj"):
            m.register_forward_pre_hook(hook)


def test_fp8_block_checkpoint_runs_fp8(tmp_path):
    """Dense layers only (no routed experts): linear weights stored as FP8 +
    weight_scale_inv (16x16 blocks, so the tiny weights span full and partial
    blocks) stay FP8 in Ember, kv_b_proj is dequantized once, and the logits
    equal HF's with the dequantized weights and the same activation
    quantization."""
    from ember.layers.quantization.fp8_linear import Fp8LinearMethod

    block = 16
    hf = tiny_model(tiny_config(first_k_dense_replace=3))
    path = _write_fp8_block_checkpoint(hf, tmp_path, block)
    _quantize_linear_inputs_(hf, block)
    llm = ember_llm(path)
    model = runner_of(llm).model
    attn = model.model.layers[0].self_attn
    assert attn.kv_b_proj.weight.dtype == torch.float32
    assert isinstance(attn.o_proj.quant_method, Fp8LinearMethod) and attn.o_proj.weight.dtype == torch.float8_e4m3fn
    torch.testing.assert_close(attn.kv_b_proj.weight, hf.model.layers[0].self_attn.kv_b_proj.weight, rtol=0, atol=0)
    check_prefill_logits(llm, hf, make_prompts())
