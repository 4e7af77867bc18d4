"""GGUF tensors loaded per tensor-parallel rank: each rank reads and
dequantizes only its slice, and gets exactly the slice of the whole tensor.

Tensors of every block type the bundled models use (Q4_0, Q4_1, Q5_0, Q8_0,
Q4_K, Q6_K) are written with gguf-py's ``GGUFWriter`` and read back with
``GGUFReader``; the reference is gguf-py's ``gguf.quants.dequantize`` of the
whole tensor, narrowed. Rank 0 and rank 1 of 2 are played by patching the
layers' tensor-parallel rank/size; the layers' own weight loaders take the
:class:`~ember.loader.gguf_tensor.LazyGGUFTensor` views, as at model load.
Reads are counted at the two places tensor bytes are touched: the copy out
of the memory map (``_read``) and gguf-py's dequantizer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import ember.layers.linear as linear
import ember.layers.vocab_embedding as vocab_embedding
from ember.layers.quantization.gguf import GGUFConfig, GGUFDequantizeAtLoadMethod, GGUFLinearMethod
from ember.loader import ModelSource, iter_weights
from ember.loader import gguf as ember_gguf
from ember.loader import gguf_tensor
from ember.loader.gguf_tensor import LazyGGUFTensor, unpermute_rotary

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K]
ROWS = 8
WORLD = 2


def _blocks(qtype: Q, rows: int, k: int, seed: int) -> np.ndarray:
    """[rows, row_bytes] uint8: gguf-py's quantization of random data, or for
    the k-quants (which gguf-py cannot quantize) random bytes with small
    finite scales."""
    rng = np.random.default_rng(seed)
    if qtype not in (Q.Q4_K, Q.Q6_K):
        return gguf.quants.quantize(rng.standard_normal((rows, k)).astype(np.float32), qtype)
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows, k // elems, nbytes), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin
        b[:, :, 0:4] = np.array([0.01, 0.002], np.float16).view(np.uint8)
    else:  # d after ql, qh and the int8 scales
        b[:, :, 208:210] = np.array([0.01], np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def _k(qtype: Q, blocks: float) -> int:
    """Input features of ``blocks`` blocks per rank."""
    return int(blocks * WORLD * gguf.GGML_QUANT_SIZES[qtype][0])


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[str, dict[str, gguf.ReaderTensor]]:
    """For each type: ``T.aligned`` [8, 2 blocks per rank], ``T.partial``
    [8, 1.5 blocks per rank] and ``T.vocab`` [7, 1 block per row]."""
    path = tmp_path_factory.mktemp("slices") / "slices.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for i, qtype in enumerate(TYPES):
        for j, (kind, rows, k) in enumerate((("aligned", ROWS, _k(qtype, 2)), ("partial", ROWS, _k(qtype, 1.5)),
                                             ("vocab", 7, _k(qtype, 0.5)))):
            writer.add_tensor(f"{qtype.name}.{kind}", _blocks(qtype, rows, k, 10 * i + j), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    gf = ember_gguf.read_gguf(str(path))
    return str(path), gf.tensors


def _stored(path: str, tensor: gguf.ReaderTensor, heads: int | None = None) -> gguf_tensor.StoredTensor:
    gf = ember_gguf.read_gguf(path)
    shape = tuple(reversed(tensor.shape.tolist()))
    return ember_gguf._stored(gf, ember_gguf._PlannedTensor("w", tensor, shape, heads))


def _full(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """gguf-py's dequantization of the whole tensor, float32 [N, K]."""
    shape = tuple(reversed(tensor.shape.tolist()))
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).copy())


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same float32 bits (zeros of either sign alike: a zero-scale padding
    row dequantizes to -0.0 in some types)."""
    nonzero = b != 0
    return (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
            and torch.equal(a.view(torch.int32)[nonzero], b.view(torch.int32)[nonzero]))


class Reads:
    """Bytes copied out of the map and bytes handed to gguf-py's dequantizer."""

    def __init__(self, monkeypatch) -> None:
        self.read: list[int] = []
        self.dequantized: list[int] = []
        read, dequantize = gguf_tensor._read, gguf_tensor.dequantize

        def counting_read(view):
            self.read.append(view.nbytes)
            return read(view)

        def counting_dequantize(data, qtype):
            self.dequantized.append(data.nbytes)
            return dequantize(data, qtype)

        monkeypatch.setattr(gguf_tensor, "_read", counting_read)
        monkeypatch.setattr(gguf_tensor, "dequantize", counting_dequantize)


@pytest.fixture
def rank_of_two(monkeypatch, request):
    """Make the layers built in the test rank ``request.param`` of 2."""
    for module in (linear, vocab_embedding):
        monkeypatch.setattr(module, "get_tp_size", lambda: WORLD)
        monkeypatch.setattr(module, "get_tp_rank", lambda: request.param)
    return request.param


