"""The ``gguf`` quantization method: GGUF blocks kept as stored.

- Ember's PyTorch dequantization is bit-identical to gguf-py's
  ``gguf.quants.dequantize`` for every supported type: on random data that
  gguf-py's own ``gguf.quants.quantize`` wrote (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0),
  on rows of the bundled Qwen2.5-Coder file (Q4_K, Q6_K, Q5_0, Q8_0), and on
  random bytes with finite scales for Q5_K (gguf-py cannot quantize k-quants,
  and no bundled file holds Q5_K).
- The loader keeps exactly the supported weights as blocks (llama q/k rows
  un-permuted as whole block rows) and merged layers of mixed types run one
  product per projection.
- Both bundled models through ``LLM(..., quantization="gguf")`` on CPU
  (float32): greedy tokens equal the dequantized path's, and the weights take
  the file's tensor bytes.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as GT
from gguf.quants import dequantize, quantize

from ember.layers.quantization import get_quant_config
from ember.layers.quantization.gguf import GGUF_BLOCK_SIZES, GGUFConfig, GGUFLinearMethod, dequantize_gguf
from ember.loader.gguf import gguf_weight_types, iter_gguf_weights, read_gguf

QUANTIZABLE = [GT.Q4_0, GT.Q4_1, GT.Q5_0, GT.Q5_1, GT.Q8_0]


def _bit_equal(ours: torch.Tensor, ref: np.ndarray) -> bool:
    return ours.dtype == torch.float32 and np.array_equal(ours.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_dequantize_bit_identical_to_gguf_py_on_its_own_quantization(qtype) -> None:
    rng = np.random.default_rng(int(qtype))
    data = (rng.standard_normal((16, 512)) * rng.uniform(0.01, 10, (16, 1))).astype(np.float32)
    data[3, :64] = 0.0  # an all-zero block (d = 0)
    data[5, 7] = 1e4  # an outlier
    blocks = quantize(data, qtype)
    assert blocks.shape == (16, 512 // GGUF_BLOCK_SIZES[qtype][0] * GGUF_BLOCK_SIZES[qtype][1])
    ours = dequantize_gguf(torch.from_numpy(blocks), qtype)
    assert ours.shape == (16, 512)
    assert _bit_equal(ours, dequantize(blocks, qtype))


def _file_rows(path: str, qtype: GT, rows: int = 8) -> np.ndarray:
    tensor = next(t for t in read_gguf(path).tensors.values() if t.tensor_type == qtype)
    return np.array(tensor.data[:rows])


@pytest.mark.parametrize("qtype", [GT.Q4_K, GT.Q6_K, GT.Q5_0, GT.Q8_0], ids=lambda t: t.name)
def test_dequantize_bit_identical_to_gguf_py_on_bundled_file(qwen_path, qtype) -> None:
    blocks = _file_rows(qwen_path, qtype)
    assert _bit_equal(dequantize_gguf(torch.from_numpy(blocks), qtype), dequantize(blocks, qtype))


def test_dequantize_q4_1_bit_identical_on_bundled_file(smollm2_path) -> None:
    blocks = _file_rows(smollm2_path, GT.Q4_1)
    assert _bit_equal(dequantize_gguf(torch.from_numpy(blocks), GT.Q4_1), dequantize(blocks, GT.Q4_1))


def test_dequantize_q5_k_bit_identical_on_random_bytes() -> None:
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (8, 4, 176), dtype=np.uint8)
    scales = rng.uniform(-0.05, 0.05, (8, 4, 2)).astype(np.float16)  # d and dmin finite
    blocks[:, :, 0:4] = scales.view(np.uint8).reshape(8, 4, 4)
    blocks = blocks.reshape(8, -1)
    assert _bit_equal(dequantize_gguf(torch.from_numpy(blocks), GT.Q5_K), dequantize(blocks, GT.Q5_K))


def test_dequantize_rejects_unsupported_types_and_partial_blocks() -> None:
    with pytest.raises(ValueError, match="IQ4_NL"):
        dequantize_gguf(torch.zeros(2, 18, dtype=torch.uint8), GT.IQ4_NL)
    with pytest.raises(ValueError, match="34 bytes"):
        dequantize_gguf(torch.zeros(2, 35, dtype=torch.uint8), GT.Q8_0)


def _fake_gguf(types: dict[str, GT]) -> SimpleNamespace:
    tensors = {name: SimpleNamespace(name=name, shape=np.array([64, 32]), tensor_type=t) for name, t in types.items()}
    return SimpleNamespace(tensors=tensors)


def test_weight_types_keep_merged_projections_only_all_together() -> None:
    gf = _fake_gguf({
        "token_embd.weight": GT.Q8_0,
        "blk.0.attn_q.weight": GT.Q5_0, "blk.0.attn_k.weight": GT.Q5_0, "blk.0.attn_v.weight": GT.Q8_0,
        "blk.0.ffn_gate.weight": GT.Q4_K, "blk.0.ffn_up.weight": GT.IQ4_NL,  # no kernel: gate_up stays dense
        "blk.0.ffn_down.weight": GT.Q6_K, "blk.0.attn_output.weight": GT.F16,
    })
    kept = gguf_weight_types(gf)
    assert kept == {
        "model.embed_tokens.weight": GT.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": GT.Q5_0, "model.layers.0.self_attn.k_proj.weight": GT.Q5_0,
        "model.layers.0.self_attn.v_proj.weight": GT.Q8_0, "model.layers.0.mlp.down_proj.weight": GT.Q6_K,
    }
    config = GGUFConfig(kept)
    assert config._types_of("model.layers.0.self_attn.qkv_proj") == [GT.Q5_0, GT.Q5_0, GT.Q8_0]
    assert config._types_of("model.layers.0.mlp.gate_up_proj") is None
    assert config._types_of("model.layers.0.self_attn.o_proj") is None
    assert config._types_of("lm_head") is None
    assert GGUFConfig(kept, tie_word_embeddings=True)._types_of("lm_head") == [GT.Q8_0]


def test_gguf_needs_a_gguf_file() -> None:
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="GGUF files only"):
        get_quant_config("gguf", LlamaConfig())


def test_loader_keeps_blocks_and_unpermutes_llama_rows(smollm2_path) -> None:
    """SmolLM2 (llama): q/k are stored with llama.cpp's rope row permutation;
    the blocks come un-permuted, so they dequantize to the dense path's rows."""
    names = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
             "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight", "model.norm.weight"}
    raw = {n: t for n, t in iter_gguf_weights(smollm2_path, torch.float32, keep_quantized=True) if n in names}
    dense = {n: t for n, t in iter_gguf_weights(smollm2_path, torch.float32) if n in names}
    types = gguf_weight_types(read_gguf(smollm2_path))
    assert raw["model.norm.weight"].dtype == torch.float32  # F32: not a kernel type
    for name in names - {"model.norm.weight"}:
        assert raw[name].dtype == torch.uint8, name
        assert torch.equal(dequantize_gguf(raw[name], types[name]), dense[name]), name


