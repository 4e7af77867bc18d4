"""FP8 through the engine (CPU, float32): tiny random Llamas written as FP8
checkpoints in the documented on-disk layouts (per-tensor weights with static
input scales, as AutoFP8 / llm-compressor's ``"fp8"`` format; 128 x 128 weight
blocks with ``weight_scale_inv``, as DeepSeek-V3 / HF FineGrainedFP8), loaded
by Ember and by HF transformers.

The exact reference is HF transformers (float32) holding the dequantized
weights, with the W8A8 activation quantization applied to every decoder
linear's input by a forward pre-hook (per token, or the static scale, or per
1 x 128 group): Ember's prefill logits match it within 1e-4 and its greedy
tokens equal it. Without the hook (weights dequantized only) the logits stay
within FP8's activation error. ``--quantization fp8`` on the bundled SmolLM2
stays close to the unquantized model, and bad checkpoints are refused with the
tensor and the scheme named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from ember.layers.quantization.fp8_linear import Fp8LinearMethod, dequantize_fp8, quant_fp8_reference
from tests.models.tiny import (NUM_NEW, ember_llm, hf_greedy, hf_prefill_logits, make_prompts,
                               one_thread, random_llama, relative_error, runner_of, save_tiny)

pytestmark = pytest.mark.slow

FP8 = torch.float8_e4m3fn
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    # hidden 128 / intermediate 192: whole and partial 128 x 128 blocks; k and
    # v (64 rows each) stack off block boundaries into qkv_proj.
    return random_llama(seed, hidden_size=128, intermediate_size=192)


def _is_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.rsplit(".", 2)[-2] in LINEARS and name.endswith(".weight")


def _calibrate(hf: LlamaForCausalLM, prompts: list[list[int]]) -> dict[str, float]:
    """Static input scales: the largest |input| each decoder linear sees on the prompts, / 448."""
    amax: dict[str, float] = {}
    hooks = []
    for name, m in hf.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = f"model.layers.{name}"
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, key=key: amax.__setitem__(key, max(amax.get(key, 0.0), float(args[0].abs().max())))))
    for p in prompts:
        hf_prefill_logits(hf, p)
    for h in hooks:
        h.remove()
    return {k: v / 448.0 for k, v in amax.items()}


def _write_fp8_checkpoint(hf: LlamaForCausalLM, path, scheme: str, prompts) -> dict[str, float]:
    """Rewrite ``path``'s weights as an FP8 checkpoint of ``scheme``
    ("static": per-tensor weight_scale + input_scale; "block": 128 x 128
    weight_scale_inv); returns the static input scales (empty for blocks)."""
    state = load_file(str(path / "model.safetensors"))
    input_scales = _calibrate(hf, prompts) if scheme == "static" else {}
    out = {}
    for name, w in state.items():
        if not _is_linear(name):
            out[name] = w
            continue
        if scheme == "static":
            scale = w.abs().max().float() / 448.0
            out[name] = (w / scale).to(FP8)
            out[name + "_scale"] = scale.reshape(())  # AutoFP8 / llm-compressor: a 0-d scale
            prefix = name[: -len(".weight")]
            out[prefix + ".input_scale"] = torch.tensor(input_scales[prefix])
        else:
            n, k = w.shape
            nb, kb = -(-n // 128), -(-k // 128)
            padded = torch.nn.functional.pad(w.float(), (0, kb * 128 - k, 0, nb * 128 - n)).view(nb, 128, kb, 128)
            scale = padded.abs().amax(dim=(1, 3)) / 448.0
            out[name] = (padded / scale[:, None, :, None]).view(nb * 128, kb * 128)[:n, :k].to(FP8)
            out[name + "_scale_inv"] = scale
    save_file(out, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = ({"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
                                  if scheme == "static" else
                                  {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                   "weight_block_size": [128, 128]})
    (path / "config.json").write_text(json.dumps(cfg))
    return input_scales


def _hf_reference(hf: LlamaForCausalLM, path, scheme: str, input_scales: dict[str, float]
                  ) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(HF with the checkpoint's dequantized weights, the same with the
    activation quantization hooks), float32."""
    from ember.loader.weight_utils import dequant_fp8_block

    stored = load_file(str(path / "model.safetensors"))
    state = {}
    for name, t in stored.items():
        if name.endswith(("_scale", "_scale_inv", "input_scale")):
            continue
        if t.dtype == FP8:
            t = (t.float() * stored[name + "_scale"] if scheme == "static"
                 else dequant_fp8_block(t, stored[name + "_scale_inv"], (128, 128), torch.float32))
        state[name] = t.float()
    models = []
    for hooked in (False, True):
        m = LlamaForCausalLM(hf.config).eval()
        m.load_state_dict(state)
        if hooked:
            for name, lin in m.model.layers.named_modules():
                if not isinstance(lin, torch.nn.Linear):
                    continue
                key = f"model.layers.{name}"
                # Merged projections in Ember share one input scale: the largest of theirs.
                siblings = ([key.rsplit(".", 1)[0] + f".{p}" for p in ("q_proj", "k_proj", "v_proj")]
                            if key.endswith(("q_proj", "k_proj", "v_proj")) else
                            [key.rsplit(".", 1)[0] + f".{p}" for p in ("gate_proj", "up_proj")]
                            if key.endswith(("gate_proj", "up_proj")) else [key])
                static = max(input_scales[s] for s in siblings) if input_scales else None

                def quantize_input(mod, args, static=static):
                    x = args[0]
                    flat = x.reshape(-1, x.shape[-1])
                    if static is not None:
                        q, s = quant_fp8_reference(flat, static_scale=torch.tensor(static))
                        deq = q.float() * s
                    else:
                        q, s = quant_fp8_reference(flat, group=128)
                        deq = dequantize_fp8(q, s, (1, 128))
                    return (deq.view_as(x),)

                lin.register_forward_pre_hook(quantize_input)
        models.append(m)
    return models[0], models[1]


