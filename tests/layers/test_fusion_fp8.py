"""The decode fusions on a tiny Llama with ``--quantization fp8`` (online,
per-channel FP8 weights), in Triton's interpreter on CPU tensors: the
decoder-layer fusions run through the FP8 method's hooks (the RMSNorm folded
into the FP8 GEMV, the residual added in its epilogue), mixed with plain
layers (the LM head, and ignored layers).

Reference: the same bfloat16 FP8 model with the fusions off
(``fold_norm=False``, i.e. ``--no-fold-norm``) whose FP8 layers run the same
W8A16 GEMV (their CUDA path, forced onto the interpreter here). The fused
model multiplies the very values the unfused norm writes, except where a
normalized value's rounding flips because the rows' sums of squares are
summed in another order: logits agree to 2e-2 of the largest logit (about
two bfloat16 roundings of it), and greedy decoding picks the same tokens.
Steps of more than 16 rows run exactly as the plain layers (bit for bit)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig

import tests.kernels.interpret  # noqa: F401  (bfloat16 and FP8 computed on values in the interpreter)
from ember.config import KernelConfig
from ember.kernels import triton_gemm
from ember.layers.attention.torch_backend import TorchAttentionBackend
from ember.layers.fusion import DecodeFusions, FusedDecoderLayer, SkinnyLinearMethod, apply_decode_fusions
from ember.layers.linear import LinearBase
from ember.layers.quantization.fp8 import Fp8Config
from ember.layers.quantization.fp8_linear import Fp8LinearMethod
from ember.models.llama import LlamaForCausalLM
from tests.layers.test_fusion import BLOCK_SIZE, _rel, _Request, _step
from tests.layers.test_fusion import randomize

pytestmark = pytest.mark.skipif(not triton_gemm.INTERPRETED, reason="needs Triton's interpreter (no CUDA)")

CPU = torch.device("cpu")
_CONFIG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rms_norm_eps=1e-5, attention_bias=True)
# Layer 1's down and layer 2's qkv stay bfloat16: a mixed MLP block, a mixed
# attention block, and a plain down -> plain qkv pair between them that hands
# the sums of squares on as in a bfloat16 model.
MIXED = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.qkv_proj"]


def _fp8_llama(ignored: list[str], seed: int = 0) -> LlamaForCausalLM:
    """A bfloat16 tiny Llama whose linear layers (but ``ignored``) were
    quantized at load as ``--quantization fp8`` does."""
    torch.manual_seed(seed)
    model = randomize(LlamaForCausalLM(_CONFIG, TorchAttentionBackend, quant_config=Fp8Config(ignored_layers=ignored)))
    # NOTE: a copy before the cast, as tests/layers/test_fusion.py's _half
    # (the rotary module is shared between models of the same RoPE).
    model = copy.deepcopy(model).to(torch.bfloat16)
    for m in model.modules():
        method = getattr(m, "quant_method", None)
        if isinstance(method, Fp8LinearMethod):
            method.process_weights_after_loading(m)
    return model.eval()


@pytest.fixture
def fp8_gemv_on_cpu(monkeypatch):
    """The FP8 layers' CUDA path (the W8A16 GEMV at decode rows) on CPU
    tensors, for the fused and the unfused model alike; the fused forms'
    calls are recorded."""
    monkeypatch.setattr(Fp8LinearMethod, "apply", Fp8LinearMethod.apply_kernels)
    calls: list[str] = []
    real = Fp8LinearMethod.apply_fused_decode

    def spy(self, layer, x, norm=None, gated=False, residual=None):
        calls.append(f"{layer.prefix}:{'norm' if norm else ''}{'+res' if residual is not None else ''}")
        return real(self, layer, x, norm, gated, residual)

    monkeypatch.setattr(Fp8LinearMethod, "apply_fused_decode", spy)
    return calls


def _greedy(model, prompts: list[list[int]], steps: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Prefill the prompts, then ``steps`` greedy decode steps of all of them
    at once; returns the token lists and each step's logits."""
    caches = [torch.zeros(2, 32, BLOCK_SIZE, 2, 16, dtype=torch.bfloat16) for _ in range(3)]
    reqs = [_Request(i, p) for i, p in enumerate(prompts)]
    logits = [_step(model, caches, reqs)]
    for _ in range(steps):
        for r, row in zip(reqs, logits[-1]):
            r.tokens.append(int(row.argmax()))
        logits.append(_step(model, caches, reqs))
    return [r.tokens for r in reqs], logits


