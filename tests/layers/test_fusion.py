"""The decode-fusion transform (ember.layers.fusion) on CPU: the fused modules
run their Triton kernels in Triton's interpreter (float16; the skinny GEMM
takes 16-bit inputs only) at decode row counts and must agree with the plain
model in float32; where a precondition fails the model is left untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from ember.config import KernelConfig
from ember.kernels import triton_gemm
from ember.layers.attention import AttentionMetadata, ForwardContext, QKVAttention
from ember.layers.attention.torch_backend import TorchAttentionBackend
from ember.layers.fusion import (DecodeFusions, FusedDecoderLayer, SkinnyGatedMLP, SkinnyLinearMethod,
                                 apply_decode_fusions, fusion_supported)
from ember.layers.linear import LinearBase, QKVParallelLinear, RowParallelLinear, UnquantizedLinearMethod
from ember.layers.mlp import GatedMLP
from ember.layers.quantization.base import LinearMethodBase, QuantizationConfig
from ember.models.llama import LlamaForCausalLM
from ember.models.utils import PreNormDecoderLayer

pytestmark = pytest.mark.skipif(not triton_gemm.INTERPRETED, reason="needs Triton's interpreter (no CUDA)")

CPU = torch.device("cpu")
BLOCK_SIZE = 4


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, attention_bias=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config, TorchAttentionBackend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.08)
    return model.eval()


def _half(model: nn.Module) -> nn.Module:
    """A float16 copy. NOTE: a copy, since the model shares its rotary module
    with every model of the same RoPE (``get_rope`` caches it), whose cache
    ``.half()`` would round for all of them."""
    return copy.deepcopy(model).half()


class _Request:
    def __init__(self, index: int, prompt: list[int]) -> None:
        self.blocks = list(range(index * 8, index * 8 + 8))
        self.tokens = list(prompt)
        self.num_computed = 0


def _step(model: nn.Module, caches: list[torch.Tensor], reqs: list[_Request], all_rows: bool = False
          ) -> torch.Tensor:
    """One step of every request's not yet computed tokens; returns the
    logits of each request's last token [len(reqs), vocab] float32 (of every
    row with ``all_rows``)."""
    ids, positions, slots, starts, seq_lens = [], [], [], [0], []
    for r in reqs:
        for pos in range(r.num_computed, len(r.tokens)):
            ids.append(r.tokens[pos])
            positions.append(pos)
            slots.append(r.blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE)
        starts.append(starts[-1] + len(r.tokens) - r.num_computed)
        seq_lens.append(len(r.tokens))
        r.num_computed = len(r.tokens)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([r.blocks for r in reqs], dtype=torch.int32),
        max_query_len=max(b - a for a, b in zip(starts, starts[1:])), max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.tensor(positions), ForwardContext(meta, caches))
        return model.compute_logits(hidden if all_rows else hidden[[s - 1 for s in starts[1:]]])


def _run(model: nn.Module, dtype: torch.dtype, prompts: list[list[int]], steps: int,
         all_rows: bool = False) -> list[torch.Tensor]:
    """Greedy-free replay: the same prompts, then ``steps`` decode steps
    feeding fixed tokens, so every model sees the same inputs."""
    caches = [torch.zeros(2, 32, BLOCK_SIZE, 2, 16, dtype=dtype) for _ in range(3)]
    reqs = [_Request(i, p) for i, p in enumerate(prompts)]
    out = [_step(model, caches, reqs, all_rows)]
    for s in range(steps):
        for i, r in enumerate(reqs):
            r.tokens.append((7 * s + 5 * i + 3) % 96)
        out.append(_step(model, caches, reqs))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("num_sms", [132, 1])
def test_fused_llama_matches_the_plain_model(monkeypatch, num_sms):
    # 132 SMs (an H100's): at these widths only the qkv GEMMs that get the sums
    # of squares fold their norm. 1 SM: every projection makes "two waves", so
    # every norm folds (qkv of layer 0 with the Gram sums, gate_up with the
    # norm weight in the K loop).
    monkeypatch.setattr(triton_gemm, "_INTERPRETER_SMS", num_sms)
    calls: list[dict] = []
    real = triton_gemm.skinny_rms_norm_linear

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_gemm, "skinny_rms_norm_linear", spy)
    ref_model = _tiny_llama()
    fused = _half(ref_model)
    plain16 = _half(ref_model)
    report = apply_decode_fusions(fused, KernelConfig(), CPU, allow_interpreter=True)
    assert report == DecodeFusions(skinny_linears=13, gated_mlps=3, fused_attention_blocks=3, fused_mlp_blocks=3,
                                   folded_norm_weights=3, sumsq_handoffs=2, pdl=False)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in fused.model.layers)

    prompts = [[1, 2, 3, 4, 5], [9, 8, 7], [11, 12, 13, 14, 15, 16, 17]]  # 15 rows: the skinny path
    ref = _run(ref_model, torch.float32, prompts, steps=2)
    got = _run(fused, torch.float16, prompts, steps=2)
    base = _run(plain16, torch.float16, prompts, steps=2)
    for r, g, b in zip(ref, got, base):
        assert g.dtype == torch.float32
        assert _rel(b, r) < 1e-2  # float16 rounding itself
        assert _rel(g, r) < 1.5e-2
    # The qkv GEMMs of layers 1 and 2 took the down GEMM's sums of squares, every step.
    with_sumsq = [c for c in calls if c.get("sumsq") is not None]
    assert len(with_sumsq) == 2 * 3
    if num_sms == 1:
        assert any(c.get("gated") for c in calls) and len(calls) == 6 * 3


def test_prefill_rows_take_the_plain_kernels(monkeypatch):
    # More than 16 rows: no skinny kernel runs, and the fused layers' unfused
    # form agrees with the plain model.
    launched = []
    monkeypatch.setattr(triton_gemm, "launch_skinny_gemm", lambda *a, **k: launched.append(1))
    ref_model = _tiny_llama(1)
    fused = _half(ref_model)
    apply_decode_fusions(fused, KernelConfig(), CPU, allow_interpreter=True)
    prompts = [list(range(1, 21))]
    ref = _run(ref_model, torch.float32, prompts, steps=0, all_rows=True)
    got = _run(fused, torch.float16, prompts, steps=0, all_rows=True)
    assert not launched
    assert _rel(got[0], ref[0]) < 1e-2


class _StandInAttention(QKVAttention):
    """q of the qkv projection as the attention output (no cache)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden, 16, hidden // 16, 2, bias=True)
        self.o_proj = RowParallelLinear(hidden, hidden)

    def attend(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return torch.tanh(qkv[:, : self.o_proj.in_features])


class _OtherAttention(nn.Module):
    """Attention the fusions do not know (e.g. MLA)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = RowParallelLinear(hidden, hidden)

    def forward(self, positions, x, ctx):
        return self.proj(x)


class _OtherMLP(nn.Module):
    """An MLP the fusions do not know (e.g. an MoE block): a gated MLP inside."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.inner = GatedMLP(hidden, 2 * hidden)

    def forward(self, x):
        return self.inner(x)


class _Stack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        ctx = ForwardContext(None, [])
        residual = None
        for layer in self.layers:
            h, residual = layer(None, h, residual, ctx)
        return h if residual is None else h + residual


def test_mixed_layers_hand_the_stream_and_sums_of_squares_on_correctly(monkeypatch):
    # Fused and unfused blocks in every order: both stream forms meet each
    # kind of block, and the sums of squares go only to a folded qkv.
    monkeypatch.setattr(triton_gemm, "_INTERPRETER_SMS", 1)
    hidden = 64
    torch.manual_seed(3)
    kinds = [("qkv", "gated"), ("qkv", "other"), ("other", "gated"), ("qkv", "gated"), ("qkv", "gated")]
    layers = []
    for attn, mlp in kinds:
        layers.append(PreNormDecoderLayer(_StandInAttention(hidden) if attn == "qkv" else _OtherAttention(hidden),
                                          GatedMLP(hidden, 2 * hidden) if mlp == "gated" else _OtherMLP(hidden),
                                          hidden, 1e-5))
    ref = _Stack(layers)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    fused = _half(ref)
    report = apply_decode_fusions(fused, KernelConfig(), CPU, allow_interpreter=True)
    assert (report.fused_attention_blocks, report.fused_mlp_blocks) == (4, 4)
    assert report.folded_norm_weights == 4 and report.sumsq_handoffs == 3  # not from layer 1 (unfused MLP)
    assert report.gated_mlps == 5  # the four fused layers' and the one inside _OtherMLP
    assert isinstance(fused.layers[1].mlp.inner, SkinnyGatedMLP)
    x = torch.randn(6, hidden)
    with torch.inference_mode():
        want = ref(x)
        got = fused(x.half())
    assert _rel(got, want) < 1e-2


class _TestMethod(LinearMethodBase):
    """A stand-in for a quantized method: the same product, another class."""

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                       params_dtype):
        layer.weight = nn.Parameter(torch.empty(sum(output_partition_sizes), input_size_per_partition,
                                                dtype=params_dtype), requires_grad=False)

    def apply(self, layer, x, bias=None):
        return torch.nn.functional.linear(x, layer.weight, bias)