def _generate(path: str, quantization: str | None, prompts: list[list[int]], max_tokens: int):
    from ember import LLM, SamplingParams

    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory=32 << 20, quantization=quantization)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    tokens = [o.outputs[0].token_ids for o in llm.generate([list(p) for p in prompts], params, use_tqdm=False)]
    model = llm.llm_engine.engine_core.executor.worker.model_runner.model
    return tokens, model


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())  # shared (tied) tensors once


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_bundled_model_runs_quantized_like_the_dequantized_path(which, smollm2_path, qwen_path,
                                                                one_torch_thread) -> None:
    path = smollm2_path if which == "smollm2" else qwen_path
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 22, 23, 24, 25, 26, 27, 28]]
    ours, model = _generate(path, "gguf", prompts, 3)
    methods = [m.quant_method for m in model.modules() if isinstance(getattr(m, "quant_method", None),
                                                                       GGUFLinearMethod)]
    # 7 projections in 4 layers per decoder layer, the embedding and the LM head.
    assert len(methods) == 4 * model.config.num_hidden_layers + 2
    if which == "qwen":  # half the layers store v in Q8_0, q and k in Q5_0: one product per projection
        assert any(not m.uniform for m in methods)
    file_bytes = sum(int(t.n_bytes) for t in read_gguf(path).tensors.values())
    assert _weight_bytes(model) == file_bytes
    del model
    ref, model = _generate(path, None, prompts, 3)
    assert _weight_bytes(model) > 3 * file_bytes
    assert ours == ref


@pytest.mark.parametrize("asked, resolved", [(None, None), ("gguf", "gguf"), ("none", None)])
def test_cpu_keeps_the_dequantized_path_unless_asked(smollm2_path, asked, resolved) -> None:
    from ember.engine.arg_utils import EngineArgs

    config = EngineArgs(model=smollm2_path, device="cpu", quantization=asked).create_engine_config()
    assert config.model_config.quantization == resolved
    assert config.model_config.hf_config.gguf_weight_types["model.embed_tokens.weight"] == GT.Q8_0


