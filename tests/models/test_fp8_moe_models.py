"""Block-FP8 MoE checkpoints (HF ``"fp8"`` with ``weight_block_size``, the
DeepSeek-V3 / Qwen3-FP8 layout) run with FP8 experts, against HF transformers
holding the dequantized weights (float32).

Checkpoint layout (safetensors, per expert, as DeepSeek-V3 ships it):
``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`` in
``float8_e4m3fn`` and ``...weight_scale_inv`` float32 [ceil(N / 16), ceil(K / 16)]
(16 x 16 blocks so the tiny experts span several), ``config.json``
``quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [16, 16],
"ignored_layers": [...]}``. The experts-only tests store every other linear
layer unquantized and name it in ``ignored_layers``; the all-layers test
quantizes every linear layer (it needs the FP8 linear method too).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ember import LLM, SamplingParams

from tests.layers.quantization.fp8_ref import dequant, fake_quant, quantize_blocks, reference
from tests.models.tiny import (NUM_NEW, check_greedy, ember_llm, hf_greedy, hf_prefill_logits, make_prompts,
                               one_thread, runner_of, save_tiny)

BLOCK = 16


def write_fp8_checkpoint(hf, path: Path, ignored_layers: list[str], quantize_linear: bool) -> tuple[str, set[str]]:
    """Save ``hf`` as a block-FP8 checkpoint (see the module docstring) and
    load the dequantized weights back into ``hf``. Returns the directory and
    the names of the non-expert linear weights stored as FP8."""
    save_tiny(hf, path)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    tensors: dict[str, torch.Tensor] = {}
    linear: set[str] = set()
    for name, w in state.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            # transformers' in-memory stacked experts -> DeepSeek-V3's per-expert tensors
            q, s = quantize_blocks(w, BLOCK, BLOCK)
            base = name.rsplit(".", 1)[0]
            if name.endswith("gate_up_proj"):
                inter = w.shape[1] // 2
                q_of = {"gate_proj": q[:, :inter], "up_proj": q[:, inter:]}
                # NOTE: inter is a multiple of BLOCK, so gate and up have whole blocks of their own.
                s_of = {"gate_proj": s[:, :inter // BLOCK], "up_proj": s[:, inter // BLOCK:]}
            else:
                q_of, s_of = {"down_proj": q}, {"down_proj": s}
            for proj in q_of:
                for e in range(w.shape[0]):
                    tensors[f"{base}.{e}.{proj}.weight"] = q_of[proj][e].contiguous()
                    tensors[f"{base}.{e}.{proj}.weight_scale_inv"] = s_of[proj][e].contiguous()
            state[name] = dequant(q, s, (BLOCK, BLOCK))
        elif quantize_linear and w.dim() == 2 and (name.endswith("proj.weight") or name.endswith("mqa.weight")):
            q, s = quantize_blocks(w[None], BLOCK, BLOCK)
            tensors[name], tensors[name + "_scale_inv"] = q[0], s[0]
            linear.add(name)
            state[name] = dequant(q, s, (BLOCK, BLOCK))[0]
        else:
            tensors[name] = w
    hf.load_state_dict(state)
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [BLOCK, BLOCK], "ignored_layers": ignored_layers}
    (path / "config.json").write_text(json.dumps(cfg))
    return str(path), linear


def quantize_expert_activations_(hf) -> None:
    """Make HF's experts quantize their inputs as FP8 experts do (per token, in
    1 x 16 groups, before each GEMM): each experts module computes the float32
    reference of :mod:`tests.layers.quantization.fp8_ref` on its (dequantized)
    weights, with HF's own routing."""
    for module in hf.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "down_proj") and module.gate_up_proj.dim() == 3:
            def forward(hidden_states, top_k_index, top_k_weights, _m=module):
                return reference(hidden_states, _m.gate_up_proj, _m.down_proj, top_k_weights, top_k_index, BLOCK)

            module.forward = forward


def quantize_linear_activations_(hf, names: set[str]) -> None:
    """Make HF's linear layers ``names`` quantize their inputs per token in
    1 x 16 groups, as block-FP8 linear layers do (DeepSeek-V3's W8A8 scheme)."""
    def pre_hook(module, args):
        x = args[0]
        return (fake_quant(x.reshape(-1, x.shape[-1]), BLOCK).reshape(x.shape).to(x.dtype),) + args[1:]

    for name, module in hf.named_modules():
        if f"{name}.weight" in names:
            module.register_forward_pre_hook(pre_hook)


