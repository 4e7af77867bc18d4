"""Fp8LinearMethod: every scheme's loading (merged projections, tensor-parallel
shards, per-tensor / per-channel / block scales) and product against a float32
reference of (dequantized weights) x (quantized activations), built here from
loops over rows and groups and the loader's block dequantizer; its kernel path
(``apply_kernels``) against the same on CPU in Triton's interpreter; outliers;
and the errors bad checkpoints raise.

Error bounds (relative to the largest output): the CPU path computes exactly the
reference's math, so only float32 summation order differs (<= 1e-5); the
kernel path's GEMM likewise (<= 1e-5), its decode GEMV keeps the activations in
bfloat16 unquantized and rounds the result to bfloat16 (<= 1e-2 of the W8A16
reference, and within FP8's activation error of the W8A8 one: <= 6e-2)."""

from __future__ import annotations

import pytest
import torch

from ember.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from ember.layers.quantization import get_quant_config
from ember.layers.quantization.fp8 import Fp8Config
from ember.layers.quantization.fp8_linear import Fp8DenseWeightMethod, Fp8LinearMethod
from ember.layers.quantization.base import dense_weight
from ember.loader.weight_utils import dequant_fp8_block
from tests.layers.test_linear import _on_rank

FP8 = torch.float8_e4m3fn
ONLINE = Fp8Config()
STATIC = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="static")
DYNAMIC = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic")


def BLOCK(bm=16, bn=16):
    return Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=(bm, bn))


def _rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


# ----------------------------------------------------------------- independent float32 reference
def _quant_rows(x: torch.Tensor, group: int | None = None, static: float | None = None) -> torch.Tensor:
    """Quantize-dequantize activations group by group (loops), float32."""
    out = torch.empty_like(x, dtype=torch.float32)
    group = group or x.shape[1]
    for i in range(x.shape[0]):
        for start in range(0, x.shape[1], group):
            seg = x[i, start:start + group].float()
            s = static if static is not None else max(float(seg.abs().max()), 1e-10) / 448.0
            out[i, start:start + group] = (seg / s).clamp(-448, 448).to(FP8).float() * s
    return out