def _joined_file(pattern: str) -> str | None:
    """A bundled GGUF file joined by benchmarks/gpu/gguf_carry.py on a GPU
    machine (which has no package index to fetch the bundled models)."""
    import glob

    found = sorted(glob.glob(f"/tmp/ember-gguf/{pattern}"))
    return found[0] if found else None


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", ["SmolLM2-135M-Instruct*.gguf", "Qwen2.5-Coder-0.5B-Instruct*.gguf"])
def test_bundled_model_on_cuda_runs_quantized_by_default(pattern) -> None:
    """On CUDA a GGUF file runs quantized unless told otherwise; in float32 its
    greedy tokens equal the dequantized path's."""
    from ember import LLM, SamplingParams

    path = _joined_file(pattern)
    if path is None:
        pytest.skip("the GGUF file is not in /tmp/ember-gguf (benchmarks/gpu/gguf_carry.py join)")
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 22, 23, 24, 25, 26, 27, 28]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for quantization in (None, "none"):
        llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory=256 << 20, quantization=quantization,
                  skip_tokenizer_init=True, max_num_seqs=4, piecewise_cuda_graphs=False)
        runner = llm.llm_engine.engine_core.executor.worker.model_runner
        assert runner.model_config.quantization == ("gguf" if quantization is None else None)
        tokens[quantization] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm, runner
        torch.cuda.empty_cache()
    assert tokens[None] == tokens["none"]


@pytest.mark.gpu
def test_bundled_qwen_on_two_cuda_ranks_runs_like_one(capfd) -> None:
    """Qwen2.5-Coder-0.5B kept quantized over two GPUs (tensor parallel):
    each rank reads about half of the file's tensor data (its log line), and
    float32 greedy tokens equal one GPU's."""
    import re

    from ember import LLM, SamplingParams

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    path = _joined_file("Qwen2.5-Coder-0.5B-Instruct*.gguf")
    if path is None:
        pytest.skip("the GGUF file is not in /tmp/ember-gguf (benchmarks/gpu/gguf_carry.py join)")
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 22, 23, 24, 25, 26, 27, 28]]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    tokens = {}
    for tp in (1, 2):
        capfd.readouterr()
        llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory=256 << 20, skip_tokenizer_init=True,
                  max_num_seqs=4, piecewise_cuda_graphs=False, tensor_parallel_size=tp)
        try:
            tokens[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.llm_engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    reads = re.findall(r"read ([\d.]+) of ([\d.]+) MiB of tensor data", capfd.readouterr().err)
    assert len(reads) == 2 and all(0.45 < float(a) / float(b) < 0.55 for a, b in reads), reads
    assert tokens[2] == tokens[1]


@pytest.mark.parametrize("qtype, k, split_blocks", [(GT.Q5_0, 896, True), (GT.Q4_K, 4864, False)],
                         ids=["Q5_0-blocks-split", "Q4_K-dequantized-at-load"])
def test_row_parallel_rank_holds_its_blocks_or_dequantizes_them(monkeypatch, qtype, k, split_blocks) -> None:
    """Rank 1 of 2 of a row-parallel layer: 448 inputs of Q5_0 are 14 whole
    blocks (kept as blocks, narrowed by bytes); 2432 inputs of Q4_K are 9.5
    super-blocks (dequantized at load, narrowed as a dense weight). Either way
    the rank's weight is its half of the dequantized checkpoint."""
    import ember.layers.linear as linear
    from ember.layers.quantization.gguf import GGUFDequantizeAtLoadMethod

    monkeypatch.setattr(linear, "get_tp_size", lambda: 2)
    monkeypatch.setattr(linear, "get_tp_rank", lambda: 1)
    prefix = "model.layers.0.mlp.down_proj"
    layer = linear.RowParallelLinear(k, 64, quant_config=GGUFConfig({f"{prefix}.weight": qtype}), prefix=prefix)
    data = np.random.default_rng(0).standard_normal((64, k)).astype(np.float32)
    if qtype == GT.Q4_K:  # gguf-py cannot quantize k-quants: random bytes, d and dmin 0.01
        elems, nbytes = GGUF_BLOCK_SIZES[qtype]
        blocks = np.random.default_rng(1).integers(0, 256, (64, k // elems, nbytes), dtype=np.uint8)
        blocks[:, :, 0:4] = np.full((64, k // elems, 2), 0.01, np.float16).view(np.uint8)
        blocks = blocks.reshape(64, -1)
    else:
        blocks = quantize(data, qtype)
    full = torch.from_numpy(blocks)
    loader = getattr(layer.weight, "weight_loader", None) or layer.weight_loader  # as load_hf_weights picks it
    loader(layer.weight, full)
    expected = dequantize_gguf(full, qtype)[:, k // 2:]
    if split_blocks:
        assert isinstance(layer.quant_method, GGUFLinearMethod) and layer.weight.dtype == torch.uint8
        assert torch.equal(layer.quant_method.dequantized_weight(layer, torch.float32), expected)
    else:
        assert isinstance(layer.quant_method, GGUFDequantizeAtLoadMethod)
        assert torch.equal(layer.weight, expected)