class _TestQuantConfig(QuantizationConfig):
    @classmethod
    def get_name(cls) -> str:
        return "test"

    @classmethod
    def from_config(cls, config):
        return cls()

    def get_quant_method(self, layer, prefix):
        assert prefix.startswith(("model.layers.", "lm_head", "model.embed_tokens")), prefix
        return _TestMethod() if isinstance(layer, LinearBase) else None


def _snapshot(model: nn.Module) -> list:
    return [(name, type(m), type(getattr(m, "quant_method", None))) for name, m in model.named_modules()]


@pytest.mark.parametrize("case", ["cpu", "no_skinny_gemm", "tp2"])
def test_untouched_where_a_precondition_fails(monkeypatch, case):
    model = _half(_tiny_llama())
    before = _snapshot(model)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    if case == "cpu":  # a CPU device outside tests: no interpreter allowed
        report = apply_decode_fusions(model, KernelConfig(), CPU)
    elif case == "no_skinny_gemm":
        report = apply_decode_fusions(model, KernelConfig(skinny_gemm=False), CPU, allow_interpreter=True)
    else:
        monkeypatch.setattr("ember.layers.fusion.get_tp_size", lambda: 2)
        report = apply_decode_fusions(model, KernelConfig(), CPU, allow_interpreter=True)
    assert report == DecodeFusions() and not report.applied
    assert _snapshot(model) == before
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    assert not fusion_supported(torch.device("cuda"), 2) and fusion_supported(torch.device("cuda"), 1)