@pytest.mark.parametrize("scheme", ["static", "block"])
@one_thread()
def test_fp8_checkpoint_matches_hf_with_dequantized_weights(tmp_path, scheme):
    hf = _tiny_llama()
    prompts = make_prompts()
    path = tmp_path / "ckpt"
    save_tiny(hf, path)
    input_scales = _write_fp8_checkpoint(hf, path, scheme, prompts)
    dequant, w8a8 = _hf_reference(hf, path, scheme, input_scales)

    llm = ember_llm(str(path))
    runner = runner_of(llm)
    methods = [m for m in runner.model.modules() if isinstance(getattr(m, "quant_method", None), Fp8LinearMethod)]
    assert len(methods) == 8  # qkv, o, gate_up, down in 2 layers
    assert all(m.weight.dtype == FP8 for m in methods)
    for i, p in enumerate(prompts):
        ours = runner.compute_prompt_logits(p)
        exact = relative_error(ours, hf_prefill_logits(w8a8, p))
        assert exact < 1e-4, f"prompt {i}: {exact:.2e} from HF with the W8A8 math"
        drift = relative_error(ours, hf_prefill_logits(dequant, p))
        # NOTE: a random model with initializer_range 0.2 amplifies FP8's
        # rounding far more than a trained one: rounding only its weights to
        # per-tensor FP8 moves these logits by 12-34%; the full W8A8 runs by
        # 7-41%. The bound only says the quantization is on and sane; the
        # trained SmolLM2 test below bounds the drift that matters.
        assert 1e-6 < drift < 0.6, f"prompt {i}: {drift:.2e} from HF with the dequantized weights"
    from ember import SamplingParams

    refs = [hf_greedy(w8a8, p, NUM_NEW) for p in prompts]
    assert min(len(set(r)) for r in refs) >= 4
    outs = llm.generate([list(p) for p in prompts], SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True),
                        use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == refs


