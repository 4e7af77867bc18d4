"""W4A16 layers (AWQ, GPTQ, compressed-tensors pack-quantized int4): the
weights Ember multiplies by are bit-identical to an independent reference
unpacker written here from each format's documented layout (and to the
compressed-tensors library's own decompress), matmuls match float32 products
of those weights, tensor-parallel shards put back together give the full
layer, tiny random Llamas written as AWQ / GPTQ checkpoints generate HF
transformers' greedy tokens on the dequantized weights, and malformed
checkpoints fail naming the tensor and the scheme."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ember.distributed import parallel_state
from ember.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                                 ReplicatedLinear, RowParallelLinear)
from ember.layers.quantization import QuantizationConfig, get_quant_config
from ember.layers.quantization.w4a16 import (AWQConfig, GPTQConfig, PackQuantizedW4A16Method,
                                             W4A16LinearMethod)
from tests.layers.quantization.w4a16_checkpoints import (_pack_cols, _pack_rows, _quantize, act_order_permutation,
                                                         write_awq_checkpoint, write_gptq_checkpoint)
from tests.layers.test_linear import _LocalWorld

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ------------------------------------------------ independent references
def _nibble(word: torch.Tensor, i: int) -> torch.Tensor:
    """Bits 4i .. 4i + 3 of int32 words, as int64 0..15."""
    return (word.to(torch.int64) >> (4 * i)) & 0xF


def awq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """AWQ GEMM -> W [N, K] float32: nibble i of word c is column 8c + AWQ_ORDER[i]."""
    k, n = qweight.shape[0], qweight.shape[1] * 8
    q = torch.empty(k, n, dtype=torch.int64)
    z = torch.empty(qzeros.shape[0], n, dtype=torch.int64)
    for i in range(8):
        q[:, AWQ_ORDER[i]::8] = _nibble(qweight, i)
        z[:, AWQ_ORDER[i]::8] = _nibble(qzeros, i)
    g = torch.arange(k) // (k // scales.shape[0])
    return ((q - z[g]).float() * scales.float()[g]).t()


def gptq_reference(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   g_idx: torch.Tensor) -> torch.Tensor:
    """GPTQ v1 -> W [N, K] float32: nibble i of qweight row r is row 8r + i;
    zero = nibble + 1; row k uses group g_idx[k]."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    q = torch.empty(k, n, dtype=torch.int64)
    z = torch.empty(qzeros.shape[0], n, dtype=torch.int64)
    for i in range(8):
        q[i::8] = _nibble(qweight, i)
        z[:, i::8] = _nibble(qzeros, i) + 1
    g = g_idx.long()
    return ((q - z[g]).float() * scales.float()[g]).t()


def _layer(config, build=lambda qc: ReplicatedLinear(256, 96, quant_config=qc, prefix="model.layers.0.mlp.proj")):
    layer = build(config)
    return layer


def _load(layer, tensors: dict[str, torch.Tensor], shard_id=None) -> None:
    for name, t in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, t, shard_id) if shard_id is not None else param.weight_loader(param, t)


def _finish(layer) -> W4A16LinearMethod:
    layer.quant_method.process_weights_after_loading(layer)
    return layer.quant_method


def _awq_tensors(w: torch.Tensor, group: int) -> dict[str, torch.Tensor]:
    q, z, s = _quantize(w, group, symmetric=False)
    return {"qweight": _pack_cols(q, AWQ_ORDER), "qzeros": _pack_cols(z, AWQ_ORDER), "scales": s}


def _gptq_tensors(w: torch.Tensor, group: int, sym: bool, act_order: bool) -> dict[str, torch.Tensor]:
    k = w.shape[1]
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = torch.empty(k, dtype=torch.int64)
        g_idx[act_order_permutation(k)] = torch.arange(k) // group
    q, z, s = _quantize(w, group, symmetric=sym, min_zero=1, g_idx=g_idx)
    return {"qweight": _pack_rows(q), "qzeros": _pack_cols(z - 1), "scales": s, "g_idx": g_idx.to(torch.int32)}