def test_quantized_layers_keep_their_method_and_block_the_layer_fusions():
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = _half(LlamaForCausalLM(config, TorchAttentionBackend, quant_config=_TestQuantConfig()))
    report = apply_decode_fusions(model, KernelConfig(), CPU, allow_interpreter=True)
    assert report.skinny_linears == 1  # the (unquantized) LM head only
    assert report.fused_attention_blocks == report.fused_mlp_blocks == report.gated_mlps == 0
    assert all(type(layer) is not FusedDecoderLayer for layer in model.model.layers)
    assert all(isinstance(m.quant_method, _TestMethod) for m in model.modules() if isinstance(m, LinearBase))
    assert isinstance(model.lm_head.quant_method, SkinnyLinearMethod)


@pytest.mark.parametrize("flags", [dict(fold_norm=False), dict(fold_norm_weights=False), dict(pdl=False)])
def test_flags_choose_the_fusions(flags):
    model = _half(_tiny_llama())
    report = apply_decode_fusions(model, KernelConfig(**flags), CPU, allow_interpreter=True)
    assert report.skinny_linears == 13 and report.gated_mlps == 3 and not report.pdl
    fold = flags.get("fold_norm", True)
    assert report.fused_attention_blocks == report.fused_mlp_blocks == (3 if fold else 0)
    weights = fold and flags.get("fold_norm_weights", True)
    assert report.folded_norm_weights == (3 if weights else 0)
    assert report.sumsq_handoffs == (2 if weights else 0)
    if not fold:
        assert all(type(layer) is not FusedDecoderLayer for layer in model.model.layers)
        assert all(isinstance(layer.mlp, SkinnyGatedMLP) for layer in model.model.layers)
    plain = [m for m in model.modules() if type(getattr(m, "quant_method", None)) is UnquantizedLinearMethod]
    assert [type(m).__name__ for m in plain] == ["VocabParallelEmbedding"]
