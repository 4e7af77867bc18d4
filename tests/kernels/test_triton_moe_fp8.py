"""Triton FP8 fused MoE (block scales with 1 x bk activation groups, per-channel
scales with per-token activations, static activation scales) against a float32
reference of the dequantized experts on the same quantized activations: on
CUDA at DeepSeek-V3 and Qwen3-30B-A3B expert shapes, without it on CPU in
Triton's interpreter at small shapes (tests/kernels/interpret.py)."""

import pytest
import torch
import torch.nn.functional as F

from ember.layers.moe.torch_moe import fused_experts_fp8_torch, quantize_fp8_torch
from tests.kernels.interpret import DEVICE, ON_GPU, by_device
from tests.layers.quantization.fp8_ref import FP8_MAX, dequant, quantize_blocks, quantize_rows, reference, routing

triton = pytest.importorskip("triton")


def _experts(num_experts, hidden, inter, gen):
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=DEVICE) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=DEVICE) / inter ** 0.5
    return w13, w2


@pytest.mark.parametrize("group", by_device([64, 128], [16, 32]))
def test_quant_fp8_matches_torch(group):
    from ember.kernels.triton_moe import quant_fp8

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(5, 4 * group + 8, generator=gen, device=DEVICE)
    x[1, 3] = 1e4
    x[2] = 0.0
    for g in (group, None):
        q, s = quant_fp8(x, g)
        q_ref, s_ref = quantize_fp8_torch(x, g)
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        assert (q.float() - q_ref.float()).abs().le(q_ref.float().abs() * 2 ** -3 + 1e-30).all()
        assert not q.float().isnan().any()
    static = torch.tensor([0.01], device=DEVICE)
    q, s = quant_fp8(x, None, static_scale=static)
    assert bool((s == 0.01).all()) and q.float().abs().max() == FP8_MAX  # the outlier saturates
    gate_up = torch.randn(3, 2 * group, generator=gen, device=DEVICE)
    q, s = quant_fp8(gate_up, group, silu_mul=True)
    q_ref, s_ref = quantize_fp8_torch(F.silu(gate_up[:, :group]) * gate_up[:, group:], group)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)


SHAPES = by_device(
    [(1, 16, 4, 512, 256), (37, 64, 8, 1024, 512), (300, 8, 2, 512, 256)],
    # 16-row blocks with experts left idle; 64-row blocks; hidden not a multiple of the block width.
    [(1, 8, 2, 64, 32), (9, 16, 4, 96, 32), (150, 4, 2, 72, 32)])


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", SHAPES)
@pytest.mark.parametrize("scheme", ["block", "channel", "static"])
def test_fused_moe_fp8_matches_reference(scheme, num_tokens, num_experts, top_k, hidden, inter):
    from ember.kernels.triton_moe import fused_experts_fp8_triton

    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen, device=DEVICE)
    x[0, 1] = 1e4  # an outlier activation
    w13, w2 = _experts(num_experts, hidden, inter, gen)
    weights, ids = routing(num_tokens, num_experts, top_k, gen, DEVICE)
    block = by_device((128, 128), (16, 16)) if scheme == "block" else None
    if block:
        (q13, s13), (q2, s2) = quantize_blocks(w13, *block), quantize_blocks(w2, *block)
    else:
        (q13, s13), (q2, s2) = quantize_rows(w13), quantize_rows(w2)
    a13 = a2 = None
    if scheme == "static":
        a13, a2 = torch.tensor([0.02], device=DEVICE), torch.tensor([0.05], device=DEVICE)
    group = block[1] if block else None
    w13_f, w2_f = dequant(q13, s13, block), dequant(q2, s2, block)
    cpu = fused_experts_fp8_torch(x, q13, q2, s13, s2, weights, ids, block, a13, a2)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        ref = reference(xd.float(), w13_f, w2_f, weights, ids, group, a13, a2)
        out = fused_experts_fp8_triton(xd, q13, q2, s13, s2, weights, ids, block, a13, a2)
        assert out.dtype == dtype and not out.isnan().any()
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        # float32: only the order of the sums differs (and, rarely, an activation
        # rounded to the neighbouring FP8 value); bf16: also its rounding of the
        # first GEMM's output (before the second quantization) and of the result.
        assert rel < (2e-3 if dtype == torch.float32 else 2e-2), (dtype, rel)
        if dtype == torch.float32:  # the plain-PyTorch path too
            assert ((cpu - ref).norm() / ref.norm()).item() < 2e-3


def _quantized_experts(num_experts, hidden, inter, block, gen, device="cuda", chunk=16):
    """Random experts quantized a few at a time (DeepSeek-V3's float32 experts
    would not fit the GPU at once): FP8 w13 / w2 and their scales."""
    parts = []
    for e0 in range(0, num_experts, chunk):
        w13 = torch.randn(min(chunk, num_experts - e0), 2 * inter, hidden, generator=gen, device=device) / hidden ** 0.5
        w2 = torch.randn(w13.shape[0], hidden, inter, generator=gen, device=device) / inter ** 0.5
        q = (quantize_blocks(w13, *block), quantize_blocks(w2, *block)) if block else (quantize_rows(w13),
                                                                                      quantize_rows(w2))
        parts.append(q)
        del w13, w2
    return [torch.cat([p[i][j] for p in parts]) for i in (0, 1) for j in (0, 1)]


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("shape", [(256, 8, 7168, 2048), (128, 8, 2048, 768)], ids=["deepseek-v3", "qwen3-30b-a3b"])
@pytest.mark.parametrize("scheme", ["block", "channel"])
def test_fused_moe_fp8_real_shapes(scheme, shape):
    """Real expert shapes, 1, 64 and 1024 tokens of bf16 activations, against
    the plain-PyTorch FP8 path on the GPU (dequantized float32 weights, the same
    activation quantization)."""
    from ember.kernels.triton_moe import fused_experts_fp8_triton

    num_experts, top_k, hidden, inter = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    block = (128, 128) if scheme == "block" else None
    q13, s13, q2, s2 = _quantized_experts(num_experts, hidden, inter, block, gen)
    for num_tokens in (1, 64, 1024):
        x = torch.randn(num_tokens, hidden, generator=gen, device="cuda").bfloat16()
        weights, ids = routing(num_tokens, num_experts, top_k, gen, "cuda")
        ref = fused_experts_fp8_torch(x.float(), q13, q2, s13, s2, weights, ids, block)
        out = fused_experts_fp8_triton(x, q13, q2, s13, s2, weights, ids, block)
        assert not out.isnan().any()
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel < 3e-2, (num_tokens, rel)  # bf16 rounding of x, of the first GEMM output and of the result
