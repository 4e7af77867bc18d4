"""FP8 block dequantization (DeepSeek-V3's ``weight_scale_inv`` per 128x128 block)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ember.loader import ModelLoadError, ModelSource, iter_weights
from ember.loader.weight_utils import dequant_fp8_block, fp8_block_size

FP8_MAX = 448.0  # largest float8_e4m3fn value


def quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax per block -> (float8_e4m3fn weight, float32 scale_inv), block by block."""
    m, n = w.shape
    q = torch.empty(m, n, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-m // block), -(-n // block))
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            tile = w[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block].float()
            scale[bi, bj] = tile.abs().max() / FP8_MAX
            q[bi * block:(bi + 1) * block, bj * block:(bj + 1) * block] = (tile / scale[bi, bj]).to(torch.float8_e4m3fn)
    return q, scale


def dequant_loop(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    out = torch.empty(q.shape)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = q[rows, cols].float() * scale[bi, bj]
    return out


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    """300 x 200: 3 x 2 blocks, the last row and column of blocks partial;
    each block with its own magnitude so that per-block scales matter."""
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    w *= torch.logspace(-2, 1, 6).view(3, 2).repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    return w.to(torch.bfloat16)


def test_dequant_matches_loop_and_original(weight):
    q, scale = quantize(weight)
    assert scale.shape == (3, 2)
    ours = dequant_fp8_block(q, scale, (128, 128), torch.float32)
    assert torch.equal(ours, dequant_loop(q, scale))
    # e4m3 keeps 3 mantissa bits: <= 2^-4 relative error, plus half a subnormal step (2^-10) of the block scale.
    block_scale = scale.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    err = (ours - weight.float()).abs()
    assert bool((err <= weight.float().abs() * 2 ** -4 + block_scale * 2 ** -10).all())
    assert dequant_fp8_block(q, scale).dtype == torch.bfloat16


def test_scale_shape_is_checked(weight):
    q, scale = quantize(weight)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        dequant_fp8_block(q, scale[:2])


def _write_checkpoint(path, tensors_by_shard: dict[str, dict[str, torch.Tensor]], quant: dict | None) -> None:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if quant is not None:
        config["quantization_config"] = quant
    (path / "config.json").write_text(json.dumps(config))
    weight_map = {}
    for shard, tensors in tensors_by_shard.items():
        save_file(tensors, str(path / shard))
        weight_map |= {name: shard for name in tensors}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_iter_weights_dequantizes_across_shards(tmp_path, weight):
    """The scale may sit in another shard than its weight; scales are not yielded."""
    q, scale = quantize(weight, block=64)
    norm = torch.randn(200)
    _write_checkpoint(tmp_path, {
        "model-00001-of-00002.safetensors": {"model.layers.0.mlp.down_proj.weight": q, "model.norm.weight": norm},
        "model-00002-of-00002.safetensors": {"model.layers.0.mlp.down_proj.weight_scale_inv": scale},
    }, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]})
    assert fp8_block_size(str(tmp_path)) == (64, 64)
    ours = dict(iter_weights(ModelSource("hf", str(tmp_path)), torch.float32))
    assert set(ours) == {"model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"], dequant_loop(q, scale, block=64))
    assert torch.equal(ours["model.norm.weight"], norm)


def test_fp8_without_scale_is_an_error(tmp_path, weight):
    q, _ = quantize(weight)
    _write_checkpoint(tmp_path, {"model.safetensors": {"model.layers.0.mlp.down_proj.weight": q}}, None)
    with pytest.raises(ModelLoadError, match="weight_scale_inv"):
        list(iter_weights(ModelSource("hf", str(tmp_path)), torch.float32))


def test_wrong_scale_shape_is_an_error(tmp_path, weight):
    q, scale = quantize(weight)
    _write_checkpoint(tmp_path, {"model.safetensors": {"w.weight": q, "w.weight_scale_inv": scale[:, :1].contiguous()}},
                      {"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ModelLoadError, match="w.weight"):
        list(iter_weights(ModelSource("hf", str(tmp_path)), torch.bfloat16))


def test_keep_quantized_yields_tensors_as_stored(tmp_path, weight):
    """For a method that runs FP8 itself: weight and scale come uncast, undequantized."""
    q, scale = quantize(weight, block=64)
    norm = torch.randn(200, dtype=torch.bfloat16)
    _write_checkpoint(tmp_path, {"model.safetensors": {"model.layers.0.mlp.down_proj.weight": q,
                                                       "model.layers.0.mlp.down_proj.weight_scale_inv": scale,
                                                       "model.norm.weight": norm}},
                      {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [64, 64]})
    ours = dict(iter_weights(ModelSource("hf", str(tmp_path)), torch.float32, keep_quantized=True))
    assert ours["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(ours["model.layers.0.mlp.down_proj.weight_scale_inv"], scale)
    assert ours["model.norm.weight"].dtype == torch.bfloat16 and torch.equal(ours["model.norm.weight"], norm)