@one_thread()
def check_fp8_vs_hf(hf, path: str, logit_tol: float, batched: bool = True) -> None:
    """The experts stay FP8 in Ember; against HF whose experts quantize their
    activations as FP8 experts do (:func:`quantize_expert_activations_`):
    prefill logits within ``logit_tol`` (relative to the largest logit) and
    greedy tokens equal, single requests and (``batched``) all together in
    chunked steps."""
    from ember.layers.moe import FusedMoE

    prompts = make_prompts()
    hf = hf.eval()
    quantize_expert_activations_(hf)
    refs = [hf_greedy(hf, p, NUM_NEW) for p in prompts]
    assert min(len(set(r)) for r in refs) >= 4, f"degenerate reference continuations: {refs}"
    llm = ember_llm(path)
    experts = [m for m in runner_of(llm).model.modules() if isinstance(m, FusedMoE)]
    assert experts and all(m.w13_weight.dtype == torch.float8_e4m3fn and m.w2_weight.dtype == torch.float8_e4m3fn
                           for m in experts)
    for i, p in enumerate(prompts):
        ours, ref = runner_of(llm).compute_prompt_logits(p), hf_prefill_logits(hf, p)
        err = float((ours - ref).abs().max() / ref.abs().max())
        assert err < logit_tol, f"prompt {i}: relative logit error {err:.2e}"
    check_greedy(llm, refs, prompts, together=False)
    del llm
    if batched:
        check_greedy(ember_llm(path, max_num_batched_tokens=8), refs, prompts, together=True)


def qwen3_moe(num_layers: int = 3):
    from tests.models.test_qwen3_moe import tiny_model

    return tiny_model(num_hidden_layers=num_layers)


def deepseek_v3():
    from tests.models.test_deepseek_v3 import tiny_config, tiny_model

    return tiny_model(tiny_config(moe_intermediate_size=32))


def test_qwen3_moe_block_fp8_experts(tmp_path):
    hf = qwen3_moe()  # layer 1 dense (mlp_only_layers), layers 0 and 2 sparse
    ignored = [f"model.layers.{i}.self_attn" for i in range(3)] + ["model.layers.1.mlp"]
    path, _ = write_fp8_checkpoint(hf, tmp_path, ignored, quantize_linear=False)
    check_fp8_vs_hf(hf, path, logit_tol=1e-4)


def test_deepseek_v3_block_fp8_experts(tmp_path):
    hf = deepseek_v3()  # layer 0 dense, layers 1 and 2 MoE with a shared expert
    ignored = ([f"model.layers.{i}.self_attn" for i in range(3)] + ["model.layers.0.mlp"]
               + [f"model.layers.{i}.mlp.shared_experts" for i in (1, 2)])
    path, _ = write_fp8_checkpoint(hf, tmp_path, ignored, quantize_linear=False)
    check_fp8_vs_hf(hf, path, logit_tol=1e-4)


# Every linear layer of the checkpoint is FP8, not only the experts; HF's
# linear layers quantize their inputs in 1 x 16 groups as the reference.
# NOTE: not batched: with every layer quantizing its activations, chunked
# prefill's other float32 summation order moves a few activations across an
# FP8 rounding step, and on these tiny random models that can flip a greedy
# near-tie; prefill logits and single-request greedy tokens are compared.
@pytest.mark.parametrize("model", ["qwen3_moe", "deepseek_v3"])
def test_all_layers_block_fp8_end_to_end(tmp_path, model):
    hf = qwen3_moe() if model == "qwen3_moe" else deepseek_v3()
    path, linear = write_fp8_checkpoint(hf, tmp_path, [], quantize_linear=True)
    assert len(linear) >= 12
    # DeepSeek-V3's kv_b_proj is stored FP8 but Ember dequantizes it once for
    # the absorbed MLA decode: its input is not quantized.
    quantize_linear_activations_(hf, {n for n in linear if ".kv_b_proj." not in n})
    check_fp8_vs_hf(hf, path, logit_tol=1e-3, batched=False)


@pytest.mark.slow
@pytest.mark.parametrize("expert_parallel, dispatch", [(False, "auto"), (True, "allreduce"), (True, "alltoall")],
                         ids=["tp2", "ep2", "ep2-alltoall"])
def test_qwen3_moe_block_fp8_experts_two_ranks(tmp_path, expert_parallel, dispatch):
    """Two CPU worker processes: each rank loads its half of the expert
    intermediate blocks (tensor parallel) or half of the experts (expert
    parallel, all-reduce or all-to-all dispatch) with their block scales;
    greedy tokens equal HF's."""
    hf = qwen3_moe()
    ignored = [f"model.layers.{i}.self_attn" for i in range(3)] + ["model.layers.1.mlp"]
    path, _ = write_fp8_checkpoint(hf, tmp_path, ignored, quantize_linear=False)
    quantize_expert_activations_(hf)
    prompts = make_prompts()[:3]
    with one_thread():
        refs = [hf_greedy(hf.eval(), p, 8) for p in prompts]
    llm = LLM(path, dtype="float32", block_size=4, kv_cache_memory=4 << 20, max_num_batched_tokens=8,
              tensor_parallel_size=2, enable_expert_parallel=expert_parallel, expert_parallel_dispatch=dispatch)
    try:
        outs = llm.generate([list(p) for p in prompts], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == refs
