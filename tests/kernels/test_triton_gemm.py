"""The skinny decode GEMM against a float32 product, directly and through the
layers the decode fusions (ember.layers.fusion) swap in. GPU only (the
fusion transform's CPU test under Triton's interpreter is
tests/layers/test_fusion.py)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")

from ember.kernels.triton_gemm import (SKINNY_MAX_M, skinny_linear, skinny_rms_norm_linear,  # noqa: E402
                                       skinny_silu_and_mul_linear, skinny_tiles, use_skinny_linear,
                                       use_skinny_rms_norm_linear)
from ember.config import KernelConfig  # noqa: E402
from ember.kernels import triton_gemm  # noqa: E402
from ember.kernels.triton_ops import rms_norm, silu_and_mul  # noqa: E402
from ember.layers.attention import ForwardContext, QKVAttention  # noqa: E402
from ember.layers.fusion import (SkinnyGatedMLP, SkinnyLinearMethod, _prenorm_linear, _PreNormInput,  # noqa: E402
                                 _residual_linear, apply_decode_fusions)
from ember.layers.layernorm import RMSNorm  # noqa: E402
from ember.layers.linear import QKVParallelLinear, RowParallelLinear  # noqa: E402
from ember.layers.mlp import GatedMLP  # noqa: E402

CUDA = torch.device("cuda")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_tiles_by_waves_of_programs():
    # 132 SMs (H100/H200), the 8B shape: o_proj/down make one wave of
    # 32-column programs, qkv (6144 columns) 1.45 waves, gate_up and the LM head many.
    assert skinny_tiles(4096, 132) == (32, 512, 4)
    assert skinny_tiles(6144, 132) == (64, 256, 4)
    assert skinny_tiles(28672, 132) == (64, 256, 3)
    assert skinny_tiles(128256, 132) == (64, 256, 3)


def test_cpu_tensors_keep_f_linear():
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    w = torch.zeros(32, 64, dtype=torch.bfloat16)
    assert not use_skinny_linear(x, w)  # CPU tensors keep F.linear
    with pytest.raises(ValueError, match="skinny GEMM: unsupported"):
        skinny_linear(x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 4096), (72, 600)])
@pytest.mark.parametrize("bias", [False, True])
def test_skinny_linear_matches_float32(dtype, m, n, k, bias):
    g = torch.Generator(device="cuda").manual_seed(m * 7 + n + k)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device="cuda").to(dtype) if bias else None
    # Sentinel: every output element must be written.
    out = skinny_linear(x, w, b)
    assert out.shape == (m, n) and out.dtype == dtype
    ref = x.float() @ w.float().T + (b.float() if bias else 0)
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-2
    # As close to the float32 product as cuBLAS is.
    assert _rel(out, ref) <= 2 * _rel(F.linear(x, w, b), ref) + 1e-3


@pytest.mark.parametrize("m", [1, 4])
def test_float32_output_is_the_rounded_result_widened(m):
    # The LM head's float32 logits straight from the kernel equal the bf16
    # result followed by .float() (what F.linear(...).float() gives).
    from ember.layers.vocab_embedding import ParallelLMHead

    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 1024, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(5000, 1024, generator=g, device="cuda") * 0.03).to(torch.bfloat16)
    out = skinny_linear(x, w, out_dtype=torch.float32)
    assert out.dtype == torch.float32
    assert torch.equal(out, skinny_linear(x, w).float())
    head = ParallelLMHead(5000, 1024).to(torch.bfloat16).cuda()
    head.weight.data.copy_(w)
    assert apply_decode_fusions(head, KernelConfig(), CUDA).skinny_linears == 1
    assert isinstance(head.quant_method, SkinnyLinearMethod)
    assert torch.equal(head(x), out)


def test_strided_rows_and_the_row_limit():
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(8, 2 * 512, generator=g, device="cuda", dtype=torch.bfloat16)
    x = big[:, :512]  # row stride 1024, unit stride along K
    w = torch.randn(256, 512, generator=g, device="cuda", dtype=torch.bfloat16)
    assert use_skinny_linear(x, w)
    assert _rel(skinny_linear(x, w), x.float() @ w.float().T) < 1e-2
    assert not use_skinny_linear(big.T[:, :8].contiguous().T, w)  # unit stride along M, not K
    assert not use_skinny_linear(torch.zeros(SKINNY_MAX_M + 1, 512, device="cuda", dtype=torch.bfloat16), w)
    assert not use_skinny_linear(x.float(), w.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("d,k", [(14336, 4096), (4864, 896), (100, 600)])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_matches_float32_and_the_unfused_pair(dtype, m, d, k, bias):
    g = torch.Generator(device="cuda").manual_seed(m + d + k)
    x = torch.randn(m, k, generator=g, device="cuda").to(dtype)
    w = (torch.randn(2 * d, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    b = torch.randn(2 * d, generator=g, device="cuda").to(dtype) if bias else None
    out = skinny_silu_and_mul_linear(x, w, b)
    assert out.shape == (m, d) and out.dtype == dtype and torch.isfinite(out).all()
    gate, up = (x.float() @ w.float().T + (b.float() if bias else 0)).split(d, -1)
    assert _rel(out, F.silu(gate) * up) < 1e-2
    # The same roundings as the GEMM + silu_and_mul pair (the products are
    # rounded to the dtype before the activation), so at most rare one-ulp
    # differences where the MMA sums K in another order.
    unfused = silu_and_mul(skinny_linear(x, w, b))
    torch.testing.assert_close(out, unfused, rtol=1e-2, atol=1e-2)


def test_gated_rejects_odd_rows():
    x = torch.zeros(1, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="odd number of rows"):
        skinny_silu_and_mul_linear(x, torch.zeros(33, 64, device="cuda", dtype=torch.bfloat16))


@pytest.mark.parametrize("m", [1, 4, 32])
def test_mlp_fuses_the_gate_on_decode_rows(m):
    # Decode rows take the gated kernel, prefill rows (32) cuBLAS + silu_and_mul.
    torch.manual_seed(m)
    model = nn.ModuleList([GatedMLP(512, 1024)]).to(torch.bfloat16).cuda()
    for layer in (model[0].gate_up_proj, model[0].down_proj):
        layer.weight.data.normal_(0, 0.05)
    report = apply_decode_fusions(model, KernelConfig(), CUDA)
    assert report.gated_mlps == 1 and isinstance(model[0], SkinnyGatedMLP)
    mlp = model[0]
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    gate, up = F.linear(x.float(), mlp.gate_up_proj.weight.float()).split(1024, -1)
    ref = F.linear(F.silu(gate) * up, mlp.down_proj.weight.float())
    assert _rel(mlp(x), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 4, 32])
def test_linear_layers_route_decode_rows_through_it(m):
    # Qwen2-style qkv with bias and a row-parallel projection, decode (m <= 16)
    # and prefill (m = 32, cuBLAS) row counts, against float32 F.linear.
    torch.manual_seed(m)
    qkv = QKVParallelLinear(512, 64, 8, 2, bias=True, dtype=torch.bfloat16).cuda()
    o = RowParallelLinear(512, 512, bias=False, dtype=torch.bfloat16).cuda()
    for layer in (qkv, o):
        layer.weight.data.normal_(0, 0.05)
        if layer.bias is not None:
            layer.bias.data.normal_()
    assert apply_decode_fusions(nn.ModuleList([qkv, o]), KernelConfig(), CUDA).skinny_linears == 2
    x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
    for layer in (qkv, o):
        ref = F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float())
        assert _rel(layer(x), ref) < 1e-2


def test_chain_in_a_cuda_graph_with_new_inputs():
    # The decode-path chain norm -> GEMM -> SiLU -> GEMM (unfused, fused gate,
    # and norm and gate both folded into the GEMM), captured and replayed with new inputs: with programmatic dependent
    # launch (Hopper) each kernel may start before its predecessor ends, so a
    # missing wait would read stale data.
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden, inter = 1024, 2048
    norm_w = torch.rand(hidden, generator=g, device="cuda").to(torch.bfloat16) + 0.5
    w_up = (torch.randn(2 * inter, hidden, generator=g, device="cuda") * hidden ** -0.5).to(torch.bfloat16)
    w_down = (torch.randn(hidden, inter, generator=g, device="cuda") * inter ** -0.5).to(torch.bfloat16)
    x = torch.randn(4, hidden, generator=g, device="cuda").to(torch.bfloat16)

    def chain():
        h = rms_norm(x, norm_w, 1e-6)
        return (skinny_linear(silu_and_mul(skinny_linear(h, w_up)), w_down),
                skinny_linear(skinny_silu_and_mul_linear(h, w_up), w_down),
                skinny_linear(skinny_rms_norm_linear(x, w_up, norm_w, 1e-6, gated=True), w_down))

    def reference():
        h = x.float()
        h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).float() * norm_w.float()
        gate, up = (h.to(torch.bfloat16).float() @ w_up.float().T).split(inter, -1)
        act = (F.silu(gate) * up).to(torch.bfloat16).float()
        return act @ w_down.float().T

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = chain()
    for seed in range(3):
        x.copy_(torch.randn(4, hidden, generator=g, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        for out in outs:
            assert _rel(out, reference()) < 2e-2, seed


def _norm_reference(x, norm_w, eps):
    """Float32 pre-norm input as the unfused kernel rounds it (the normalized row
    rounded to x's dtype)."""
    s = x.float()
    return (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype).float() * norm_w.float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, False), (2 * 14336, 4096, True), (4864, 896, True),
                                       (200, 600, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_rms_norm_folded_matches_float32_and_the_unfused_pair(dtype, m, n, k, gated, bias):
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = (torch.randn(m, k, generator=g, device="cuda") * 3).to(dtype)
    norm_w = (torch.rand(k, generator=g, device="cuda") + 0.5).to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device="cuda").to(dtype) if bias else None
    out = skinny_rms_norm_linear(x, w, norm_w, 1e-5, b, gated=gated)
    assert out.shape == (m, n // 2 if gated else n) and out.dtype == dtype and torch.isfinite(out).all()
    ref = _norm_reference(x, norm_w, 1e-5) @ w.float().T + (b.float() if bias else 0)
    if gated:
        gate, up = ref.split(n // 2, -1)
        ref = F.silu(gate) * up
    # As close to float32 as the unfused norm + GEMM (+ SiLU) pair.
    normed = rms_norm(x, norm_w, 1e-5)
    unfused = skinny_silu_and_mul_linear(normed, w, b) if gated else skinny_linear(normed, w, b)
    assert _rel(out, ref) < 1e-2
    assert _rel(out, ref) <= 2 * _rel(unfused, ref) + 1e-3


def test_rms_norm_folded_rejects_a_mismatched_norm_weight():
    x = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(32, 64, device="cuda", dtype=torch.bfloat16)
    for norm_w in (torch.ones(32, device="cuda", dtype=torch.bfloat16), torch.ones(64, device="cuda")):
        with pytest.raises(ValueError, match="norm weight"):
            skinny_rms_norm_linear(x, w, norm_w, 1e-6)


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (100, 600)])
def test_residual_added_in_the_epilogue_as_the_separate_add(m, n, k):
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(torch.bfloat16)
    r = torch.randn(m, n, generator=g, device="cuda").to(torch.bfloat16)
    assert torch.equal(skinny_linear(x, w, residual=r), skinny_linear(x, w) + r)
    with pytest.raises(ValueError, match="residual"):
        skinny_linear(x, w, residual=r[:, :-1])


