"""compressed-tensors FP8 W8A8 and W4A16 checkpoints written by the
compressed-tensors library itself (tests/layers/quantization/ct_checkpoints.py),
loaded by Ember (through Fp8LinearMethod and PackQuantizedW4A16Method) and by
HF transformers, whose compressed-tensors integration decompresses the
weights and fake-quantizes the activations in float32: the reference. The
tolerances are those of test_compressed_tensors.check_checkpoint_against_hf
(activation rounding flips) for FP8; W4A16 has no activation quantization,
so its logits agree to float32 rounding and every greedy token is equal; its
reference is the library's own decompression of the stored tensors (HF
transformers cannot load packed asymmetric zero points; where it loads the
checkpoint, the two references agree)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from transformers import AutoModelForCausalLM

from ember.layers.quantization.fp8_linear import Fp8LinearMethod
from ember.layers.quantization.w4a16 import PackQuantizedW4A16Method
from tests.layers.quantization.ct_checkpoints import library_dequantized_model, save_compressed
from tests.layers.quantization.test_compressed_tensors import check_checkpoint_against_hf
from tests.models.tiny import (ember_llm, hf_greedy, hf_prefill_logits, make_prompts, one_thread, relative_error,
                               random_llama, runner_of)

pytestmark = pytest.mark.slow

FP8_SCHEMES = {
    # llm-compressor's FP8_DYNAMIC preset: channel weights, dynamic per-token activations.
    "fp8_dynamic": "FP8_DYNAMIC",
    # its FP8 preset: tensor weights, static per-tensor activations (calibrated).
    "fp8_static": "FP8",
}


@pytest.mark.parametrize("name", sorted(FP8_SCHEMES))
def test_fp8_checkpoint_saved_by_the_library(tmp_path, name):
    path = save_compressed(random_llama(), FP8_SCHEMES[name], tmp_path)
    runner = runner_of(ember_llm(path))
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv.quant_method, Fp8LinearMethod) and qkv.weight.dtype == torch.float8_e4m3fn
    del runner
    check_checkpoint_against_hf(path, Fp8LinearMethod)


def _w4a16(group_size: int | None, symmetric: bool) -> QuantizationScheme:
    strategy = "group" if group_size else "channel"
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", strategy=strategy, group_size=group_size, symmetric=symmetric))


@pytest.mark.parametrize("group_size, symmetric", [(32, True), (32, False), (None, True)])
def test_w4a16_checkpoint_saved_by_the_library(tmp_path, group_size, symmetric):
    path = save_compressed(random_llama(), _w4a16(group_size, symmetric), tmp_path)
    import json
    config = json.load(open(f"{path}/config.json"))["quantization_config"]
    assert config["format"] == "pack-quantized"
    # NOTE: HF transformers cannot load packed asymmetric zero points (it expects
    # them unpacked); the library's own decompression is the reference.
    hf = library_dequantized_model(path)
    if symmetric:  # where HF can load it, its model is the same
        via_hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        p = make_prompts()[0]
        assert relative_error(hf_prefill_logits(via_hf, p), hf_prefill_logits(hf, p)) < 1e-5
    prompts = make_prompts()
    with one_thread():
        llm = ember_llm(path)
        runner = runner_of(llm)
        methods = [m for m in runner.model.modules()
                   if isinstance(getattr(m, "quant_method", None), PackQuantizedW4A16Method)]
        assert len(methods) == 8
        from ember import SamplingParams
        for p in prompts:
            rel = relative_error(runner.compute_prompt_logits(p), hf_prefill_logits(hf, p))
            assert rel < 1e-4, rel
            out = llm.generate([list(p)], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
            assert out == hf_greedy(hf, p, 16)


def test_scheme_parameters_reach_the_methods():
    """FP8 static/dynamic and W4A16 group size, symmetry and act order (the
    legacy actorder "group" included) as the layer's method receives them."""
    from ember.layers.linear import RowParallelLinear
    from ember.layers.quantization.compressed_tensors import CompressedTensorsConfig

    def layer(weights, inputs, fmt):
        group = {"targets": ["Linear"], "format": fmt, "weights": weights, "input_activations": inputs}
        config = CompressedTensorsConfig.from_config({"quant_method": "compressed-tensors", "format": fmt,
                                                      "config_groups": {"group_0": group}, "ignore": []})
        return RowParallelLinear(256, 64, quant_config=config, prefix="model.layers.0.mlp.down_proj").quant_method

    fp8 = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}
    static = layer(fp8, {**fp8}, "float-quantized")
    assert isinstance(static, Fp8LinearMethod) and static.quant_config.activation_scheme == "static"
    assert static.quant_config.is_checkpoint_fp8_serialized
    dynamic = layer({**fp8, "strategy": "channel"}, {**fp8, "strategy": "token", "dynamic": True}, "float-quantized")
    assert dynamic.quant_config.activation_scheme == "dynamic"
    w4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False, "dynamic": False,
          "actorder": "group"}
    method = layer(w4, None, "pack-quantized")
    assert isinstance(method, PackQuantizedW4A16Method)
    assert method.group_size == 128 and not method.symmetric and method.act_order


@pytest.mark.parametrize("static", [False, True])
def test_fp8_moe_experts_take_fp8_moe_method(static):
    from ember.layers.moe.layer import FusedMoE
    from ember.layers.quantization.compressed_tensors import CompressedTensorsConfig
    from ember.layers.quantization.fp8_moe import Fp8MoEMethod

    fp8 = {"num_bits": 8, "type": "float", "strategy": "channel", "dynamic": False}
    inputs = {**fp8, "strategy": "tensor"} if static else {**fp8, "strategy": "token", "dynamic": True}
    group = {"targets": ["Linear"], "format": "float-quantized", "weights": fp8, "input_activations": inputs}
    config = CompressedTensorsConfig.from_config({"quant_method": "compressed-tensors", "format": "float-quantized",
                                                  "config_groups": {"group_0": group},
                                                  "ignore": ["lm_head", "re:.*mlp.gate$"]})
    experts = FusedMoE(4, 32, 16, quant_config=config, prefix="model.layers.0.mlp.experts")
    assert isinstance(experts.quant_method, Fp8MoEMethod)
    assert experts.quant_method.quant_config.activation_scheme == ("static" if static else "dynamic")
