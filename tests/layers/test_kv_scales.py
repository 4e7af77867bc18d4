"""Per-layer FP8 KV scales on the CPU path: the torch backend's write and
attention against dense float32 attention over K/V quantized with the scales
and dequantized; the checkpoint-name matching and validation of
:mod:`ember.layers.attention.kv_scales`."""

from __future__ import annotations

import math

import pytest
import torch

from ember.layers.attention.backend import AttentionMetadata
from ember.layers.attention.kv_scales import calibrate_kv_scales, check_kv_scale, match_kv_scale
from ember.layers.attention.torch_backend import TorchAttentionBackend
from tests.layers.test_torch_attention import dense_reference


def quant_dequant(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype).float() * scale


def _meta(reqs, tables, block_size):
    starts, slots = [0], []
    for (cached, new), t in zip(reqs, tables):
        starts.append(starts[-1] + new)
        slots += [t[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    seq_lens = [c + n for c, n in reqs]
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots), query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        max_query_len=max(n for _, n in reqs), max_seq_len=max(seq_lens), query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 2, 64), (4, 4, 32)])
def test_torch_backend_with_scales_matches_dense_reference(cache_dtype, num_heads, num_kv_heads, head_dim):
    """Prompts written in one step (prefill), then a step of decodes and a
    chunk over that context: outputs equal dense float32 attention over the
    quantized-then-dequantized K/V; K/V 3000x larger than unit normals, past
    e4m3's range unless scaled."""
    g = torch.Generator().manual_seed(0)
    block_size, num_blocks = 8, 48
    k_scale, v_scale = 12000.0 / 448, 9000.0 / 448
    scales = (torch.tensor(k_scale), torch.tensor(v_scale))
    lengths = [(9, 1), (16, 1), (20, 5), (3, 1)]  # (prompt, then new tokens)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-(c + n) // block_size))] for c, n in lengths]
    k_all = [torch.randn(c + n, num_kv_heads, head_dim, generator=g) * 3000 for c, n in lengths]
    v_all = [torch.randn(c + n, num_kv_heads, head_dim, generator=g) * 3000 for c, n in lengths]
    q_all = [torch.randn(c + n, num_heads, head_dim, generator=g) / 3000 for c, n in lengths]
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=cache_dtype)
    backend = TorchAttentionBackend(num_heads, head_dim, 1 / math.sqrt(head_dim), num_kv_heads)
    for step, reqs in enumerate([[(0, c) for c, _ in lengths], lengths]):
        rows = [slice(0, c) if step == 0 else slice(c, c + n) for c, n in lengths]
        out = backend.forward(torch.cat([q[r] for q, r in zip(q_all, rows)]),
                              torch.cat([k[r] for k, r in zip(k_all, rows)]),
                              torch.cat([v[r] for v, r in zip(v_all, rows)]),
                              cache, _meta(reqs, tables, block_size), kv_scales=scales)
        at = 0
        for i, r in enumerate(rows):
            end = r.stop
            ref = dense_reference(q_all[i][r], quant_dequant(k_all[i][:end], k_scale, cache_dtype),
                                  quant_dequant(v_all[i][:end], v_scale, cache_dtype), backend.scale)
            n = r.stop - r.start
            torch.testing.assert_close(out[at: at + n], ref, rtol=1e-4, atol=1e-3)  # |V| ~ 3000
            at += n


@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.self_attn.k_scale", ("model.layers.3.self_attn", ("k",))),
    ("model.layers.3.self_attn.v_scale", ("model.layers.3.self_attn", ("v",))),
    ("model.layers.0.self_attn.k_proj.output_scale", ("model.layers.0.self_attn", ("k",))),
    ("model.layers.0.self_attn.v_proj.output_scale", ("model.layers.0.self_attn", ("v",))),
    ("model.layers.0.self_attn.k_proj.k_scale", ("model.layers.0.self_attn", ("k",))),
    ("model.layers.12.self_attn.kv_scale", ("model.layers.12.self_attn", ("k", "v"))),
    ("model.layers.1.self_attn.q_scale", ("model.layers.1.self_attn", ())),
    ("model.layers.1.self_attn.k_proj.weight_scale", None),
    ("model.layers.1.self_attn.k_proj.weight", None),
    ("model.layers.1.mlp.down_proj.input_scale", None),
])
def test_checkpoint_kv_scale_names(name, expected):
    assert match_kv_scale(name) == expected


@pytest.mark.parametrize("tensor,message", [
    (torch.tensor(-0.5), "must be finite and positive, got -0.5"),
    (torch.tensor(0.0), "must be finite and positive, got 0.0"),
    (torch.tensor(float("nan")), "must be finite and positive, got nan"),
    (torch.tensor(float("inf")), "must be finite and positive, got inf"),
    (torch.tensor([0.1, 0.2]), r"must hold one value \(a per-tensor scale\), got shape \(2,\)"),
    (torch.tensor([1], dtype=torch.int32), "must be a floating-point tensor"),
])
def test_bad_scales_are_refused_naming_the_tensor(tensor, message):
    with pytest.raises(ValueError, match=r"'model.layers.2.self_attn.k_scale' " + message):
        check_kv_scale("model.layers.2.self_attn.k_scale", tensor)


def test_good_scales_of_one_element_any_shape():
    assert check_kv_scale("x", torch.tensor([0.25])) == 0.25
    assert check_kv_scale("x", torch.tensor(0.125, dtype=torch.bfloat16)) == 0.125


def test_calibration_is_amax_over_fp8_max():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_scale", torch.ones(()))
            self.register_buffer("v_scale", torch.ones(()))

    layer = Layer()
    k = torch.tensor([[1.0, -896.0], [3.0, 4.0]])
    calibrate_kv_scales(layer, k, torch.zeros(2, 2), 448.0)
    assert layer.k_scale.item() == 2.0 and layer.v_scale.item() == 1.0  # all-zero V keeps 1.0