@pytest.mark.parametrize("ignored", [[], MIXED], ids=["all-fp8", "mixed"])
def test_fused_fp8_llama_matches_the_unfused_model(fp8_gemv_on_cpu, ignored):
    calls = fp8_gemv_on_cpu
    fused, unfused = _fp8_llama(ignored), _fp8_llama(ignored)
    report = apply_decode_fusions(fused, KernelConfig(), CPU, allow_interpreter=True)
    plain = apply_decode_fusions(unfused, KernelConfig(fold_norm=False), CPU, allow_interpreter=True)
    assert plain.fused_attention_blocks == plain.fused_mlp_blocks == 0
    mixed = bool(ignored)
    assert report == DecodeFusions(skinny_linears=1 + 2 * mixed, gated_mlps=3, fused_attention_blocks=3,
                                   fused_mlp_blocks=3, folded_norm_weights=int(mixed), sumsq_handoffs=int(mixed))
    assert all(isinstance(layer, FusedDecoderLayer) for layer in fused.model.layers)
    assert isinstance(fused.lm_head.quant_method, SkinnyLinearMethod)

    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11, 12, 13, 14, 15, 16, 17]]  # 15 rows: decode-sized steps
    steps = 4
    got_tokens, got = _greedy(fused, prompts, steps)
    n_calls = len(calls)
    want_tokens, want = _greedy(unfused, prompts, steps)
    assert len(calls) == n_calls  # the unfused model took no fused form
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert _rel(g, w) < 2e-2
    assert got_tokens == want_tokens
    # Every step, every FP8 projection took its fused form (the prefill too: 15 rows).
    expect = [f"model.layers.{i}.{name}" for i in range(3) for name in
              ("self_attn.qkv_proj:norm", "self_attn.o_proj:+res", "mlp.gate_up_proj:norm", "mlp.down_proj:+res")]
    expect = [e for e in expect if e.split(":")[0] not in ignored]
    assert calls == expect * (steps + 1)


@pytest.mark.parametrize("ignored", [[], MIXED], ids=["all-fp8", "mixed"])
def test_prefill_rows_run_as_the_plain_layers(fp8_gemv_on_cpu, ignored):
    """More than 16 rows: no fused form runs, and the fused layers compute
    exactly what the plain layers compute (with the bfloat16 qkv of the mixed
    model, whose input norm's weight the transform multiplied into the qkv
    weight at load, as in a bfloat16 model, to that rounding)."""
    fused, unfused = _fp8_llama(ignored, 1), _fp8_llama(ignored, 1)
    apply_decode_fusions(fused, KernelConfig(), CPU, allow_interpreter=True)
    apply_decode_fusions(unfused, KernelConfig(fold_norm=False), CPU, allow_interpreter=True)
    prompts = [list(range(1, 21))]
    caches = [[torch.zeros(2, 32, BLOCK_SIZE, 2, 16, dtype=torch.bfloat16) for _ in range(3)] for _ in range(2)]
    got = _step(fused, caches[0], [_Request(0, prompts[0])], all_rows=True)
    want = _step(unfused, caches[1], [_Request(0, prompts[0])], all_rows=True)
    assert not fp8_gemv_on_cpu
    if ignored:
        assert _rel(got, want) < 2e-2
    else:
        assert torch.equal(got, want)


def test_block_scales_keep_the_layers_unfused():
    """FP8 with block scales has no fused forms: its layers stay plain
    decoder layers (the SwiGLU epilogue still applies)."""
    torch.manual_seed(2)
    config = Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=(16, 16))
    model = LlamaForCausalLM(_CONFIG, TorchAttentionBackend, quant_config=config)
    for m in model.modules():
        if isinstance(m, LinearBase) and isinstance(m.quant_method, Fp8LinearMethod):
            m.weight.data = torch.randn(m.weight.shape).clamp(-4, 4).to(torch.float8_e4m3fn)
            m.weight_scale_inv.data.fill_(0.01)
    report = apply_decode_fusions(model, KernelConfig(), CPU, allow_interpreter=True)
    assert report.fused_attention_blocks == report.fused_mlp_blocks == 0 and report.gated_mlps == 3
    assert all(type(layer) is not FusedDecoderLayer for layer in model.model.layers)
