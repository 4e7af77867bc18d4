"""RMSNorm against its formula, and the pre-norm block plumbing
(``PreNormInput``, ``PreNormDecoderLayer``) against ``h += f(norm(h))`` (CPU)."""

import pytest
import torch
from torch import nn

from ember.layers.attention.layer import ForwardContext
from ember.layers.layernorm import PreNormInput, RMSNorm, block_residual, fold_norm_weight
from ember.layers.linear import RowParallelLinear
from ember.models.llama import LlamaMLP
from ember.models.utils import PreNormDecoderLayer


def _norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_rms_norm_and_the_fused_residual_add():
    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    x, r = torch.randn(3, 64), torch.randn(3, 64)
    torch.testing.assert_close(norm(x), _norm(x, norm.weight, 1e-5))
    out, stream = norm(x, r)
    assert torch.equal(stream, x + r)
    torch.testing.assert_close(out, _norm(x + r, norm.weight, 1e-5))


def test_prenorm_input_materializes_once_and_gives_the_stream():
    torch.manual_seed(1)
    norm = RMSNorm(32, 1e-6)
    x, r = torch.randn(2, 32), torch.randn(2, 32)
    inp = PreNormInput(x, norm)
    assert inp.normed is None and block_residual(inp) is inp
    assert inp.stream is x and inp.normed is None  # a one-tensor stream needs no norm for that
    normed = inp.materialize()
    assert inp.materialize() is normed and torch.equal(normed, norm(x))
    inp = PreNormInput(x, norm, r)
    assert torch.equal(inp.stream, x + r) and torch.equal(inp.normed, norm(x, r)[0])
    assert block_residual(torch.zeros(1)) is None


def test_fold_norm_weight_moves_the_weight_into_the_projection():
    torch.manual_seed(2)
    norm = RMSNorm(32, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    w = torch.randn(48, 32)
    x = torch.randn(3, 32)
    ref = torch.nn.functional.linear(norm(x), w)
    folded = w.clone()
    fold_norm_weight(norm, folded)
    assert norm.weight_in_next and torch.equal(norm.weight, torch.ones(32))
    torch.testing.assert_close(torch.nn.functional.linear(norm(x), folded), ref)
    with pytest.raises(ValueError, match="folded already"):
        fold_norm_weight(norm, folded)
    with pytest.raises(ValueError, match="does not take"):
        fold_norm_weight(RMSNorm(16), w)


def test_linear_given_a_prenorm_residual_adds_its_stream():
    # On CPU the GEMM returns no sums of squares, asked or not: out_sumsq stays None.
    torch.manual_seed(3)
    norm = RMSNorm(16, 1e-6)
    proj = RowParallelLinear(8, 16)
    proj.weight.data.normal_()
    x, r, h = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 8)
    for want in (False, True):
        inp = PreNormInput(x, norm, r, want_out_sumsq=want)
        torch.testing.assert_close(proj(h, block_residual(inp)), h @ proj.weight.T + x + r)
        assert inp.out_sumsq is None


class _PlainMLP(nn.Module):
    """A block that takes the normalized tensor (like an MoE block)."""

    def __init__(self, mlp: LlamaMLP) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class _Attn(nn.Module):
    """A stand-in attention: a linear map of the normalized input."""

    takes_prenorm_input = False

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, positions, x, ctx):
        return self.proj(x)


def test_decoder_layer_is_two_residual_blocks_whichever_modules_take_prenorm_input():
    # Layers whose MLP takes a PreNormInput (returning the stream) and layers
    # whose MLP takes the normalized tensor compute the same thing, over two
    # layers, so both stream representations meet each kind of block.
    torch.manual_seed(2)
    hidden = 48
    mlp = LlamaMLP(hidden, 96)
    for p in mlp.parameters():
        p.data.normal_(0, 0.1)
    attn = _Attn(hidden)
    layers = {}
    for kind, block in (("prenorm", mlp), ("plain", _PlainMLP(mlp))):
        layer = PreNormDecoderLayer(attn, block, hidden, 1e-6)
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 1.5)
        layers[kind] = layer
    layers["plain"].input_layernorm.weight.data.copy_(layers["prenorm"].input_layernorm.weight)
    layers["plain"].post_attention_layernorm.weight.data.copy_(layers["prenorm"].post_attention_layernorm.weight)
    first = layers["prenorm"]
    h0 = torch.randn(5, hidden)
    h = h0
    for _ in range(2):  # the reference: h += attn(norm(h)); h += mlp(norm(h))
        h = h + attn.proj(_norm(h, first.input_layernorm.weight, 1e-6))
        h = h + mlp(_norm(h, first.post_attention_layernorm.weight, 1e-6))
    for order in (("prenorm", "plain"), ("plain", "prenorm"), ("prenorm", "prenorm")):
        hidden_states, residual = h0, None
        for kind in order:
            hidden_states, residual = layers[kind](None, hidden_states, residual, ForwardContext(None, []))
        stream = hidden_states if residual is None else hidden_states + residual
        torch.testing.assert_close(stream, h, rtol=1e-5, atol=1e-5)