def _check_product(layer, w_ref: torch.Tensor) -> None:
    x = torch.randn(5, w_ref.shape[1])
    x[0, 3] = 1e4  # an outlier stays finite
    y = layer(x)
    ref = x @ w_ref.t()
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ------------------------------------------------------------- layers
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_awq_weights_are_bit_identical_to_the_reference(group):
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    t = _awq_tensors(w, 256 if group == -1 else group)
    layer = _layer(AWQConfig(group))
    _load(layer, t)
    method = _finish(layer)
    ours = method.dequantized_weight(layer)
    assert torch.equal(ours, awq_reference(t["qweight"], t["qzeros"], t["scales"]))
    assert (ours - w).abs().max() < 0.05  # a quantization of w, not noise
    _check_product(layer, ours)


@pytest.mark.parametrize("sym,act_order", [(True, False), (False, False), (True, True), (False, True)])
def test_gptq_weights_are_bit_identical_to_the_reference(sym, act_order):
    torch.manual_seed(1)
    w = torch.randn(96, 256) * 0.05
    t = _gptq_tensors(w, 64, sym, act_order)
    layer = _layer(GPTQConfig(64, desc_act=act_order, sym=sym))
    _load(layer, t)
    method = _finish(layer)
    ours = method.dequantized_weight(layer)
    assert torch.equal(ours, gptq_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]))
    assert (layer.w4_perm is not None) == act_order
    assert (layer.w4_zeros is None) == sym  # symmetric: the fixed zero point, no zeros stored
    _check_product(layer, ours)


