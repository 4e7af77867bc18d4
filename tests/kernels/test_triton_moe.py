"""Triton fused MoE vs the plain-PyTorch experts loop (float32 and bf16): on
CUDA at full shapes, without it on CPU in Triton's interpreter at small ones
(tests/kernels/interpret.py)."""

import pytest
import torch

from ember.layers.moe.torch_moe import fused_experts_torch
from tests.kernels.interpret import DEVICE, by_device

triton = pytest.importorskip("triton")


def _routing(num_tokens, num_experts, top_k, gen, device):
    logits = torch.randn(num_tokens, num_experts, generator=gen, device=device)
    w, ids = logits.softmax(-1).topk(top_k, dim=-1)
    return w / w.sum(-1, keepdim=True), ids


@pytest.mark.parametrize("block_m", [4, 16])
def test_moe_align_covers_every_pair_once(block_m):
    from ember.kernels.triton_moe import moe_align

    gen = torch.Generator().manual_seed(0)
    _, ids = _routing(37, 8, 3, gen, "cpu")
    sorted_ids, block_expert = moe_align(ids, 8, block_m)
    n = ids.numel()
    real = sorted_ids[sorted_ids < n]
    assert sorted(real.tolist()) == list(range(n))
    flat = ids.flatten()
    for b, e in enumerate(block_expert.tolist()):
        rows = sorted_ids[b * block_m:(b + 1) * block_m]
        rows = rows[rows < n]
        if e < 0:
            assert rows.numel() == 0
        else:
            assert bool((flat[rows.long()] == e).all())


def test_pair_blocks_give_each_pair_its_own_block():
    from ember.kernels.triton_moe import pair_blocks

    ids = torch.tensor([[3, 1], [1, 0], [2, 3]])
    sorted_ids, block_expert = pair_blocks(ids, 4)
    assert block_expert.tolist() == [3, 1, 1, 0, 2, 3]
    assert sorted_ids.view(6, 4)[:, 0].tolist() == list(range(6))
    assert bool((sorted_ids.view(6, 4)[:, 1:] == 6).all())  # padding rows hold num_pairs


@pytest.mark.parametrize("form", ["auto", "gemv", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter", by_device(
    [(1, 8, 2, 256, 128), (7, 128, 8, 2048, 768), (300, 16, 4, 512, 384), (64, 256, 8, 1024, 256)],
    # 16-row blocks with experts left idle; 64-row blocks (more pairs than
    # 64 per expert); K and N not multiples of the 64-wide tiles.
    [(1, 8, 2, 64, 32), (9, 16, 4, 96, 80), (150, 4, 2, 64, 48)]))
def test_fused_moe_matches_torch(dtype, num_tokens, num_experts, top_k, hidden, inter, form):
    # "auto" picks the per-pair GEMV form up to GEMV_MAX_PAIRS pairs, else the grouped GEMM.
    from ember.kernels import triton_moe

    if form == "gemv" and num_tokens * top_k > 4 * triton_moe.GEMV_MAX_PAIRS:
        pytest.skip("the GEMV form is for decode sizes")
    fused = {"auto": triton_moe.fused_experts_triton, "gemv": triton_moe.fused_experts_gemv,
             "grouped": triton_moe.fused_experts_grouped}[form]

    gen = torch.Generator(device=DEVICE).manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=gen, device=DEVICE).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=DEVICE) / hidden ** 0.5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=gen, device=DEVICE) / inter ** 0.5).to(dtype)
    weights, ids = _routing(num_tokens, num_experts, top_k, gen, DEVICE)
    ref = fused_experts_torch(x.float(), w13.float(), w2.float(), weights, ids)
    out = fused(x, w13, w2, weights, ids)
    assert not out.isnan().any()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < (1e-2 if dtype == torch.bfloat16 else 1e-5), rel