@pytest.mark.parametrize("m", [1, 7, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 14336), (100, 600)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_partial_sums_of_squares_add_up_to_the_rows_as_written(m, n, k, with_residual):
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(torch.bfloat16)
    r = torch.randn(m, n, generator=g, device="cuda").to(torch.bfloat16) if with_residual else None
    out, sumsq = skinny_linear(x, w, residual=r, with_sumsq=True)
    assert torch.equal(out, skinny_linear(x, w, residual=r))  # the result itself is unchanged
    block_n = skinny_tiles(n, torch.cuda.get_device_properties(0).multi_processor_count)[0]
    assert sumsq.shape == (-(-n // block_n), SKINNY_MAX_M) and sumsq.dtype == torch.float32
    totals = sumsq.sum(0)
    torch.testing.assert_close(totals[:m], out.float().pow(2).sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(totals[m:], torch.zeros(SKINNY_MAX_M - m, device="cuda"))


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k,gated", [(6144, 4096, False), (2 * 14336, 4096, True), (200, 600, False)])
@pytest.mark.parametrize("weight_folded", [False, True])
def test_rms_norm_folded_with_given_sums_of_squares(m, n, k, gated, weight_folded):
    # The stream comes from a GEMM that returned its sums of squares (as down
    # returns them to the next layer's qkv); with the norm weight multiplied
    # into the projection's (as the decode fusions fold it at load) the K loop is the plain GEMM's.
    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    dtype = torch.bfloat16
    h = torch.randn(m, 4096, generator=g, device="cuda").to(dtype)
    w_prev = (torch.randn(k, 4096, generator=g, device="cuda") * 4096 ** -0.5).to(dtype)
    r = (torch.randn(m, k, generator=g, device="cuda") * 3).to(dtype)
    x, sumsq = skinny_linear(h, w_prev, residual=r, with_sumsq=True)
    norm_w = (torch.rand(k, generator=g, device="cuda") + 0.5).to(dtype)
    w = (torch.randn(n, k, generator=g, device="cuda") * k ** -0.5).to(dtype)
    ref = _norm_reference(x, norm_w, 1e-5) @ w.float().T
    if gated:
        gate, up = ref.split(n // 2, -1)
        ref = F.silu(gate) * up
    if weight_folded:
        out = skinny_rms_norm_linear(x, w * norm_w, None, 1e-5, gated=gated, sumsq=sumsq)
    else:
        out = skinny_rms_norm_linear(x, w, norm_w, 1e-5, gated=gated, sumsq=sumsq)
    assert out.shape == (m, n // 2 if gated else n) and torch.isfinite(out).all()
    normed = rms_norm(x, norm_w, 1e-5)
    unfused = skinny_silu_and_mul_linear(normed, w) if gated else skinny_linear(normed, w)
    assert _rel(out, ref) < 1e-2
    assert _rel(out, ref) <= 2 * _rel(unfused, ref) + 1e-3
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert use_skinny_rms_norm_linear(x, w, plain_loop=weight_folded) == (weight_folded or n >= 2 * 32 * sms)


def test_rms_norm_folded_rejects_malformed_sums_of_squares():
    x = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
    w = torch.zeros(32, 64, device="cuda", dtype=torch.bfloat16)
    for sumsq in (torch.zeros(4, 8, device="cuda"), torch.zeros(4, SKINNY_MAX_M, device="cuda", dtype=torch.bfloat16),
                  torch.zeros(SKINNY_MAX_M, 4, device="cuda").T):
        with pytest.raises(ValueError, match="sumsq"):
            skinny_rms_norm_linear(x, w, None, 1e-6, sumsq=sumsq)


class _QKVOnlyAttention(QKVAttention):
    """A stand-in attention block with Llama's projections: o_proj of q (no KV cache)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(hidden, 64, hidden // 64, 2, dtype=torch.bfloat16)
        self.o_proj = RowParallelLinear(hidden, hidden, dtype=torch.bfloat16)

    def attend(self, qkv, ctx):
        return qkv[:, :self.o_proj.in_features]

    def reference(self, x):
        return F.linear(F.linear(x, self.qkv_proj.weight.float())[:, :self.o_proj.in_features],
                        self.o_proj.weight.float())


@pytest.mark.parametrize("m", [1, 4, 32])
def test_input_norm_folded_into_qkv_across_layers(monkeypatch, m):
    # Three pre-norm layers fused by the transform, the input norms' weights
    # multiplied into qkv. On decode rows each down returns the stream's sums
    # of squares and the next layer's qkv folds its norm with them; prefill
    # rows (32) run the norm kernel with the ones left in the norm. Both match
    # the plain layers in float32.
    from ember.models.utils import PreNormDecoderLayer

    calls = []
    real = triton_gemm.skinny_rms_norm_linear
    monkeypatch.setattr(triton_gemm, "skinny_rms_norm_linear",
                        lambda *a, **k: calls.append(k.get("sumsq") is not None) or real(*a, **k))
    torch.manual_seed(m)
    hidden = 1024
    model = nn.ModuleList()
    for _ in range(3):
        layer = PreNormDecoderLayer(_QKVOnlyAttention(hidden), GatedMLP(hidden, 2816), hidden, 1e-6)
        layer = layer.to(torch.bfloat16).cuda()
        for p in layer.parameters():
            p.data.normal_(0, 0.03)
        layer.input_layernorm.weight.data.uniform_(0.5, 1.5)
        layer.post_attention_layernorm.weight.data.uniform_(0.5, 1.5)
        model.append(layer)
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    ref = x.float()
    for layer in model:
        ref = ref + layer.self_attn.reference(_norm_reference(ref.to(torch.bfloat16), layer.input_layernorm.weight, 1e-6))
        h = _norm_reference(ref.to(torch.bfloat16), layer.post_attention_layernorm.weight, 1e-6)
        gate, up = F.linear(h, layer.mlp.gate_up_proj.weight.float()).split(2816, -1)
        ref = ref + F.linear(F.silu(gate) * up, layer.mlp.down_proj.weight.float())
    report = apply_decode_fusions(model, KernelConfig(), CUDA)
    assert report.folded_norm_weights == 3 and report.sumsq_handoffs == 2
    assert all(torch.equal(l.input_layernorm.weight, torch.ones_like(l.input_layernorm.weight)) for l in model)
    ctx = ForwardContext(None, [])
    hidden_states, residual = x, None
    for layer in model:
        hidden_states, residual = layer(None, hidden_states, residual, ctx)
    out = hidden_states if residual is None else hidden_states + residual
    assert _rel(out, ref) < 1e-2
    # The qkv of layers 2 and 3 got the sums of squares on decode rows (layer
    # 1's input is not a GEMM's output; at <= 132 SMs its qkv does not fold).
    assert calls.count(True) == (2 if m <= SKINNY_MAX_M else 0)


def test_norm_folds_into_many_wave_projections_only():
    x = torch.zeros(1, 4096, device="cuda", dtype=torch.bfloat16)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for rows in (6144, 28672):
        w = torch.empty(rows, 4096, device="cuda", dtype=torch.bfloat16)
        assert use_skinny_rms_norm_linear(x, w) == (rows >= 2 * 32 * sms)


@pytest.mark.parametrize("m", [1, 4, 32])
@pytest.mark.parametrize("with_residual", [False, True])
def test_prenorm_input_through_the_layers(m, with_residual):
    # QKV and the MLP of a fused layer given a pre-norm input and adding its stream at the end:
    # decode rows (m <= 16) of a one-tensor stream fold the norm into the GEMM
    # (the projections are large enough) and the add into the last GEMM;
    # prefill rows (32), or a stream still in two parts, materialize the norm.
    # All match float32.
    torch.manual_seed(m)
    hidden = 512
    norm = RMSNorm(hidden, 1e-6).to(torch.bfloat16).cuda()
    norm.weight.data.uniform_(0.5, 1.5)
    qkv = QKVParallelLinear(hidden, 64, 160, 8, bias=True, dtype=torch.bfloat16).cuda()  # 11,264 rows
    mlp = GatedMLP(hidden, 5632).to(torch.bfloat16).cuda()
    for layer in (qkv, mlp.gate_up_proj, mlp.down_proj):
        layer.weight.data.normal_(0, 0.05)
    qkv.bias.data.normal_()
    x = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(m, hidden, device="cuda", dtype=torch.bfloat16) if with_residual else None
    stream = x if r is None else x + r
    h = _norm_reference(stream, norm.weight, 1e-6)
    gate, up = F.linear(h, mlp.gate_up_proj.weight.float()).split(5632, -1)
    folds = m <= SKINNY_MAX_M and not with_residual
    for layer in (qkv, mlp.gate_up_proj):
        assert use_skinny_rms_norm_linear(x[:SKINNY_MAX_M], layer.weight)  # <= 132 SMs
    inp = _PreNormInput(x, norm, r)
    assert _rel(_prenorm_linear(inp, qkv, use_pdl=True), F.linear(h, qkv.weight.float(), qkv.bias.float())) < 1e-2
    assert (inp.normed is None) == folds
    assert torch.equal(inp.stream, stream)
    inp = _PreNormInput(x, norm, r)
    ref = F.linear(F.silu(gate) * up, mlp.down_proj.weight.float()) + stream.float()
    out = _residual_linear(_prenorm_linear(inp, mlp.gate_up_proj, use_pdl=True, gated=True), mlp.down_proj, inp,
                           use_pdl=True)
    assert _rel(out, ref) < 1e-2
    assert (inp.normed is None) == folds
