"""The configurable FP8 W8A16 decode GEMV (ember/kernels/triton_fp8_gemv.py)
against plain PyTorch float32: every conversion, MMA orientation, split-K and
epilogue in Triton's interpreter at small shapes with odd N and K tails; on
CUDA also the PTX conversion at Llama-3.1-8B shapes.

Bounds: the weights are widened exactly and the products summed in float32,
so the result differs from the float32 reference by bfloat16's rounding of
the output (1e-2 of the largest output); the SwiGLU and residual epilogues
round as the unfused kernels do, which the reference repeats."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.interpret import DEVICE, ON_GPU, by_device

triton = pytest.importorskip("triton")

from ember.kernels import triton_fp8_gemv  # noqa: E402
from ember.kernels.triton_fp8 import fp8_skinny_linear  # noqa: E402
from ember.kernels.triton_fp8_gemv import Fp8GemvConfig, fp8_gemv, m_bucket  # noqa: E402
from ember.loader.weight_utils import dequant_fp8_block  # noqa: E402
from tests.layers.quantization.fp8_ref import quantize_blocks  # noqa: E402

FP8 = torch.float8_e4m3fn
BF16 = torch.bfloat16


def _weight(n, k, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=DEVICE)
    s = w.abs().amax(1) / 448
    q = (w / s[:, None]).to(FP8)
    q[0, :4] = torch.tensor([0.0, -0.0, 2 ** -9, -(2 ** -7)], device=DEVICE).to(FP8)  # zeros and subnormals
    return q, s.float()


def _reference(x, q, s, bias=None, gated=False, residual=None):
    """float32 product of the dequantized weight, then the epilogue's roundings."""
    y = x.float() @ (q.float() * s[:, None]).T
    if bias is not None:
        y = y + bias.float()
    if gated:
        d = y.shape[1] // 2
        gate, up = y[:, :d].to(x.dtype).float(), y[:, d:].to(x.dtype)
        y = (gate / (1 + torch.exp(-gate))).to(x.dtype) * up
    y = y.to(x.dtype)
    if residual is not None:
        y = (y.float() + residual.float()).to(x.dtype)
    return y


def _close(y, ref):
    assert y.shape == ref.shape and y.dtype == ref.dtype
    assert torch.isfinite(y.float()).all()
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < 1e-2, err


CPU_CONFIGS = [
    Fp8GemvConfig(32, 64, 2, convert="cast"),
    Fp8GemvConfig(32, 64, 2, convert="bits"),
    Fp8GemvConfig(32, 32, 2, convert="bits", mma="wx"),
    Fp8GemvConfig(16, 32, 2, convert="bits", mma="fma"),
    Fp8GemvConfig(32, 32, 2, convert="bits", split_k=3),
    Fp8GemvConfig(32, 32, 2, convert="bits", mma="wx", split_k=2, evict_first=True),
    Fp8GemvConfig(16, 32, 2, convert="bits", mma="fma", split_k=2),
    Fp8GemvConfig(32, 32, 2, convert="bits", chains=2),
    Fp8GemvConfig(16, 16, 2, convert="bits", mma="wx", split_k=3, chains=2),
]