@pytest.mark.parametrize("drop, match", [
    ("model.layers.1.mlp.down_proj.weight_scale", r"down_proj\.weight_scale.*fp8 \(checkpoint, per-tensor"),
    ("model.layers.0.self_attn.o_proj.weight_scale_inv", r"o_proj\.weight_scale_inv.*fp8 \(checkpoint, 128x128"),
])
@one_thread()
def test_missing_scales_name_the_tensor_and_scheme(tmp_path, drop, match):
    hf = _tiny_llama()
    path = tmp_path / "ckpt"
    save_tiny(hf, path)
    _write_fp8_checkpoint(hf, path, "block" if drop.endswith("_inv") else "static", make_prompts()[:1])
    state = load_file(str(path / "model.safetensors"))
    del state[drop]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=match):
        ember_llm(str(path))


@one_thread()
def test_wrong_scale_shape_names_the_tensor_and_scheme(tmp_path):
    hf = _tiny_llama()
    path = tmp_path / "ckpt"
    save_tiny(hf, path)
    _write_fp8_checkpoint(hf, path, "block", make_prompts()[:1])
    state = load_file(str(path / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    state[name] = state[name][:, :1].contiguous()
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale_inv \(fp8 block 128x128\)"):
        ember_llm(str(path))


@one_thread()
def test_online_fp8_bundled_smollm2(smollm2_path) -> None:
    """``--quantization fp8`` on a trained model keeps its greedy continuation
    and its most likely token at (nearly) every prompt position."""
    from tests.layers.quantization.test_int8_engine import unquantized_and_quantized_runs

    def all_linear_layers_fp8(model) -> None:
        assert sum(isinstance(getattr(m, "quant_method", None), Fp8LinearMethod)
                   for m in model.modules()) == 4 * model.config.num_hidden_layers

    (ref, ref_tokens), (ours, tokens) = unquantized_and_quantized_runs(smollm2_path, "fp8", all_linear_layers_fp8)
    assert tokens == ref_tokens
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.8
    # NOTE: FP8 keeps 3 mantissa bits (int8 per-channel weights keep ~7):
    # on this 135M model rounding the weights alone to per-channel FP8 moves
    # the largest logit of a position by 10-30%, and the W8A8 run stays there.
    assert 1e-6 < relative_error(ours, ref) < 0.35


@pytest.mark.parametrize("scheme", ["static", "block"])
@one_thread()
def test_kernel_path_through_the_model(tmp_path, scheme, monkeypatch):
    """The loaded tiny FP8 Llama with every FP8 layer on its CUDA path
    (quantization kernel and Triton FP8 GEMM, in Triton's interpreter): the
    prefill logits equal the CPU path's (see the note on rounding flips)."""
    pytest.importorskip("triton")
    import tests.kernels.interpret  # noqa: F401  (faithful FP8 rounding in the interpreter)

    hf = _tiny_llama()
    prompts = make_prompts()[:2]
    path = tmp_path / "ckpt"
    save_tiny(hf, path)
    _write_fp8_checkpoint(hf, path, scheme, prompts)
    runner = runner_of(ember_llm(str(path)))
    ref = [runner.compute_prompt_logits(p) for p in prompts]
    monkeypatch.setattr(Fp8LinearMethod, "apply", Fp8LinearMethod.apply_kernels)
    for i, p in enumerate(prompts):
        ours = runner.compute_prompt_logits(p)
        per_position = (ours - ref[i]).abs().amax(1) / ref[i].abs().max()
        # NOTE: the Triton GEMM sums in another order than torch's matmul
        # (~1e-7); now and then that moves an activation across an FP8
        # rounding boundary in a later layer, and this random model turns the
        # one-step change into a few percent at that position (seen: 1 of 13).
        assert (per_position < 1e-5).float().mean() >= 0.75, f"prompt {i}: {per_position.tolist()}"
        assert per_position.max() < 0.15, f"prompt {i}: {per_position.tolist()}"
