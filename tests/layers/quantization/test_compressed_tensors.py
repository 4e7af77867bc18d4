"""compressed-tensors checkpoints: the config as the compressed-tensors library
parses it, each layer's scheme (targets, regexes, ignore lists, merged
projections), errors for schemes Ember does not run, and a tiny Llama
quantized to W8A8 INT8 and saved by the library itself, loaded by Ember and by
HF transformers (whose compressed-tensors integration decompresses the weights
and fake-quantizes the activations per token in float32: the reference)."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from transformers import AutoModelForCausalLM

from ember.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ember.layers.quantization import get_quant_config
from ember.layers.quantization.compressed_tensors import CompressedTensorsConfig
from ember.layers.quantization.w8a8_int8 import W8A8Int8LinearMethod, int8_scaled_mm_reference, \
    quantize_per_token_int8
from tests.layers.quantization.ct_checkpoints import save_compressed
from tests.models.tiny import (ember_llm, hf_greedy, hf_prefill_logits, make_prompts, one_thread,
                               random_llama, relative_error, runner_of)


def _w8a8_group(targets, static=False):
    return {"targets": targets, "format": "int-quantized",
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True,
                                  "strategy": "tensor" if static else "token", "dynamic": not static}}


def _config(groups, ignore=("lm_head",), **extra):
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "config_groups": groups,
            "ignore": list(ignore), "quantization_status": "compressed", **extra}


def _qkv(config, prefix="model.layers.0.self_attn.qkv_proj"):
    return QKVParallelLinear(32, 8, 4, 2, quant_config=config, prefix=prefix)


def test_checkpoint_config_selects_compressed_tensors():
    hf = type("C", (), {"quantization_config": _config({"group_0": _w8a8_group(["Linear"])})})()
    config = get_quant_config(None, hf)
    assert isinstance(config, CompressedTensorsConfig) and config.raw_checkpoint
    with pytest.raises(ValueError, match="checkpoint format"):
        CompressedTensorsConfig.from_config({})


def test_layers_take_their_group_scheme():
    config = CompressedTensorsConfig.from_config(_config(
        {"dynamic": _w8a8_group(["Linear"]), "static": _w8a8_group(["re:.*mlp.down_proj$"], static=True)},
        ignore=["lm_head", "re:.*layers\\.1\\..*"]))
    qkv = _qkv(config)
    assert isinstance(qkv.quant_method, W8A8Int8LinearMethod)
    assert qkv.quant_method.checkpoint_int8 and not qkv.quant_method.static_input_scale
    assert qkv.weight.dtype == torch.int8 and qkv.weight_scale.shape == (64, 1)
    # A regex target is more specific than the class name "Linear".
    down = RowParallelLinear(64, 32, quant_config=config, prefix="model.layers.0.mlp.down_proj")
    assert down.quant_method.static_input_scale and down.input_scale.shape == (1,)
    # Ignored by regex: the plain layer.
    up = MergedColumnParallelLinear(32, [64, 64], quant_config=config, prefix="model.layers.1.mlp.gate_up_proj")
    assert up.weight.dtype == torch.get_default_dtype()
    assert config.scheme_for("lm_head") is None and config.scheme_for("model.layers.0.mlp.gate_proj")[1] == "dynamic"


def test_exact_names_and_partly_ignored_merged_layers():
    config = CompressedTensorsConfig.from_config(_config(
        {"group_0": _w8a8_group(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                 "model.layers.0.self_attn.v_proj"])}, ignore=[]))
    assert isinstance(_qkv(config).quant_method, W8A8Int8LinearMethod)
    assert _qkv(config, "model.layers.1.self_attn.qkv_proj").weight.dtype != torch.int8
    partial = CompressedTensorsConfig.from_config(_config({"group_0": _w8a8_group(["Linear"])},
                                                          ignore=["model.layers.0.self_attn.v_proj"]))
    with pytest.raises(ValueError, match="qkv_proj must share one scheme.*v_proj: unquantized"):
        _qkv(partial)


def _args(**kw):
    return QuantizationArgs(**kw).model_dump()


@pytest.mark.parametrize("weights, inputs, fmt, why", [
    (_args(num_bits=8, type="int", strategy="group", group_size=128), None, "naive-quantized", "int8 weight-only"),
    (_args(num_bits=4, type="int", strategy="group", group_size=128),
     _args(num_bits=4, type="int", strategy="token", dynamic=True), "int-quantized", "int4 weights"),
    (_args(num_bits=4, type="float", strategy="tensor_group", group_size=16),
     _args(num_bits=4, type="float", strategy="tensor_group", group_size=16, dynamic="local"),
     "nvfp4-pack-quantized", "float4 weights"),
    (_args(num_bits=8, type="float", strategy="block", block_structure=[128, 128]),
     _args(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True), "float-quantized",
     "fp8 weights with block scales"),
    (_args(num_bits=8, type="int", strategy="channel", symmetric=True),
     _args(num_bits=8, type="int", strategy="tensor", symmetric=False), "int-quantized", "asymmetric int8"),
])
def test_unsupported_schemes_name_the_scheme_and_the_layer(weights, inputs, fmt, why):
    group = {"targets": ["Linear"], "format": fmt, "weights": weights, "input_activations": inputs}
    config = CompressedTensorsConfig.from_config(_config({"group_0": group}, ignore=[]))
    with pytest.raises(ValueError, match=f"model.layers.0.self_attn.qkv_proj \\(group group_0\\).*{why}"):
        _qkv(config)


@pytest.mark.parametrize("extra, what", [
    ({"sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4"}}, "sparse-24-bitmask"),
    ({"transform_config": {"config_groups": {"u": {}}}}, "transform_config"),
    ({"kv_cache_scheme": _args(num_bits=8, type="float", strategy="tensor")}, "kv_cache_scheme"),
])
def test_unsupported_features_are_refused(extra, what):
    with pytest.raises(ValueError, match=what):
        CompressedTensorsConfig.from_config(_config({"group_0": _w8a8_group(["Linear"])}, **extra))


def test_library_rejects_malformed_config():
    bad = _w8a8_group(["Linear"])
    bad["weights"]["strategy"] = "channels"
    with pytest.raises(ValueError, match="not valid"):
        CompressedTensorsConfig.from_config(_config({"group_0": bad}))


# ---------------------------------------------------------------- end to end
def check_checkpoint_against_hf(path: str, method_type: type, num_new: int = 16, num_quantized: int = 8,
                                **llm_kwargs) -> None:
    """Ember on the checkpoint against HF transformers on it (float32, CPU).

    Tolerances: one linear layer agrees to float32 rounding (checked by the
    callers); through the model, float32 summation-order differences can flip
    the rounding of an activation that falls within ~1e-6 of a half step,
    which moves this random model's logits by up to a few percent. So: the
    logits of the prompt and of HF's greedy continuation (teacher-forced)
    within 5% of their range, every position whose HF top-2 margin exceeds
    that error predicted alike, the first generated token equal, and
    free-running greedy tokens equal for at least half of the prompts.
    """
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts()
    with one_thread():
        refs = [hf_greedy(hf, p, num_new) for p in prompts]
        llm = ember_llm(path, **llm_kwargs)
        runner = runner_of(llm)
        quantized = [m for m in runner.model.modules() if isinstance(getattr(m, "quant_method", None), method_type)]
        # qkv, o, gate_up, down x 2 layers (+ the LM head where the checkpoint quantizes it)
        assert len(quantized) == num_quantized, len(quantized)
        equal = 0
        from ember import SamplingParams
        for p, ref in zip(prompts, refs):
            seq = p + ref[:-1]
            ours, theirs = runner.compute_prompt_logits(seq).cpu(), hf_prefill_logits(hf, seq)
            rel = relative_error(ours, theirs)
            assert rel < 5e-2, rel
            top2 = theirs.topk(2, dim=-1).values
            sure = (top2[:, 0] - top2[:, 1]) > 2 * rel * theirs.abs().max()
            assert torch.equal(ours.argmax(-1)[sure], theirs.argmax(-1)[sure])
            out = llm.generate([list(p)], SamplingParams(temperature=0, max_tokens=num_new, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
            assert out[0] == ref[0]
            equal += out == ref
        assert equal >= len(prompts) // 2, equal


@pytest.mark.slow
@pytest.mark.parametrize("static, quantized_head", [(False, False), (True, False), (False, True)])
def test_w8a8_int8_checkpoint_saved_by_the_library(tmp_path, static, quantized_head):
    hf = random_llama()
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(strategy="channel"),
                                input_activations=QuantizationArgs(strategy="tensor" if static else "token",
                                                                   dynamic=not static))
    path = save_compressed(hf, scheme, tmp_path, ignore=[] if quantized_head else ["lm_head"])
    # One layer as the library computes it (its fake-quantized forward) and as Ember does.
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    layer = ref.model.layers[1].mlp.down_proj
    x = torch.randn(9, layer.in_features) * 3
    with torch.no_grad():
        ref(input_ids=torch.tensor([[1, 2]]))  # the library decompresses the weights on the first forward
        expected = layer(x[None])[0]  # NOTE: [batch, seq, hidden]: the library's per-token axes are 0 and 1
    runner = runner_of(ember_llm(path))
    down = runner.model.model.layers[1].mlp.down_proj
    assert down.weight.dtype == torch.int8 and down.quant_method.static_input_scale == static
    got = down(x)
    assert relative_error(got, expected) < 1e-5
    x_q, x_s = quantize_per_token_int8(x, down.input_scale if static else None)
    assert torch.equal(got, int8_scaled_mm_reference(x_q, x_s, down.weight, down.weight_scale, None, x.dtype))
    assert (runner.model.lm_head.weight.dtype == torch.int8) == quantized_head
    del runner
    check_checkpoint_against_hf(path, W8A8Int8LinearMethod, num_quantized=9 if quantized_head else 8)


@pytest.mark.gpu
def test_w8a8_int8_checkpoint_on_gpu(tmp_path):
    """The same checkpoint on CUDA (float32 activations through the Triton int8
    GEMM at decode and torch._int_mm for the prompts) against HF transformers
    on CPU, with the CPU run's tolerances."""
    path = save_compressed(random_llama(), "W8A8", tmp_path)
    check_checkpoint_against_hf(path, W8A8Int8LinearMethod, device="cuda")