def _quant_tensor(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().max().float() / 448.0
    return (w / scale).to(FP8), scale.reshape(())


def _quant_blocks(w: torch.Tensor, bm: int, bn: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    scale = torch.empty(-(-n // bm), -(-k // bn))
    q = torch.empty(n, k, dtype=FP8)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            scale[i, j] = blk.abs().max() / 448.0
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / scale[i, j]).to(FP8)
    return q, scale


def _load(layer, name: str, tensor: torch.Tensor, *shard) -> None:
    """As load_hf_weights does: the parameter's own loader, else the layer's."""
    p = getattr(layer, name)
    (getattr(p, "weight_loader", None) or layer.weight_loader)(p, tensor, *shard)


def _finish(layer):
    layer.quant_method.process_weights_after_loading(layer)
    return layer


# ----------------------------------------------------------------- schemes
def test_online_quantizes_per_channel_and_matches_reference():
    torch.manual_seed(0)
    w, b, x = torch.randn(24, 40), torch.randn(24), torch.randn(7, 40)
    layer = ReplicatedLinear(40, 24, bias=True, quant_config=ONLINE, prefix="l")
    assert isinstance(layer.quant_method, Fp8LinearMethod)
    _load(layer, "weight", w)
    _load(layer, "bias", b)
    _finish(layer)
    assert layer.weight.dtype == FP8 and layer.weight_scale.shape == (24,)
    # Each row's largest entry maps to +-448 exactly; the round trip is within half an FP8 step.
    deq = layer.weight.float() * layer.weight_scale[:, None]
    assert torch.allclose(deq.abs().amax(1), w.abs().amax(1), rtol=1e-6)
    assert ((deq - w).abs() <= w.abs() * 2 ** -4 + 1e-6).all()
    ref = _quant_rows(x) @ deq.T + b
    assert _rel(layer(x), ref) < 1e-5


def test_per_tensor_static_merged_qkv_expands_scales_and_takes_the_max_input_scale():
    torch.manual_seed(1)
    # 4 query heads and 2 KV heads of 8: q 32 rows, k and v 16 each.
    layer = QKVParallelLinear(24, 8, 4, 2, quant_config=STATIC, prefix="attn.qkv_proj")
    parts, deq = {}, []
    for sid, rows in (("q", 32), ("k", 16), ("v", 16)):
        w = torch.randn(rows, 24) * (1 + "qkv".index(sid))
        q, s = _quant_tensor(w)
        _load(layer, "weight", q, sid)
        _load(layer, "weight_scale", s, sid)
        parts[sid] = s
        deq.append(q.float() * s)
    for sid, s_in in (("q", 0.02), ("k", 0.05), ("v", 0.03)):
        _load(layer, "input_scale", torch.tensor(s_in), sid)
    _finish(layer)
    assert torch.equal(layer.weight_scale, torch.cat([parts["q"].expand(32), parts["k"].expand(16),
                                                      parts["v"].expand(16)]))
    assert layer.input_scale.item() == pytest.approx(0.05)
    x = torch.randn(5, 24)
    ref = _quant_rows(x, static=float(torch.tensor(0.05))) @ torch.cat(deq).T
    assert _rel(layer(x), ref) < 1e-5


@pytest.mark.parametrize("shape", ["n", "n1"])
def test_per_channel_scales_dynamic_merged_gate_up(shape):
    torch.manual_seed(2)
    layer = MergedColumnParallelLinear(32, [16, 16], quant_config=DYNAMIC, prefix="mlp.gate_up_proj")
    deq = []
    for sid in (0, 1):
        w = torch.randn(16, 32)
        s = w.abs().amax(1) / 448.0
        q = (w / s[:, None]).to(FP8)
        _load(layer, "weight", q, sid)
        _load(layer, "weight_scale", s if shape == "n" else s[:, None], sid)
        deq.append(q.float() * s[:, None])
    _finish(layer)
    x = torch.randn(4, 32)
    assert _rel(layer(x), _quant_rows(x) @ torch.cat(deq).T) < 1e-5


@pytest.mark.parametrize("rows", [[32, 48], [24, 40]], ids=["aligned", "row_granular"])
def test_block_scales_merged_layer(rows):
    """Stacked projections on 16-row block boundaries keep block scales; off
    them each row keeps its block's scales (exact either way). K = 40 leaves a
    partial block column."""
    torch.manual_seed(3)
    layer = MergedColumnParallelLinear(40, rows, quant_config=BLOCK(), prefix="mlp.gate_up_proj")
    assert layer.quant_method.row_granular == (rows == [24, 40])
    deq = []
    for sid, n in enumerate(rows):
        w = torch.randn(n, 40)
        q, s = _quant_blocks(w, 16, 16)
        _load(layer, "weight", q, sid)
        _load(layer, "weight_scale_inv", s, sid)
        deq.append(dequant_fp8_block(q, s, (16, 16), torch.float32))
    _finish(layer)
    x = torch.randn(6, 40)
    assert _rel(layer(x), _quant_rows(x, group=16) @ torch.cat(deq).T) < 1e-5


def _column_rank_outputs(monkeypatch, rows, world, x, ws):
    outs = []
    for rank in range(world):
        layer = _on_rank(monkeypatch, rank, world,
                         lambda: MergedColumnParallelLinear(32, rows, quant_config=BLOCK(), prefix="gate_up"))
        for sid, (q, s) in enumerate(ws):
            _load(layer, "weight", q, sid)
            _load(layer, "weight_scale_inv", s, sid)
        outs.append(_finish(layer)(x))
    return outs


@pytest.mark.parametrize("rows", [[64, 64], [48, 48]], ids=["aligned", "off_blocks"])
def test_block_scales_column_parallel_shards(monkeypatch, rows):
    """tp 2: each rank's gate and up rows with their blocks' scales; with 24
    rows per rank (not a multiple of 16) the scales go row-granular."""
    torch.manual_seed(4)
    ws = [_quant_blocks(torch.randn(n, 32), 16, 16) for n in rows]
    x = torch.randn(3, 32)
    outs = _column_rank_outputs(monkeypatch, rows, 2, x, ws)
    xq = _quant_rows(x, group=16)
    for i, (q, s) in enumerate(ws):
        half = rows[i] // 2
        full = xq @ dequant_fp8_block(q, s, (16, 16), torch.float32).T
        start = sum(rows[:i]) // 2
        got = torch.cat([o[:, start:start + half] for o in outs], 1)
        assert _rel(got, full) < 1e-5


def test_block_scales_row_parallel_shards_and_misaligned_split(monkeypatch):
    torch.manual_seed(5)
    w = torch.randn(24, 64)
    q, s = _quant_blocks(w, 16, 16)
    x = torch.randn(3, 64)
    total = 0
    for rank in range(2):
        layer = _on_rank(monkeypatch, rank, 2,
                         lambda: RowParallelLinear(64, 24, quant_config=BLOCK(), prefix="o_proj", reduce_results=False))
        _load(layer, "weight", q)
        _load(layer, "weight_scale_inv", s)
        assert layer.weight_scale_inv.shape == (2, 2)
        total = total + _finish(layer)(x[:, rank * 32:(rank + 1) * 32])
    ref = _quant_rows(x, group=16) @ dequant_fp8_block(q, s, (16, 16), torch.float32).T
    assert _rel(total, ref) < 1e-5
    with pytest.raises(ValueError, match=r"o_proj \(fp8 block 16x16\).*not a multiple"):
        _on_rank(monkeypatch, 0, 4, lambda: RowParallelLinear(72, 24, quant_config=BLOCK(), prefix="o_proj"))


def test_per_tensor_scales_column_parallel_shards(monkeypatch):
    torch.manual_seed(6)
    ws = [_quant_tensor(torch.randn(16, 32) * (i + 1)) for i in range(2)]
    x = torch.randn(3, 32)
    for rank in range(2):
        layer = _on_rank(monkeypatch, rank, 2,
                         lambda: MergedColumnParallelLinear(32, [16, 16], quant_config=DYNAMIC, prefix="gate_up"))
        for sid, (q, s) in enumerate(ws):
            _load(layer, "weight", q, sid)
            _load(layer, "weight_scale", s, sid)
        _finish(layer)
        assert torch.equal(layer.weight_scale, torch.cat([ws[0][1].expand(8), ws[1][1].expand(8)]))
        mine = torch.cat([ws[i][0][rank * 8:(rank + 1) * 8].float() * ws[i][1] for i in range(2)])
        assert _rel(layer(x), _quant_rows(x) @ mine.T) < 1e-5


def test_dense_weight_layer_is_dequantized_once():
    """MLA's kv_b_proj (read directly by the absorbed decode) loads FP8 blocks
    and ends up as a dense weight in the model dtype."""
    torch.manual_seed(7)
    w = torch.randn(40, 24)
    q, s = _quant_blocks(w, 16, 16)
    layer = ReplicatedLinear(24, 40, quant_config=dense_weight(BLOCK()), prefix="attn.kv_b_proj")
    assert isinstance(layer.quant_method, Fp8DenseWeightMethod)
    _load(layer, "weight", q)
    _load(layer, "weight_scale_inv", s)
    _finish(layer)
    assert layer.weight.dtype == torch.float32 and not hasattr(layer, "weight_scale_inv")
    assert torch.equal(layer.weight, dequant_fp8_block(q, s, (16, 16), torch.float32))
    online = ReplicatedLinear(24, 40, quant_config=dense_weight(ONLINE), prefix="attn.kv_b_proj")
    assert type(online.quant_method).__name__ == "UnquantizedLinearMethod"


# ----------------------------------------------------------------- outliers
@pytest.mark.parametrize("config", [ONLINE, DYNAMIC, BLOCK()], ids=["online", "channel", "block"])
def test_outlier_activations_give_finite_outputs(config):
    torch.manual_seed(8)
    layer = ReplicatedLinear(32, 16, quant_config=config, prefix="l")
    w = torch.randn(16, 32)
    if config is ONLINE:
        _load(layer, "weight", w)
    elif config.weight_block_size:
        q, s = _quant_blocks(w, 16, 16)
        _load(layer, "weight", q)
        _load(layer, "weight_scale_inv", s)
    else:
        q, s = _quant_tensor(w)
        _load(layer, "weight", q)
        _load(layer, "weight_scale", s)
    _finish(layer)
    x = torch.randn(4, 32)
    x[0, 3], x[2, 17], x[3] = 1e4, -1e4, 0.0
    y = layer(x)
    assert torch.isfinite(y).all() and (y[3] == 0).all()
    assert torch.isfinite(layer.quant_method.apply_kernels(layer, x.to(torch.bfloat16).float())).all()


# ----------------------------------------------------------------- kernel path (Triton interpreter on CPU)
@pytest.mark.parametrize("config", [DYNAMIC, STATIC, BLOCK()], ids=["channel", "static", "block"])
@pytest.mark.parametrize("m", [3, 20])
def test_kernel_path_matches_reference(config, m):
    """``apply_kernels`` (the CUDA path) against the CPU path: M = 3 takes the
    W8A16 decode GEMV for bfloat16 inputs, M = 20 the W8A8 GEMM."""
    pytest.importorskip("triton")
    import tests.kernels.interpret  # noqa: F401  (faithful bfloat16 / FP8 in the interpreter)

    torch.manual_seed(9)
    layer = MergedColumnParallelLinear(64, [32, 16], bias=True, quant_config=config, prefix="l")
    deq = []
    for sid, n in enumerate([32, 16]):
        w = torch.randn(n, 64)
        if config.weight_block_size:
            q, s = _quant_blocks(w, 16, 16)
            _load(layer, "weight_scale_inv", s, sid)
            deq.append(dequant_fp8_block(q, s, (16, 16), torch.float32))
        else:
            q, s = _quant_tensor(w)
            _load(layer, "weight_scale", s, sid)
            deq.append(q.float() * s)
            if config.activation_scheme == "static":
                _load(layer, "input_scale", torch.tensor(0.01 * (sid + 1)), sid)
        _load(layer, "weight", q, sid)
    _load(layer, "bias", torch.randn(48))
    _finish(layer)
    x = torch.randn(m, 64)
    method = layer.quant_method
    if m <= 16:  # decode: bfloat16 activations, not quantized
        xb = x.to(torch.bfloat16)
        ours = method.apply_kernels(layer, xb, layer.bias)
        assert ours.dtype == torch.bfloat16
        w16 = xb.float() @ torch.cat(deq).T + layer.bias
        assert _rel(ours, w16) < 1e-2
        assert _rel(ours, method.apply_reference(layer, xb.float(), layer.bias)) < 6e-2
    else:
        ours = method.apply_kernels(layer, x, layer.bias)
        assert _rel(ours, method.apply_reference(layer, x, layer.bias)) < 1e-5


# ----------------------------------------------------------------- bad input
def test_bad_scale_shapes_name_the_tensor_and_scheme():
    layer = ReplicatedLinear(32, 16, quant_config=DYNAMIC, prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale \(fp8 per-tensor/per-channel"):
        _load(layer, "weight_scale", torch.ones(16, 2))
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale \(fp8 per-tensor/per-channel"):
        _load(layer, "weight_scale", torch.ones(15))
    with pytest.raises(ValueError, match=r"down_proj\.weight \(fp8 .*dtype torch.bfloat16"):
        _load(layer, "weight", torch.ones(16, 32, dtype=torch.bfloat16))
    block = ReplicatedLinear(32, 40, quant_config=BLOCK(), prefix="model.layers.0.mlp.down_proj")
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale_inv \(fp8 block 16x16\)"):
        _load(block, "weight_scale_inv", torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale_inv \(fp8 block 16x16\)"):
        _load(block, "weight_scale_inv", torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"down_proj\.weight_scale_inv \(fp8 block 16x16\)"):
        _load(block, "weight_scale_inv", torch.ones(6))


def test_registered_and_chosen_from_the_checkpoint_config():
    class Cfg:
        quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}

    cfg = get_quant_config(None, Cfg())
    assert isinstance(cfg, Fp8Config) and cfg.raw_checkpoint and cfg.weight_block_size == (128, 128)
    assert isinstance(get_quant_config("fp8", object()), Fp8Config)


# ----------------------------------------------------------------- decode fusion
@pytest.mark.parametrize("config", [ONLINE, BLOCK()], ids=["online", "block"])
def test_decode_fusion_swaps_in_the_swiglu_epilogue(config):
    """apply_decode_fusions gives a GatedMLP with an FP8 gate_up the GEMV's
    SwiGLU epilogue at decode row counts (Triton's interpreter here); larger
    steps keep the plain path."""
    pytest.importorskip("triton")
    import tests.kernels.interpret  # noqa: F401
    from ember.config import KernelConfig
    from ember.layers.fusion import apply_decode_fusions
    from ember.layers.mlp import GatedMLP
    from ember.layers.quantization.fp8_linear import Fp8SkinnyGatedMLP

    torch.manual_seed(10)
    model = torch.nn.Sequential(GatedMLP(32, 48, quant_config=config, prefix="mlp"))
    mlp = model[0]
    for sid in (0, 1):
        w = torch.randn(48, 32).bfloat16()
        if config is ONLINE:
            _load(mlp.gate_up_proj, "weight", w, sid)
        else:
            q, s = _quant_blocks(w.float(), 16, 16)
            _load(mlp.gate_up_proj, "weight", q, sid)
            _load(mlp.gate_up_proj, "weight_scale_inv", s, sid)
    wd = torch.randn(32, 48)
    if config is ONLINE:
        _load(mlp.down_proj, "weight", wd.bfloat16())
    else:
        q, s = _quant_blocks(wd, 16, 16)
        _load(mlp.down_proj, "weight", q)
        _load(mlp.down_proj, "weight_scale_inv", s)
    for m in (mlp.gate_up_proj, mlp.down_proj):
        _finish(m)
    x = torch.randn(3, 32).bfloat16()
    g = mlp.gate_up_proj
    h = g.quant_method.apply_kernels(g, x)
    gate = h[:, :48].float()
    expect = mlp.down_proj((gate / (1 + torch.exp(-gate))).bfloat16() * h[:, 48:])
    plain_big = mlp(torch.ones(20, 32).bfloat16())
    report = apply_decode_fusions(model, KernelConfig(), torch.device("cpu"), allow_interpreter=True)
    assert isinstance(model[0], Fp8SkinnyGatedMLP) and report.gated_mlps == 1
    torch.testing.assert_close(model[0](x), expect, rtol=0, atol=0)
    torch.testing.assert_close(model[0](torch.ones(20, 32).bfloat16()), plain_big, rtol=0, atol=0)


def test_dummy_weights_load_for_every_scheme():
    """``--load-format dummy`` fills every parameter with signed random
    values before process_weights_after_loading: each scheme still runs."""
    from ember.worker.common import fill_dummy as _fill_dummy

    gen = torch.Generator().manual_seed(0)
    for config in (ONLINE, STATIC, DYNAMIC, BLOCK()):
        layer = MergedColumnParallelLinear(32, [24, 24], quant_config=config, prefix="l")
        for p in layer.parameters():
            _fill_dummy(p.data, gen)
        y = _finish(layer)(torch.randn(3, 32))
        assert torch.isfinite(y).all() and y.shape == (3, 48)


@pytest.mark.parametrize("config", [STATIC, BLOCK(8, 16)], ids=["per_tensor", "block"])
def test_qkv_shards_with_replicated_kv_heads(monkeypatch, config):
    """tp 4 over 2 KV heads (each on two ranks): every rank's q rows and its
    KV head's rows come with their own scales."""
    torch.manual_seed(11)
    ws = {sid: torch.randn(rows, 32) for sid, rows in (("q", 32), ("k", 16), ("v", 16))}
    quant = {sid: (_quant_blocks(w, 8, 16) if config.weight_block_size else _quant_tensor(w)) for sid, w in ws.items()}
    deq = {sid: (dequant_fp8_block(q, s, (8, 16), torch.float32) if config.weight_block_size else q.float() * s)
           for sid, (q, s) in quant.items()}
    x = torch.randn(2, 32)
    for rank in range(4):
        layer = _on_rank(monkeypatch, rank, 4, lambda: QKVParallelLinear(32, 8, 4, 2, quant_config=config,
                                                                          prefix="attn.qkv_proj"))
        for sid, (q, s) in quant.items():
            _load(layer, "weight", q, sid)
            _load(layer, "weight_scale_inv" if config.weight_block_size else "weight_scale", s, sid)
            if not config.weight_block_size:
                _load(layer, "input_scale", torch.tensor(0.05), sid)
        _finish(layer)
        kv = rank // 2
        mine = torch.cat([deq["q"][rank * 8:(rank + 1) * 8], deq["k"][kv * 8:(kv + 1) * 8],
                          deq["v"][kv * 8:(kv + 1) * 8]])
        xq = _quant_rows(x, static=0.05) if not config.weight_block_size else _quant_rows(x, group=16)
        assert _rel(layer(x), xq @ mine.T) < 1e-5, f"rank {rank}"


# ----------------------------------------------------------------- block-scaled cuBLAS GEMM (GPU)
@pytest.mark.gpu
@pytest.mark.parametrize("m", [17, 130, 1021])
@pytest.mark.parametrize("n,k", [(1536, 7168), (7168, 2048), (24576, 1536)])
def test_block_scaled_mm_matches_float32(m, n, k):
    """cuBLASLt's block-scaled FP8 GEMM (DeepSeek-V3 shapes, row counts that
    are not multiples of 4) against float32 on the same quantized
    activations and weights; the layer's prefill path takes it on Hopper."""
    from ember.layers.quantization import fp8_linear
    from ember.kernels.triton_fp8 import quant_fp8_per_token_group
    from tests.layers.quantization.fp8_ref import quantize_blocks

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the block-scaled cuBLASLt GEMM is a Hopper path")
    g = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(1, n, k, device="cuda", generator=g) * 0.05
    q, s = quantize_blocks(w, 128, 128)
    q, s = q[0], s[0].contiguous()
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    x[0, 5] = 1e4  # an outlier: its 1 x 128 group gets its own scale
    assert fp8_linear._block_scaled_mm_ok(x, q, 128, 128), "this build has no block-scaled _scaled_mm"
    qa, sa = quant_fp8_per_token_group(x, 128)
    y = fp8_linear.block_scaled_mm(qa, sa, q, s, torch.bfloat16)
    ref = (qa.float() * sa.repeat_interleave(128, 1)) @ (q.float() * s.repeat_interleave(128, 0)
                                                         .repeat_interleave(128, 1)).T
    assert y.shape == (m, n) and torch.isfinite(y.float()).all()
    assert _rel(y, ref) < 1e-2