# On CUDA (where test_llama_8b_shapes runs the real tiles) a few of them, to
# keep the compile time of the kernel test run short.
CONFIGS = by_device([CPU_CONFIGS[1], CPU_CONFIGS[5], CPU_CONFIGS[6], CPU_CONFIGS[8]], CPU_CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m,n,k", [(1, 40, 96), (3, 33, 128), (16, 72, 80)])
def test_gemv_matches_float32(config, m, n, k):
    if ON_GPU:
        n, k = n * 64, k * 32
    q, s = _weight(n, k, 0)
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    _close(fp8_gemv(x, q, s, config), _reference(x, q, s))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("m", [2, 16])
def test_epilogues(config, m):
    """Bias, SwiGLU (gate_up rows: an odd D) and the residual add, alone and together."""
    d, k = 21, 96
    q, s = _weight(2 * d, k, 1)
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    bias = torch.randn(2 * d, device=DEVICE, dtype=BF16)
    _close(fp8_gemv(x, q, s, config, bias), _reference(x, q, s, bias))
    _close(fp8_gemv(x, q, s, config, bias, gated=True), _reference(x, q, s, bias, gated=True))
    residual = torch.randn(m, d, device=DEVICE, dtype=BF16) * 4
    _close(fp8_gemv(x, q, s, config, gated=True, residual=residual),
           _reference(x, q, s, gated=True, residual=residual))
    residual = torch.randn(m, 2 * d, device=DEVICE, dtype=BF16)
    _close(fp8_gemv(x, q, s, config, bias, residual=residual), _reference(x, q, s, bias, residual=residual))


@pytest.mark.parametrize("convert", by_device(["bits"], ["cast", "bits"]))
def test_float16_activations(convert):
    q, s = _weight(40, 64, 2)
    x = torch.randn(5, 64, device=DEVICE, dtype=torch.float16)
    for mma in ("xw", "wx", "fma"):
        _close(fp8_gemv(x, q, s, Fp8GemvConfig(32, 32, 2, convert=convert, mma=mma)), _reference(x, q, s))


def test_split_k_counters_reset_between_launches():
    """The last program of each column tile resets its counter: repeated
    launches (as CUDA-graph replays are) stay correct, for another shape too."""
    config = Fp8GemvConfig(16, 32, 2, convert="bits", split_k=3)
    q, s = _weight(48, 96, 3)
    x = torch.randn(4, 96, device=DEVICE, dtype=BF16)
    ref = _reference(x, q, s)
    for _ in range(3):
        _close(fp8_gemv(x, q, s, config), ref)
    q2, s2 = _weight(20, 64, 4)
    _close(fp8_gemv(x[:, :64].contiguous(), q2, s2, config), _reference(x[:, :64], q2, s2))
    assert int(triton_fp8_gemv._COUNTERS[torch.device(DEVICE)].abs().sum()) == 0


def test_table_selects_a_config_and_refuses_what_it_cannot_run(monkeypatch):
    q, s = _weight(40, 96, 5)
    x = torch.randn(3, 96, device=DEVICE, dtype=BF16)
    calls = []
    real = triton_fp8_gemv.fp8_gemv

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    config = Fp8GemvConfig(16, 32, 2, convert="bits", mma="wx", split_k=2)
    monkeypatch.setattr("ember.kernels.triton_fp8.fp8_gemv", spy)
    monkeypatch.setitem(triton_fp8_gemv.FP8_GEMV_CONFIGS, (40, 96, m_bucket(3)), config)
    _close(fp8_skinny_linear(x, q, s), _reference(x, q, s))
    _close(fp8_skinny_linear(x, q, s, gated=True), _reference(x, q, s, gated=True))
    assert calls == [config, config]
    fp8_skinny_linear(x[:1], q, s)  # the M = 1 bucket is not listed: the skinny kernel
    assert len(calls) == 2
    assert [m_bucket(m) for m in (1, 2, 4, 5, 8, 9, 16)] == [1, 4, 4, 8, 8, 16, 16]
    with pytest.raises(ValueError, match="FP8 GEMV"):
        fp8_gemv(torch.zeros(17, 96, dtype=BF16, device=DEVICE), q, s, config)
    with pytest.raises(ValueError, match="FP8 GEMV"):
        fp8_gemv(x, q, s[:8], config)
    with pytest.raises(ValueError, match="odd"):
        fp8_gemv(x, q[:39], s[:39], config, gated=True)
    with pytest.raises(ValueError, match="config"):
        Fp8GemvConfig(32, 64, 2, convert="ptx")
    with pytest.raises(ValueError, match="config"):
        Fp8GemvConfig(32, 64, 2, convert="asm", mma="fma")
    with pytest.raises(ValueError, match="config"):
        Fp8GemvConfig(32, 64, 2, chains=3)
    if not ON_GPU:
        with pytest.raises(ValueError, match="CUDA only"):
            fp8_gemv(x, q, s, Fp8GemvConfig(32, 32, 2, convert="asm"))


LLAMA_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


@pytest.mark.gpu
@pytest.mark.parametrize("config", [Fp8GemvConfig(32, 512, 4, convert="asm"),
                                    Fp8GemvConfig(64, 256, 4, convert="asm", mma="wx"),
                                    Fp8GemvConfig(32, 512, 4, convert="asm", split_k=4),
                                    Fp8GemvConfig(32, 256, 3, convert="bits", mma="fma", split_k=2)],
                         ids=lambda c: c.name)
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("proj", list(LLAMA_8B))
def test_llama_8b_shapes(config, m, proj):
    """The PTX conversion and the real tiles at the 8B shapes (gate_up with its SwiGLU epilogue)."""
    if config.mma == "fma" and m > 4:
        pytest.skip("CUDA-core products are for a few rows")
    n, k = LLAMA_8B[proj]
    q, s = _weight(n, k, 6)
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    gated = proj == "gate_up"
    _close(fp8_gemv(x, q, s, config, gated=gated), _reference(x, q, s, gated=gated))


@pytest.mark.gpu
@pytest.mark.parametrize("config", [Fp8GemvConfig(32, 256, 4, split_k=4), Fp8GemvConfig(64, 256, 4, mma="wx")],
                         ids=lambda c: c.name)
def test_table_entry_replays_in_a_cuda_graph(config, monkeypatch):
    """The layer's entry point with a listed shape, PDL on, captured in a CUDA
    graph and replayed: split-K counters and partials stay right across replays."""
    n, k, m = 4096, 4096, 4
    monkeypatch.setitem(triton_fp8_gemv.FP8_GEMV_CONFIGS, (n, k, m_bucket(m)), config)
    q, s = _weight(n, k, 7)
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    fp8_skinny_linear(x, q, s, use_pdl=True)  # compiles, allocates the counters
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_skinny_linear(x, q, s, use_pdl=True)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        _close(y, _reference(x, q, s))


def _block_weight(n, k, gn, gk, seed):
    """FP8 [n, k] with [ceil(n / gn), ceil(k / gk)] block scales (amax / 448
    per block), and its float32 dequantization."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=DEVICE) * (1 + torch.arange(k, device=DEVICE) % 7)  # uneven groups
    q, s = quantize_blocks(w[None], gn, gk)
    q, s = q[0], s[0].float().contiguous()
    return q, s, dequant_fp8_block(q, s, (gn, gk), torch.float32)


BLOCK_CONFIGS = [Fp8GemvConfig(32, 32, 2, convert="bits"), Fp8GemvConfig(32, 16, 2, convert="bits", chains=2),
                 Fp8GemvConfig(32, 32, 2, convert="bits", mma="wx", split_k=2),
                 Fp8GemvConfig(16, 16, 2, convert="bits", split_k=3, chains=2)]


@pytest.mark.parametrize("config", BLOCK_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("gn", [16, 1])
@pytest.mark.parametrize("m", [1, 5])
def test_block_scales_match_float32(config, gn, m):
    """Block scales (DeepSeek-V3's layout, and one row of scales per weight
    row) applied per K tile, with odd N and K tails, plain and gated."""
    n, k, gk = 72, 112, 32
    q, s, deq = _block_weight(n, k, gn, gk, 11)
    x = torch.randn(m, k, device=DEVICE, dtype=BF16)
    ref = (x.float() @ deq.T).to(BF16)
    _close(fp8_gemv(x, q, s, config, group_n=gn, group_k=gk), ref)
    y = x.float() @ deq.T
    gate, up = y[:, : n // 2].to(BF16).float(), y[:, n // 2:].to(BF16)
    _close(fp8_gemv(x, q, s, config, gated=True, group_n=gn, group_k=gk),
           (gate / (1 + torch.exp(-gate))).to(BF16) * up)


def test_block_scales_refused_where_they_do_not_fit():
    q, s, _ = _block_weight(64, 128, 16, 32, 12)
    x = torch.randn(2, 128, device=DEVICE, dtype=BF16)
    with pytest.raises(ValueError, match="block scales"):
        fp8_gemv(x, q, s, Fp8GemvConfig(32, 64, 2, convert="bits"), group_n=16, group_k=32)  # tile spans 2 groups
    with pytest.raises(ValueError, match="block scales"):
        fp8_gemv(x, q, s[:, :2], Fp8GemvConfig(32, 32, 2, convert="bits"), group_n=16, group_k=32)
    with pytest.raises(ValueError, match="block scales"):
        fp8_gemv(x, q, s, Fp8GemvConfig(16, 32, 2, convert="bits", mma="fma"), group_n=16, group_k=32)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("n,k,gated", [(2112, 7168, False), (24576, 1536, False), (7168, 16384, False),
                                       (36864, 7168, True), (7168, 18432, False), (576, 7168, False)])
def test_block_scales_deepseek_shapes(m, n, k, gated):
    """The layer's entry point at DeepSeek-V3's dense shapes with 128 x 128
    block scales (the PTX widening and the split-K rule of
    ``block_scaled_config``) against float32."""
    q, s, deq = _block_weight(n, k, 128, 128, 13)
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    y = x.float() @ deq.T
    if gated:
        g, u = y[:, : n // 2].to(BF16).float(), y[:, n // 2:].to(BF16)
        ref = (g / (1 + torch.exp(-g))).to(BF16) * u
    else:
        ref = y.to(BF16)
    _close(fp8_skinny_linear(x, q, s, 128, 128, gated=gated, use_pdl=True), ref)