def test_gptq_group_actorder_is_kept_for_w4a16():
    """Act-order checkpoints say actorder "group", which the library no longer
    parses: the config still loads, and W4A16 layers are told."""
    w4 = {"targets": ["Linear"], "format": "pack-quantized",
          "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128,
                      "dynamic": False, "actorder": "group"}}
    config = CompressedTensorsConfig.from_config(_config({"group_0": w4}, ignore=[]))
    assert config.group_actorder == {"group_0"}
    scheme, group = config.scheme_for("model.layers.0.mlp.down_proj")
    assert group == "group_0" and scheme.weights.num_bits == 4 and scheme.weights.actorder is None


def test_moe_experts_take_fp8_only():
    from ember.layers.moe.layer import FusedMoE

    int8 = CompressedTensorsConfig.from_config(_config({"group_0": _w8a8_group(["Linear"])},
                                                       ignore=["re:.*mlp.gate$"]))
    with pytest.raises(ValueError, match="weights int8 .* MoE experts model.layers.0.mlp.experts \\(group group_0\\)"):
        FusedMoE(4, 32, 16, quant_config=int8, prefix="model.layers.0.mlp.experts")
    dense_only = CompressedTensorsConfig.from_config(_config({"group_0": _w8a8_group(["re:.*self_attn.*"])}))
    experts = FusedMoE(4, 32, 16, quant_config=dense_only, prefix="model.layers.0.mlp.experts")
    assert type(experts.quant_method).__name__ == "UnquantizedFusedMoEMethod"
    partial = CompressedTensorsConfig.from_config(_config({"group_0": _w8a8_group(["re:.*up_proj$"])}))
    with pytest.raises(ValueError, match="experts of model.layers.0.mlp.experts must share one scheme"):
        FusedMoE(4, 32, 16, quant_config=partial, prefix="model.layers.0.mlp.experts")
