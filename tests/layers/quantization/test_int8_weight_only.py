"""Int8 weight-only quantization against float32 PyTorch, the method registry's
errors, the ``--quantization`` option, and the linear layers' quant seam."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ember.layers.quantization import get_quant_config, get_quantization_config_class
from ember.layers.quantization.int8_weight_only import (Int8WeightOnlyConfig, Int8WeightOnlyLinearMethod,
                                                        quantize_per_channel_int8)


def _quantized_layer(weight: torch.Tensor, dtype: torch.dtype = torch.float32) -> nn.Module:
    layer = nn.Module()
    method = Int8WeightOnlyLinearMethod()
    n, k = weight.shape
    method.create_weights(layer, k, [n], k, n, dtype)
    assert layer.weight.shape == (n, k) and layer.weight.dtype == dtype
    layer.weight.data.copy_(weight)
    method.process_weights_after_loading(layer)
    layer.quant_method = method
    return layer


def test_quantize_per_channel_round_trip_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, generator=gen) * torch.logspace(-3, 2, 8)[:, None]  # rows of very different scale
    w[3] = 0.0
    q, scale = quantize_per_channel_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (8,)
    assert int(q.abs().max()) == 127
    deq = q.float() * scale[:, None]
    # Round to nearest: each weight is off by at most half a step of its own row.
    assert torch.all((deq - w).abs() <= scale[:, None] / 2 * (1 + 1e-6))
    assert torch.equal(q[3], torch.zeros(32, dtype=torch.int8)) and scale[3] == 1.0
    # Each row's largest magnitude is represented exactly (it maps to +-127).
    torch.testing.assert_close(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)


def test_apply_matches_float32_within_quantization_error() -> None:
    gen = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen), torch.randn(5, 40, generator=gen)
    layer = _quantized_layer(w)
    assert not hasattr(layer, "weight"), "the float weight is dropped after quantization"
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_scale.shape == (24,)
    y = layer.quant_method.apply(layer, x, b)
    ref = F.linear(x, w, b)
    # |x @ (W - Wq).T| <= sum_k |x_k| * scale_n / 2
    bound = x.abs().sum(1, keepdim=True) * layer.weight_scale[None, :] / 2
    err = (y - ref).abs()
    assert torch.all(err <= bound + 1e-5), (err / bound).max()
    assert err.max() > 0  # it really is quantized
    # Exactly representable weights give the float32 result.
    exact = torch.randint(-127, 128, (24, 40), generator=gen).float() * 0.03125
    exact[:, 0] = 127 * 0.03125
    layer = _quantized_layer(exact)
    torch.testing.assert_close(layer.quant_method.apply(layer, x, b), F.linear(x, exact, b), rtol=1e-6, atol=1e-5)


def test_apply_keeps_activation_dtype() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 32, generator=gen)
    layer = _quantized_layer(w.bfloat16(), torch.bfloat16)
    x = torch.randn(3, 32, generator=gen).bfloat16()
    y = layer.quant_method.apply(layer, x, None)
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)
    torch.testing.assert_close(y.float(), F.linear(x.float(), w), rtol=0.05, atol=0.15)


def test_registry_and_get_quant_config_errors() -> None:
    assert get_quantization_config_class("int8_weight_only") is Int8WeightOnlyConfig
    plain = types.SimpleNamespace()
    assert get_quant_config(None, plain) is None
    assert isinstance(get_quant_config("int8_weight_only", plain), Int8WeightOnlyConfig)
    with pytest.raises(ValueError, match="unknown quantization method 'int4_magic'"):
        get_quant_config("int4_magic", plain)
    fp8_ckpt = types.SimpleNamespace(quantization_config={"quant_method": "fp8", "fmt": "e4m3"})
    with pytest.raises(ValueError, match="does not match the checkpoint"):
        get_quant_config("int8_weight_only", fp8_ckpt)
    # A checkpoint scheme with no registered method is left to the loader.
    assert get_quant_config(None, types.SimpleNamespace(quantization_config={"quant_method": "bitsandbytes"})) is None
    # A checkpoint that claims to be saved in this online-only scheme is refused.
    saved = types.SimpleNamespace(quantization_config={"quant_method": "int8_weight_only", "bits": 8})
    with pytest.raises(ValueError, match="quantizes a floating-point checkpoint at load"):
        get_quant_config(None, saved)


def test_quant_method_only_for_linear_layers() -> None:
    from ember.layers.linear import LinearBase

    config = Int8WeightOnlyConfig.from_config({})
    assert config.get_quant_method(nn.Embedding(4, 4), "model.embed_tokens") is None
    linear = LinearBase.__new__(LinearBase)  # the type decides; no weights needed
    assert isinstance(config.get_quant_method(linear, "model.layers.0.mlp.down_proj"), Int8WeightOnlyLinearMethod)


def test_engine_args_quantization(smollm2_path: str) -> None:
    from ember.config import ConfigError
    from ember.engine.arg_utils import EngineArgs

    cfg = EngineArgs(model=smollm2_path, device="cpu", quantization="int8_weight_only").create_engine_config()
    assert cfg.model_config.quantization == "int8_weight_only"
    assert EngineArgs(model=smollm2_path, device="cpu").create_engine_config().model_config.quantization is None
    with pytest.raises(ConfigError, match="quantization: unknown quantization method 'awq9'"):
        EngineArgs(model=smollm2_path, device="cpu", quantization="awq9").create_engine_config()


def test_cli_quantization_flag() -> None:
    import argparse

    from ember.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = EngineArgs.from_cli_args(parser.parse_args(["--quantization", "int8_weight_only"]))
    assert args.quantization == "int8_weight_only"
    assert EngineArgs.from_cli_args(parser.parse_args([])).quantization is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "nope"])
