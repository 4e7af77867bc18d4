"""RMSNorm against its formula, and the pre-norm decoder layer against
``h += attn(norm(h)); h += mlp(norm(h))`` (CPU)."""

import torch
from torch import nn

from ember.layers.attention.layer import ForwardContext
from ember.layers.layernorm import RMSNorm
from ember.layers.mlp import GatedMLP
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


class _Attn(nn.Module):
    """A stand-in attention: a linear map of the normalized input."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, positions, x, ctx):
        return self.proj(x)


def test_decoder_layers_add_each_block_to_the_stream():
    torch.manual_seed(2)
    hidden = 48
    layers = []
    for _ in range(3):
        layer = PreNormDecoderLayer(_Attn(hidden), GatedMLP(hidden, 96), hidden, 1e-6)
        for name, p in layer.named_parameters():
            p.data.uniform_(0.5, 1.5) if "norm" in name else p.data.normal_(0, 0.1)
        layers.append(layer)
    h = h0 = torch.randn(5, hidden)
    for layer in layers:  # the reference
        h = h + layer.self_attn.proj(_norm(h, layer.input_layernorm.weight, 1e-6))
        g, u = (_norm(h, layer.post_attention_layernorm.weight, 1e-6) @ layer.mlp.gate_up_proj.weight.T).chunk(2, -1)
        h = h + (torch.nn.functional.silu(g) * u) @ layer.mlp.down_proj.weight.T
    hidden_states, residual = h0, None
    for layer in layers:
        hidden_states, residual = layer(None, hidden_states, residual, ForwardContext(None, []))
    torch.testing.assert_close(hidden_states + residual, h, rtol=1e-5, atol=1e-5)