def test_gptq_zero_point_sixteen_of_the_v1_offset():
    """A v1 zero nibble 15 means zero point 16 (nibble + 1, not wrapped)."""
    torch.manual_seed(2)
    t = _gptq_tensors(torch.randn(16, 64) * 0.05, 32, sym=False, act_order=False)
    t["qzeros"][:] = -1  # every nibble 15
    layer = _layer(GPTQConfig(32, sym=False), lambda qc: ReplicatedLinear(64, 16, quant_config=qc, prefix="p"))
    _load(layer, t)
    ours = _finish(layer).dequantized_weight(layer)
    assert torch.equal(ours, gptq_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"]))


def _ct_scheme(group: int | None, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric,
                            strategy="group" if group else "channel", group_size=group)
    return QuantizationScheme(targets=["Linear"], weights=args)


def _ct_compress(w: torch.Tensor, group: int | None, symmetric: bool, dtype: torch.dtype):
    """compressed-tensors' own compress of ``w`` [N, K] with round-to-nearest qparams."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    n, k = w.shape
    g = group or k
    wg = w.float().view(n, k // g, g)
    if symmetric:
        scale = wg.abs().amax(-1) / 7.5
        zp = torch.zeros_like(scale, dtype=torch.int8)
    else:
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / 15
        zp = (torch.round(-lo / scale) - 8).clamp(-8, 7).to(torch.int8)
    scheme = _ct_scheme(group, symmetric)
    state = {"weight": w.to(dtype), "weight_scale": scale.to(dtype)}
    if not symmetric:
        state["weight_zero_point"] = zp
    return PackedQuantizationCompressor.compress(state, scheme), scheme


@pytest.mark.parametrize("group,symmetric", [(64, True), (64, False), (128, False), (None, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_quantized_weights_equal_the_library_decompress(group, symmetric, dtype):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    torch.manual_seed(3)
    w = torch.randn(96, 256) * 0.05
    compressed, scheme = _ct_compress(w, group, symmetric, dtype)
    assert compressed["weight_packed"].shape == (96, 32) and compressed["weight_packed"].dtype == torch.int32
    layer = ReplicatedLinear(256, 96, prefix="p", quant_config=None)
    method = PackQuantizedW4A16Method(group, symmetric, None)
    layer.quant_method = method
    for name in [n for n, _ in layer.named_parameters() if n != "bias"]:
        delattr(layer, name)
    method.create_weights(layer, 256, [96], 256, 96, dtype)
    _load(layer, {k: v for k, v in compressed.items()})
    _finish(layer)
    assert layer.w4_scales.dtype == dtype
    ref = PackedQuantizationCompressor.decompress(compressed, scheme)["weight"]
    ours = method.dequantized_weight(layer)
    assert torch.equal(ours.to(ref.dtype), ref)
    _check_product(layer, ours)


def test_pack_quantized_act_order_groups():
    """``actorder: "group"``: row k uses scale column ``weight_g_idx[k]``."""
    torch.manual_seed(4)
    n, k, g = 32, 128, 32
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = torch.rand(n, k // g).to(torch.bfloat16) * 0.01
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[act_order_permutation(k)] = torch.arange(k) // g
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    layer = ReplicatedLinear(k, n, prefix="p")
    method = PackQuantizedW4A16Method(g, True, "group")
    layer.quant_method = method
    del layer.weight
    method.create_weights(layer, k, [n], k, n, torch.bfloat16)
    _load(layer, {"weight_packed": pack_to_int32(q, 4), "weight_scale": scale,
                  "weight_shape": torch.tensor([n, k]), "weight_g_idx": g_idx.to(torch.int32)})
    _finish(layer)
    ref = q.float() * scale.float()[:, g_idx]
    assert torch.equal(method.dequantized_weight(layer), ref)


def test_merged_qkv_loads_each_shard_into_its_columns():
    torch.manual_seed(5)
    parts = {"q": torch.randn(64, 128) * 0.05, "k": torch.randn(32, 128) * 0.05, "v": torch.randn(32, 128) * 0.05}
    layer = QKVParallelLinear(128, 16, 4, 2, quant_config=AWQConfig(64), prefix="model.layers.0.self_attn.qkv_proj")
    refs = []
    for sid, w in parts.items():
        t = _awq_tensors(w, 64)
        _load(layer, t, sid)
        refs.append(awq_reference(t["qweight"], t["qzeros"], t["scales"]))
    method = _finish(layer)
    assert torch.equal(method.dequantized_weight(layer), torch.cat(refs))


class _PackQuantizedConfig(QuantizationConfig):
    """Every linear layer as compressed-tensors pack-quantized int4 (what CompressedTensorsConfig picks)."""

    raw_checkpoint = True

    def __init__(self, group: int, symmetric: bool) -> None:
        self.group, self.symmetric = group, symmetric

    @classmethod
    def get_name(cls) -> str:
        return "test-pack-quantized"

    @classmethod
    def from_config(cls, config):
        raise NotImplementedError

    def get_quant_method(self, layer, prefix):
        return PackQuantizedW4A16Method(self.group, self.symmetric, None)


@pytest.mark.parametrize("scheme", ["awq", "gptq", "gptq_act_order", "pack_quantized"])
def test_tensor_parallel_shards_give_the_full_layer(monkeypatch, scheme):
    """Column shards are the full weight's rows; row shards' products sum to the full product."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    torch.manual_seed(6)
    n, k, g = 64, 256, 32
    w = torch.randn(n, k) * 0.05
    if scheme == "pack_quantized":
        t, ct_scheme = _ct_compress(w, g, False, torch.bfloat16)
        make_config = lambda: _PackQuantizedConfig(g, False)  # noqa: E731
        # Exact in float32 (decompress rounds to the scales' bfloat16): the library's unpack.
        q = unpack_from_int32(t["weight_packed"], 4, torch.Size([n, k])).float()
        zp = unpack_from_int32(t["weight_zero_point"], 4, torch.Size([n, k // g]), packed_dim=0).float()
        full = ((q.view(n, k // g, g) - zp[..., None]) * t["weight_scale"].float()[..., None]).view(n, k)
        assert torch.equal(full.to(torch.bfloat16), PackedQuantizationCompressor.decompress(t, ct_scheme)["weight"])
    elif scheme == "awq":
        t, make_config = _awq_tensors(w, g), lambda: AWQConfig(g)
        full = awq_reference(t["qweight"], t["qzeros"], t["scales"])
    else:
        act = scheme == "gptq_act_order"
        t, make_config = _gptq_tensors(w, g, sym=False, act_order=act), lambda: GPTQConfig(g, desc_act=act, sym=False)
        full = gptq_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    x = torch.randn(3, k)
    partial = torch.zeros(3, n)
    for rank in range(2):
        monkeypatch.setattr(parallel_state, "_TP", _LocalWorld(rank, 2, group=object()))
        col = ColumnParallelLinear(k, n, quant_config=make_config(), prefix="col")
        _load(col, t)
        assert torch.equal(_finish(col).dequantized_weight(col), full[rank * n // 2:(rank + 1) * n // 2])
        row = RowParallelLinear(k, n, quant_config=make_config(), prefix="row", reduce_results=False)
        _load(row, t)
        assert torch.equal(_finish(row).dequantized_weight(row), full[:, rank * k // 2:(rank + 1) * k // 2])
        partial += row(x[:, rank * k // 2:(rank + 1) * k // 2])
    torch.testing.assert_close(partial, x @ full.t(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------- bad input
@pytest.mark.parametrize("config,message", [
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "zero_point": True, "version": "gemm"}, "awq: bits 8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemv"},
     "awq: version 'gemv'"),
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "gptq: bits 8"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
     "gptq: checkpoint_format 'marlin'"),
])
def test_unsupported_schemes_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        get_quant_config(None, LlamaConfig(quantization_config=config))


def test_shapes_that_disagree_name_the_tensor_and_scheme():
    t = _awq_tensors(torch.randn(96, 256), 64)
    layer = _layer(AWQConfig(64))
    with pytest.raises(ValueError, match=r"awq: model\.layers\.0\.mlp\.proj\.scales: shape \(4, 48\)"):
        _load(layer, {"scales": t["scales"][:, :48]})
    with pytest.raises(ValueError, match=r"awq: model\.layers\.0\.mlp\.proj\.qweight: dtype torch\.float16"):
        _load(layer, {"qweight": t["qweight"].half()})
    layer = _layer(GPTQConfig(64))
    with pytest.raises(ValueError, match=r"gptq: model\.layers\.0\.mlp\.proj\.qzeros: shape \(2, 12\)"):
        _load(layer, {"qzeros": _pack_cols(torch.zeros(2, 96, dtype=torch.int64))})


def test_a_missing_tensor_is_named_with_the_scheme():
    t = _gptq_tensors(torch.randn(96, 256) * 0.05, 64, sym=True, act_order=False)
    layer = _layer(GPTQConfig(64))
    _load(layer, {k: v for k, v in t.items() if k != "scales"})
    with pytest.raises(ValueError, match=r"gptq: model\.layers\.0\.mlp\.proj: checkpoint lacks scales"):
        _finish(layer)
    layer = MergedColumnParallelLinear(128, [64, 64], quant_config=AWQConfig(64), prefix="mlp.gate_up_proj")
    t = _awq_tensors(torch.randn(64, 128), 64)
    _load(layer, t, 0)
    _load(layer, {k: v for k, v in t.items() if k != "qzeros"}, 1)
    with pytest.raises(ValueError, match=r"awq: mlp\.gate_up_proj: checkpoint lacks qzeros of shard 1"):
        _finish(layer)


def test_tp_that_splits_a_group_is_refused(monkeypatch):
    monkeypatch.setattr(parallel_state, "_TP", _LocalWorld(0, 2, group=object()))
    with pytest.raises(ValueError, match="awq: row: this rank's 128 input features split groups of 256"):
        RowParallelLinear(256, 64, quant_config=AWQConfig(256), prefix="row")


# ------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         initializer_range=0.1, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    return LlamaForCausalLM(config).eval()


def _dequantized_hf(hf: LlamaForCausalLM, path) -> LlamaForCausalLM:
    """HF float32 with every quantized projection replaced by the reference dequantization of the file."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "model.safetensors"))
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    ref = LlamaForCausalLM(hf.config).eval()
    state = hf.state_dict()
    for name in list(state):
        prefix = name[: -len(".weight")]
        if f"{prefix}.qweight" in tensors:
            t = {s: tensors[f"{prefix}.{s}"] for s in ("qweight", "qzeros", "scales")}
            state[name] = (awq_reference(**t) if quant["quant_method"] == "awq"
                           else gptq_reference(**t, g_idx=tensors[f"{prefix}.g_idx"]))
    ref.load_state_dict(state)
    return ref


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["awq", "gptq_sym", "gptq_asym_act_order"])
def test_tiny_llama_checkpoint_generates_hf_greedy_tokens(tiny_llama, tmp_path, fmt):
    from ember import SamplingParams
    from tests.models.tiny import ember_llm, hf_greedy, make_prompts, make_tokenizer, one_thread, runner_of

    hf = tiny_llama
    weights = {n: t.detach().clone() for n, t in hf.state_dict().items()}
    if fmt == "awq":
        write_awq_checkpoint(weights, hf.config, tmp_path, group_size=64)
    else:
        write_gptq_checkpoint(weights, hf.config, tmp_path, group_size=64, desc_act=fmt.endswith("act_order"),
                              sym=fmt == "gptq_sym")
    make_tokenizer().save_pretrained(tmp_path)
    ref = _dequantized_hf(hf, tmp_path)
    prompts = make_prompts()[:3]
    with one_thread():
        refs = [hf_greedy(ref, p, 8) for p in prompts]
        llm = ember_llm(str(tmp_path))
        linears = [m for m in runner_of(llm).model.modules()
                   if isinstance(getattr(m, "quant_method", None), W4A16LinearMethod)]
        outs = llm.generate([list(p) for p in prompts], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
    assert len(linears) == 8  # qkv, o, gate_up, down of both layers
    for i, (out, r) in enumerate(zip(outs, refs)):
        assert out.outputs[0].token_ids == r, f"prompt {i} diverged"


@pytest.mark.slow
def test_dummy_awq_model_runs(tiny_llama, tmp_path):
    """``--load-format dummy --quantization awq``: random packs and scales make a runnable model."""
    from ember import SamplingParams
    from tests.models.tiny import ember_llm, one_thread, save_tiny

    save_tiny(tiny_llama, tmp_path)  # an unquantized checkpoint: dummy weights ignore it
    with one_thread():
        llm = ember_llm(str(tmp_path), load_format="dummy", quantization="awq")
        out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_gptq_v2_zero_points_are_stored_as_they_are():
    torch.manual_seed(7)
    t = _gptq_tensors(torch.randn(32, 128) * 0.05, 64, sym=False, act_order=False)
    config = get_quant_config(None, LlamaConfig(quantization_config={
        "quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2"}))
    layer = _layer(config, lambda qc: ReplicatedLinear(128, 32, quant_config=qc, prefix="p"))
    _load(layer, t)
    ours = _finish(layer).dequantized_weight(layer)
    # v2 stores z itself, one less than v1 reads from the same nibble: W_v2 = W_v1 + s (exact).
    v1 = gptq_reference(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])
    assert torch.equal(ours, v1 + t["scales"].float()[t["g_idx"].long()].t())


def test_checkpoint_configs_pick_the_methods():
    awq = get_quant_config(None, LlamaConfig(quantization_config={
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "GEMM",
        "modules_to_not_convert": ["mlp.down_proj"]}))
    assert isinstance(awq, AWQConfig) and awq.raw_checkpoint and awq.group_size == 64
    assert awq.get_quant_method(ReplicatedLinear(64, 8), "model.layers.0.mlp.down_proj") is None
    gptq = get_quant_config("gptq", LlamaConfig())  # --quantization gptq on a preset: the defaults
    assert isinstance(gptq, GPTQConfig) and (gptq.group_size, gptq.desc_act, gptq.sym) == (128, False, True)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["awq", "gptq_asym_act_order"])
def test_tiny_llama_on_cuda_runs_the_kernels(tiny_llama, tmp_path, fmt):
    """float16 on CUDA (the Triton kernels: one-row and split-K decode, 64-row
    prefill tiles): prompt logits near HF float32 on the dequantized weights,
    and the same greedy tokens with and without CUDA graphs (the split-K
    reduction is deterministic)."""
    from ember import LLM, SamplingParams
    from tests.models.tiny import hf_prefill_logits, make_prompts, relative_error, runner_of

    hf = tiny_llama
    weights = {n: t.detach().clone() for n, t in hf.state_dict().items()}
    if fmt == "awq":
        write_awq_checkpoint(weights, hf.config, tmp_path, group_size=64)
    else:
        write_gptq_checkpoint(weights, hf.config, tmp_path, group_size=64, desc_act=True, sym=False)
    ref = _dequantized_hf(hf, tmp_path)
    prompts = make_prompts()
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    tokens = []
    for eager in (False, True):
        llm = LLM(str(tmp_path), device="cuda", dtype="float16", skip_tokenizer_init=True, max_model_len=128,
                  kv_cache_memory=16 << 20, enforce_eager=eager)
        if not eager:
            for p in prompts:
                ours = runner_of(llm).compute_prompt_logits(p).float().cpu()
                assert relative_error(ours, hf_prefill_logits(ref, p)) < 2e-2
        tokens.append([o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompts], params,
                                                                     use_tqdm=False)])
        del llm
    assert tokens[0] == tokens[1]
