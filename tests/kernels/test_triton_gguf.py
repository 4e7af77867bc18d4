"""GGUF Triton kernels (:mod:`ember.kernels.triton_gguf`) against the float32
of the blocks as Ember's PyTorch dequantizer decodes them (itself
bit-identical to gguf-py, see tests/layers/quantization/test_gguf_method.py):
in Triton's interpreter at tiny shapes, and on CUDA at real shapes."""

from __future__ import annotations

import pytest
import torch

from ember.kernels.triton_gguf import gguf_dequantize, gguf_gemv
from ember.layers.quantization.gguf import GGML_TYPE_NAMES, GGUF_BLOCK_SIZES, GT, GGUFLinearMethod, dequantize_gguf
from tests.kernels.interpret import DEVICE, faithful_interpreter

TYPES = sorted(GGUF_BLOCK_SIZES, key=int)
# Byte offsets of each type's float16 scales (d, and m / dmin).
_SCALE_OFFSETS = {GT.Q4_0: (0,), GT.Q4_1: (0, 2), GT.Q5_0: (0,), GT.Q5_1: (0, 2), GT.Q8_0: (0,),
                  GT.Q4_K: (0, 2), GT.Q5_K: (0, 2), GT.Q6_K: (208,)}


def random_blocks(qtype: int, n: int, k: int, seed: int = 0, device: str = DEVICE) -> torch.Tensor:
    """[n, row_bytes] uint8: random quants, finite float16 scales of about 0.01."""
    elems, nbytes = GGUF_BLOCK_SIZES[qtype]
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // elems, nbytes), dtype=torch.uint8, generator=gen)
    for off in _SCALE_OFFSETS[qtype]:
        scale = (torch.rand(n, k // elems, 1, generator=gen) * 0.02 - 0.01).to(torch.float16)
        blocks[:, :, off:off + 2] = scale.view(torch.uint8)
    return blocks.reshape(n, -1).to(device)


def _reference(x: torch.Tensor, w: torch.Tensor, qtype: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.float() @ dequantize_gguf(w.cpu(), qtype).to(x.device).T
    return y if bias is None else y + bias.float()


@pytest.mark.parametrize("qtype", TYPES, ids=GGML_TYPE_NAMES.get)
def test_dequantize_kernel_matches_pytorch(qtype) -> None:
    # 18 blocks of 32 (a partial step of 8) or 2 super-blocks; 40 rows (a partial row tile).
    k = 576 if GGUF_BLOCK_SIZES[qtype][0] == 32 else 512
    w = random_blocks(qtype, 40, k)
    ref = dequantize_gguf(w.cpu(), qtype)
    assert torch.equal(gguf_dequantize(w, qtype, torch.float32).cpu(), ref)
    ids = torch.tensor([3, 39, 0, 3], device=w.device)
    assert torch.equal(gguf_dequantize(w, qtype, torch.float32, rows=ids).cpu(), ref[ids.cpu()])


@pytest.mark.parametrize("qtype", TYPES, ids=GGML_TYPE_NAMES.get)
@pytest.mark.parametrize("m", [1, 5])
def test_gemv_matches_float32_reference(qtype, m) -> None:
    k = 576 if GGUF_BLOCK_SIZES[qtype][0] == 32 else 512
    w = random_blocks(qtype, 40, k, seed=m)
    x = torch.randn(m, k, device=w.device)
    bias = torch.randn(40, device=w.device)
    ref = _reference(x, w, qtype, bias)
    for block_n in (None, 32):
        torch.testing.assert_close(gguf_gemv(x, w, qtype, bias=bias, block_n=block_n), ref, rtol=1e-4, atol=1e-4)
    # A slice of a wider output (any row stride), as a merged layer writes it.
    out = torch.full((m, 100), 7.0, device=w.device)
    gguf_gemv(x, w, qtype, out=out.narrow(1, 30, 40))
    torch.testing.assert_close(out[:, 30:70], _reference(x, w, qtype), rtol=1e-4, atol=1e-4)
    assert (out[:, :30] == 7).all() and (out[:, 70:] == 7).all()


def test_gemv_bfloat16_no_nan_on_outliers() -> None:
    faithful_interpreter()
    w = random_blocks(GT.Q8_0, 32, 256)
    x = torch.randn(2, 256, device=w.device)
    x[0, 5] = 1e4
    y = gguf_gemv(x.bfloat16(), w, GT.Q8_0)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), _reference(x.bfloat16(), w, GT.Q8_0), rtol=2e-2, atol=1e-1)


def test_merged_layer_of_mixed_types_runs_one_product_per_projection() -> None:
    """A q/k/v layer whose v is Q8_0 and q/k Q5_0: the GEMV path (one kernel
    per projection into its output slice) and the dequantize path agree with
    the float32 reference of the stacked weight."""
    from torch import nn

    sizes, k = [64, 32, 32], 64
    types = [GT.Q5_0, GT.Q5_0, GT.Q8_0]
    method = GGUFLinearMethod(types)
    layer = nn.Module()
    method.create_weights(layer, k, sizes, k, sum(sizes), torch.float32)
    assert layer.weight.dim() == 1 and not method.uniform
    layer.prefix, layer.output_partition_sizes = "qkv_proj", sizes
    offsets = {"q": 0, "k": 64, "v": 96}
    layer._shard = lambda sid: (offsets[sid], sizes["qkv".index(sid)], 0)
    shards = [random_blocks(t, n, k, seed=i, device="cpu") for i, (t, n) in enumerate(zip(types, sizes))]
    for sid, blocks in zip("qkv", shards):
        layer.weight.weight_loader(layer.weight, blocks, sid)
    layer.weight.data = layer.weight.data.to(DEVICE)
    dense = torch.cat([dequantize_gguf(b, t) for b, t in zip(shards, types)])
    assert torch.equal(method.dequantized_weight(layer, torch.float32).cpu(), dense)
    x = torch.randn(3, k, device=DEVICE)
    bias = torch.randn(128, device=DEVICE)
    torch.testing.assert_close(method.apply_gemv(layer, x, bias, torch.float32).cpu(),
                               x.cpu() @ dense.T + bias.cpu(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- CUDA, real shapes

@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=GGML_TYPE_NAMES.get)
@pytest.mark.parametrize("shape", [(4096, 4096), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 16])
def test_gemv_real_shapes_cuda(qtype, shape, m) -> None:
    n, k = shape
    w = random_blocks(qtype, n, k, device="cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ dequantize_gguf(w, qtype).T
    y = gguf_gemv(x, w, qtype)
    err = (y.float() - ref).abs().max() / ref.abs().max()
    assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("qtype", TYPES, ids=GGML_TYPE_NAMES.get)
def test_dequantize_real_shape_cuda(qtype) -> None:
    w = random_blocks(qtype, 4096, 4096, device="cuda")
    ref = dequantize_gguf(w, qtype)
    assert torch.equal(gguf_dequantize(w, qtype, torch.float32), ref)
    assert torch.equal(gguf_dequantize(w, qtype, torch.bfloat16), ref.bfloat16())


@pytest.mark.gpu
def test_gemv_is_cuda_graph_capturable() -> None:
    w = random_blocks(GT.Q4_K, 1024, 1024, device="cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, 1024, device="cuda", dtype=torch.bfloat16)
    gguf_gemv(x, w, GT.Q4_K, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gguf_gemv(x, w, GT.Q4_K, out=out)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, gguf_gemv(x, w, GT.Q4_K))