def _layer(split: str, k: int, n: int, quant_config=None, prefix: str = "model.layers.0.mlp.down_proj"):
    if split == "column":
        return linear.ColumnParallelLinear(k, n, dtype=torch.float32, quant_config=quant_config, prefix=prefix)
    if split == "vocab":
        return vocab_embedding.VocabParallelEmbedding(n, k, dtype=torch.float32, quant_config=quant_config,
                                                      prefix=prefix)
    return linear.RowParallelLinear(k, n, dtype=torch.float32, quant_config=quant_config, prefix=prefix)


def _load(layer, view) -> None:
    """As ``load_hf_weights`` does: the parameter's own loader, else the layer's."""
    loader = getattr(layer.weight, "weight_loader", None) or layer.weight_loader
    loader(layer.weight, view)


# (split, tensor kind)
SPLITS = [("column", "aligned"), ("row", "aligned"), ("row", "partial"), ("vocab", "vocab")]
SPLIT_IDS = ["column", "row", "row-partial-block", "vocab"]


def _expected(split: str, kind: str, rank: int, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of the whole tensor (the vocabulary shard: its rows, zero padding after)."""
    n, k = full.shape
    if split == "column":
        return full.narrow(0, rank * n // WORLD, n // WORLD)
    if split == "row":
        return full.narrow(1, rank * k // WORLD, k // WORLD)
    per_rank = -(-n // WORLD)
    part = full[rank * per_rank:(rank + 1) * per_rank]
    return torch.cat([part, part.new_zeros(per_rank - part.shape[0], k)])


def _slice_bytes(split: str, kind: str, rank: int, tensor: gguf.ReaderTensor) -> int:
    """Bytes under this rank's slice: its rows, or in every row the blocks covering its columns."""
    n, row_bytes = tensor.data.shape
    elems, nbytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    if split == "column":
        return n // WORLD * row_bytes
    if split == "vocab":
        per_rank = -(-n // WORLD)
        return (min(n, (rank + 1) * per_rank) - rank * per_rank) * row_bytes
    k = row_bytes // nbytes * elems
    lo, hi = rank * k // WORLD, (rank + 1) * k // WORLD
    return n * (-(-hi // elems) - lo // elems) * nbytes


@pytest.mark.parametrize("rank_of_two", [0, 1], indirect=True, ids=["rank0", "rank1"])
@pytest.mark.parametrize("split, kind", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantized_rank_reads_only_its_slice(gguf_file, rank_of_two, split, kind, qtype, monkeypatch) -> None:
    """Dense weights (GGUF dequantized at load): the rank's weight is its
    part of the whole dequantized tensor, bit for bit, and only the rows /
    covering blocks of that part were read and dequantized."""
    path, tensors = gguf_file
    tensor = tensors[f"{qtype.name}.{kind}"]
    full = _full(tensor)
    n, k = full.shape
    layer = _layer(split, k, n)
    reads = Reads(monkeypatch)
    _load(layer, LazyGGUFTensor(_stored(path, tensor), blocks=False, dtype=torch.float32))
    assert _bits_equal(layer.weight.data, _expected(split, kind, rank_of_two, full))
    expected_bytes = _slice_bytes(split, kind, rank_of_two, tensor)
    assert reads.read == reads.dequantized == [expected_bytes]
    # Half the tensor; 2 of 3 blocks per row off block boundaries; 4 of 7 vocabulary rows.
    assert expected_bytes <= {"partial": 2 / 3, "vocab": 4 / 7}.get(kind, 1 / 2) * tensor.data.nbytes


@pytest.mark.parametrize("rank_of_two", [0, 1], indirect=True, ids=["rank0", "rank1"])
@pytest.mark.parametrize("split, kind", SPLITS, ids=SPLIT_IDS)
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kept_quantized_rank_reads_only_its_slice(gguf_file, rank_of_two, split, kind, qtype, monkeypatch,
                                                  caplog) -> None:
    """The ``gguf`` method (blocks kept as stored): rows and whole-block
    column splits copy only the rank's bytes, never dequantized; a split
    inside a block (1.5 blocks per rank) makes the layer dense with a
    warning, and only the blocks covering the rank's features are
    dequantized. Either way the rank's weight dequantizes to its part of the
    whole tensor, bit for bit."""
    path, tensors = gguf_file
    tensor = tensors[f"{qtype.name}.{kind}"]
    full = _full(tensor)
    n, k = full.shape
    prefix = "model.embed_tokens" if split == "vocab" else "model.layers.0.mlp.down_proj"
    config = GGUFConfig({f"{prefix}.weight": int(qtype)})
    ember_logger = logging.getLogger("ember")
    ember_logger.addHandler(caplog.handler)
    try:
        layer = _layer(split, k, n, config, prefix)
    finally:
        ember_logger.removeHandler(caplog.handler)
    reads = Reads(monkeypatch)
    _load(layer, LazyGGUFTensor(_stored(path, tensor), blocks=True))
    expected = _expected(split, kind, rank_of_two, full)
    expected_bytes = _slice_bytes(split, kind, rank_of_two, tensor)
    assert reads.read == [expected_bytes]
    if kind == "partial":
        assert isinstance(layer.quant_method, GGUFDequantizeAtLoadMethod)
        assert reads.dequantized == [expected_bytes]
        assert _bits_equal(layer.weight.data, expected)
        (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        assert (f"{prefix} " in record.message and f"{qtype.name} blocks hold {block} input features" in
                record.message and f"{k // WORLD} per rank" in record.message), record.message
        return
    assert isinstance(layer.quant_method, GGUFLinearMethod) and layer.weight.dtype == torch.uint8
    assert reads.dequantized == [] and not caplog.records
    assert _bits_equal(layer.quant_method.dequantized_weight(layer, torch.float32), expected)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K], ids=lambda t: t.name)
def test_blocks_refuse_a_split_inside_a_block(gguf_file, qtype) -> None:
    path, tensors = gguf_file
    tensor = tensors[f"{qtype.name}.partial"]
    view = LazyGGUFTensor(_stored(path, tensor), blocks=True)
    elems, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    half = view.shape[1] // 2  # 1.5 blocks of bytes
    with pytest.raises(ValueError, match=rf"'{qtype.name}\.partial' \({qtype.name}, blocks of {elems} input "
                                         rf"features in {nbytes} bytes\) cannot be split at bytes \[{half}, "):
        view.narrow(1, half, half)
    # Whole blocks split; dequantized, any column range reads the covering blocks.
    assert view.narrow(1, nbytes, nbytes).shape == (ROWS, nbytes)
    assert _bits_equal(view.dequantized(torch.float32).narrow(1, 5, elems).materialize(),
                       _full(tensor)[:, 5:5 + elems])


def test_rotary_rows_read_only_the_heads_they_cover(gguf_file, monkeypatch) -> None:
    """llama.cpp interleaves the rows of each q/k head: a view reads the
    whole heads under its rows, un-permutes them and cuts its rows out;
    the result is the rows of the whole un-permuted tensor."""
    path, tensors = gguf_file
    tensor = tensors["Q8_0.aligned"]  # 8 rows: 2 heads of 4
    heads, head_dim = 2, ROWS // 2
    whole = unpermute_rotary(_full(tensor), heads)
    view = LazyGGUFTensor(_stored(path, tensor, heads=heads), blocks=False, dtype=torch.float32)
    row_bytes = tensor.data.shape[1]
    for start, length, heads_read in ((0, 4, 1), (4, 4, 1), (3, 2, 2), (5, 1, 1)):
        reads = Reads(monkeypatch)
        assert _bits_equal(view.narrow(0, start, length).materialize(), whole[start:start + length])
        assert reads.read == [heads_read * head_dim * row_bytes], (start, length)
    blocks = LazyGGUFTensor(_stored(path, tensor, heads=heads), blocks=True)
    assert torch.equal(blocks.narrow(0, 4, 4).materialize(),
                       unpermute_rotary(torch.from_numpy(np.array(tensor.data)), heads)[4:])


def test_views_behave_like_tensors_in_torch_calls(gguf_file) -> None:
    path, tensors = gguf_file
    tensor = tensors["Q5_0.aligned"]
    full = _full(tensor)
    view = LazyGGUFTensor(_stored(path, tensor), blocks=False, dtype=torch.bfloat16)
    assert view.shape == full.shape and view.dtype == torch.bfloat16 and view.is_floating_point()
    dst = torch.empty(ROWS // 2, full.shape[1], dtype=torch.bfloat16)
    dst.copy_(view[4:])  # Tensor.copy_ reads the view (__torch_function__)
    assert torch.equal(dst, full[4:].to(torch.bfloat16))
    assert torch.equal(torch.add(view[:, :32], 0), full[:, :32].to(torch.bfloat16))
    assert view.T.shape == (full.shape[1], ROWS)  # any other attribute: that of the read tensor
    with pytest.raises(ValueError, match="outside its shape"):
        view.narrow(0, 6, 4)


def test_iter_weights_lazy_yields_views_equal_to_the_whole_tensors(tmp_path) -> None:
    """``lazy``: 2-D tensors come as views (skipped ones are never read),
    1-D ones whole; read whole, the views equal the eager tensors (q/k of
    llama un-permuted alike)."""
    from tests.loader.test_gguf import _TINY_TYPES, _tiny_gguf_tensors, _write_gguf
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    state = {k: v.detach() for k, v in LlamaForCausalLM(config).state_dict().items()}
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, "llama", config, _tiny_gguf_tensors(config, state), _TINY_TYPES)
    source = ModelSource("gguf", str(path))
    for keep_quantized in (False, True):
        eager = dict(iter_weights(source, torch.bfloat16, keep_quantized))
        lazy = dict(iter_weights(source, torch.bfloat16, keep_quantized, lazy=True))
        assert set(lazy) == set(eager)
        for name, t in eager.items():
            assert isinstance(lazy[name], LazyGGUFTensor) == (t.dim() == 2), name
            got = lazy[name].materialize() if t.dim() == 2 else lazy[name]
            assert got.dtype == t.dtype and torch.equal(got, t), name
