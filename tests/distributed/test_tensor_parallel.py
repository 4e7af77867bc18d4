"""Tensor parallelism on CPU: two gloo ranks in two spawned processes.

Each rank builds the parallel layers at tp_size 2, loads the same full
(unsharded) weights through the layers' ``weight_loader``s and checks its
results against plain float32 PyTorch on the full weights: a column-parallel
layer's output shard, and the all-reduced result of column -> row chains (the
tp_size 1 result). The ranks run every check once per module and report each
check's outcome (``"ok"`` or the traceback) to the test process, which never
waits more than ``_TIMEOUT_S``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.ranks import run_checks_on_rank, run_ranks

WORLD = 2
_TIMEOUT_S = 90
ATOL = RTOL = 1e-5

HIDDEN, INTER, VOCAB, HEAD_DIM, NUM_HEADS = 16, 24, 64, 4, 4


# ------------------------------------------------------------------ rank side

def _full(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The same tensor on every rank (on the default device)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(torch.get_default_device())


def _load(layer: torch.nn.Module, name: str, full: torch.Tensor, shard_id: str | int | None = None) -> None:
    param = getattr(layer, name)
    loader = getattr(param, "weight_loader", None) or layer.weight_loader
    loader(param, full, shard_id) if shard_id is not None else loader(param, full)


def _finish(*layers: torch.nn.Module) -> None:
    for layer in layers:
        method = getattr(layer, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(layer)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


def check_all_reduce(rank: int) -> None:
    from ember.distributed.parallel_state import get_tp_group

    comm = get_tp_group()
    x = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
    out = comm.all_reduce(x)
    expected = torch.arange(6, dtype=torch.float32).reshape(2, 3) * sum(r + 1 for r in range(WORLD))
    assert out.data_ptr() == x.data_ptr(), "all_reduce is in place"
    assert torch.equal(out, expected), out


def check_all_gather(rank: int) -> None:
    from ember.distributed.parallel_state import get_tp_group

    comm = get_tp_group()
    parts = [torch.arange(24, dtype=torch.float32).reshape(2, 3, 4) + 100 * r for r in range(WORLD)]
    for dim in (0, 1, 2, -1, -2):
        out = comm.all_gather(parts[rank], dim=dim)
        assert torch.equal(out, torch.cat(parts, dim=dim)), dim
    # A non-contiguous part (a transposed view) gathers as its values.
    views = [p.transpose(0, 2) for p in parts]
    assert torch.equal(comm.all_gather(views[rank], dim=1), torch.cat(views, dim=1))
    ints = [torch.tensor([[r, r + 10]]) for r in range(WORLD)]
    assert torch.equal(comm.all_gather(ints[rank], dim=0), torch.cat(ints, dim=0))


def check_column_parallel(rank: int) -> None:
    from ember.layers.linear import ColumnParallelLinear

    w, b, x = _full((INTER, HIDDEN), 1), _full((INTER,), 2), _full((5, HIDDEN), 3)
    ref = F.linear(x, w, b)
    for gather in (False, True):
        layer = ColumnParallelLinear(HIDDEN, INTER, bias=True, gather_output=gather, prefix="mlp.fc1")
        _load(layer, "weight", w)
        _load(layer, "bias", b)
        _finish(layer)
        shard = INTER // WORLD
        _close(layer(x), ref if gather else ref[:, rank * shard:(rank + 1) * shard])


def check_column_row_chain(rank: int) -> None:
    from ember.layers.linear import ColumnParallelLinear, RowParallelLinear

    w1, b1, w2, b2 = _full((INTER, HIDDEN), 4), _full((INTER,), 5), _full((HIDDEN, INTER), 6), _full((HIDDEN,), 7)
    x = _full((7, HIDDEN), 8)
    fc1 = ColumnParallelLinear(HIDDEN, INTER, bias=True, gather_output=False, prefix="fc1")
    fc2 = RowParallelLinear(INTER, HIDDEN, bias=True, reduce_results=True, prefix="fc2")
    for layer, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
        _load(layer, "weight", w)
        _load(layer, "bias", b)
    _finish(fc1, fc2)
    # The bias of the row-parallel layer is added once, not once per rank.
    _close(fc2(torch.relu(fc1(x))), F.linear(torch.relu(F.linear(x, w1, b1)), w2, b2))


def check_int8_column_row_chain(rank: int) -> None:
    """The quantization seam under tensor parallelism: each rank quantizes its
    own shard (a row-parallel shard's scales cover its half of K)."""
    from ember.layers.linear import ColumnParallelLinear, RowParallelLinear
    from ember.layers.quantization import get_quant_config
    from ember.layers.quantization.int8_weight_only import quantize_per_channel_int8

    def dequant(w: torch.Tensor) -> torch.Tensor:
        q, scale = quantize_per_channel_int8(w)
        return q.float() * scale[:, None]

    quant = get_quant_config("int8_weight_only", object())
    w1, b1, w2, b2 = _full((INTER, HIDDEN), 24), _full((INTER,), 25), _full((HIDDEN, INTER), 26), _full((HIDDEN,), 27)
    x = _full((4, HIDDEN), 28)
    fc1 = ColumnParallelLinear(HIDDEN, INTER, bias=True, gather_output=False, quant_config=quant, prefix="fc1")
    fc2 = RowParallelLinear(INTER, HIDDEN, bias=True, reduce_results=True, quant_config=quant, prefix="fc2")
    for layer, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
        _load(layer, "weight", w)
        _load(layer, "bias", b)
    _finish(fc1, fc2)
    assert fc2.weight_int8.shape == (HIDDEN, INTER // WORLD) and not hasattr(fc2, "weight")
    w2_shards = torch.cat([dequant(part) for part in w2.chunk(WORLD, dim=1)], dim=1)
    _close(fc2(torch.relu(fc1(x))), F.linear(torch.relu(F.linear(x, dequant(w1), b1)), w2_shards, b2))


def check_w8a8_int8_checkpoint_chain(rank: int) -> None:
    """A compressed-tensors W8A8 INT8 qkv (per-channel int8 weights, static
    per-tensor input scales of q, k and v: their maximum) into a row-parallel
    layer (dynamic per-token activations, over each rank's half of K)."""
    from ember.layers.linear import QKVParallelLinear, RowParallelLinear
    from ember.layers.quantization.compressed_tensors import CompressedTensorsConfig
    from ember.layers.quantization.w8a8_int8 import int8_scaled_mm_reference, quantize_per_token_int8

    def group(targets, static):
        args = {"num_bits": 8, "type": "int", "symmetric": True}
        return {"targets": targets, "weights": {**args, "strategy": "channel"},
                "input_activations": {**args, "strategy": "tensor" if static else "token", "dynamic": not static}}

    quant = CompressedTensorsConfig.from_config({"quant_method": "compressed-tensors", "format": "int-quantized",
                                                 "config_groups": {"static": group(["re:.*qkv.*|.*_proj$"], True),
                                                                   "dynamic": group(["fc2"], False)}})
    gen = torch.Generator().manual_seed(30)
    num_kv, out = 2, (NUM_HEADS + 2 * 2) * HEAD_DIM
    q = torch.randint(-128, 128, (NUM_HEADS * HEAD_DIM, HIDDEN), generator=gen, dtype=torch.int8)
    k, v = (torch.randint(-128, 128, (num_kv * HEAD_DIM, HIDDEN), generator=gen, dtype=torch.int8) for _ in "kv")
    scales = [torch.rand(t.shape[0], 1, generator=gen) * 0.01 for t in (q, k, v)]
    w2 = torch.randint(-128, 128, (HIDDEN, out), generator=gen, dtype=torch.int8)
    s2 = torch.rand(HIDDEN, 1, generator=gen) * 0.01
    x = _full((5, HIDDEN), 31)
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv, quant_config=quant,
                            prefix="model.layers.0.self_attn.qkv_proj")
    fc2 = RowParallelLinear(out, HIDDEN, quant_config=quant, prefix="fc2")
    for sid, w, scale, input_scale in zip("qkv", (q, k, v), scales, (0.02, 0.03, 0.025)):
        _load(qkv, "weight", w, sid)
        _load(qkv, "weight_scale", scale, sid)
        _load(qkv, "input_scale", torch.tensor([input_scale]), sid)
    _load(fc2, "weight", w2)
    _load(fc2, "weight_scale", s2)
    _finish(qkv, fc2)
    assert torch.equal(qkv.input_scale.cpu(), torch.tensor([0.03]))
    assert fc2.weight.shape == (HIDDEN, out // WORLD) and fc2.weight_scale.shape == (HIDDEN,)
    # Reference: the full qkv product, then each rank's [q_r, k_r, v_r] columns
    # against its K-chunk of w2, summed.
    x_q, x_s = quantize_per_token_int8(x, torch.tensor([0.03]))
    full = int8_scaled_mm_reference(x_q, x_s, torch.cat([q, k, v]), torch.cat(scales).reshape(-1), None, x.dtype)
    y1 = torch.relu(full)
    qs, ks = NUM_HEADS * HEAD_DIM, num_kv * HEAD_DIM
    expected = 0
    for r in range(WORLD):
        cols = [y1[:, a + r * n // WORLD: a + (r + 1) * n // WORLD] for a, n in ((0, qs), (qs, ks), (qs + ks, ks))]
        h_q, h_s = quantize_per_token_int8(torch.cat(cols, dim=1))
        chunk = w2[:, r * out // WORLD: (r + 1) * out // WORLD]
        expected = expected + int8_scaled_mm_reference(h_q, h_s, chunk, s2.reshape(-1), None, x.dtype)
    _close(fc2(torch.relu(qkv(x))), expected)


def check_merged_mlp_chain(rank: int) -> None:
    from ember.layers.linear import MergedColumnParallelLinear, RowParallelLinear

    gate, up, down = _full((INTER, HIDDEN), 9), _full((INTER, HIDDEN), 10), _full((HIDDEN, INTER), 11)
    x = _full((6, HIDDEN), 12)
    gate_up = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=False, prefix="mlp.gate_up_proj")
    down_proj = RowParallelLinear(INTER, HIDDEN, bias=False, prefix="mlp.down_proj")
    _load(gate_up, "weight", gate, 0)
    _load(gate_up, "weight", up, 1)
    _load(down_proj, "weight", down)
    _finish(gate_up, down_proj)
    g, u = gate_up(x).chunk(2, dim=-1)  # this rank's gate and up shards, side by side
    ref = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    _close(down_proj(F.silu(g) * u), ref)


def _check_qkv(rank: int, num_kv_heads: int) -> None:
    from ember.layers.linear import QKVParallelLinear, RowParallelLinear

    q_size, kv_size = NUM_HEADS * HEAD_DIM, num_kv_heads * HEAD_DIM
    wq, wk, wv = _full((q_size, HIDDEN), 13), _full((kv_size, HIDDEN), 14), _full((kv_size, HIDDEN), 15)
    bq, bk, bv = _full((q_size,), 16), _full((kv_size,), 17), _full((kv_size,), 18)
    wo, x = _full((HIDDEN, q_size), 19), _full((5, HIDDEN), 20)
    qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, bias=True, prefix="attn.qkv_proj")
    o_proj = RowParallelLinear(q_size, HIDDEN, bias=False, prefix="attn.o_proj")
    for shard, w, b in (("q", wq, bq), ("k", wk, bk), ("v", wv, bv)):
        _load(qkv, "weight", w, shard)
        _load(qkv, "bias", b, shard)
    _load(o_proj, "weight", wo)
    _finish(qkv, o_proj)

    heads = NUM_HEADS // WORLD
    # With fewer KV heads than ranks each rank holds one KV head, shared by
    # WORLD // num_kv_heads consecutive ranks (their query heads use it).
    kv_heads = max(1, num_kv_heads // WORLD)
    kv_first = rank * kv_heads if num_kv_heads >= WORLD else rank // (WORLD // num_kv_heads)
    out = qkv(x)
    assert out.shape == (5, (heads + 2 * kv_heads) * HEAD_DIM), out.shape
    q, k, v = out.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], dim=-1)
    qs = slice(rank * heads * HEAD_DIM, (rank + 1) * heads * HEAD_DIM)
    kvs = slice(kv_first * HEAD_DIM, (kv_first + kv_heads) * HEAD_DIM)
    _close(q, F.linear(x, wq, bq)[:, qs])
    _close(k, F.linear(x, wk, bk)[:, kvs])
    _close(v, F.linear(x, wv, bv)[:, kvs])
    # The query heads this rank holds are the input columns its o_proj shard holds.
    _close(o_proj(q), F.linear(F.linear(x, wq, bq), wo))


def check_qkv_gqa(rank: int) -> None:
    _check_qkv(rank, num_kv_heads=2)


def check_qkv_fewer_kv_heads_than_ranks(rank: int) -> None:
    _check_qkv(rank, num_kv_heads=1)


def _check_vocab_embedding(vocab: int) -> None:
    from ember.layers.vocab_embedding import VocabParallelEmbedding

    w = _full((vocab, HIDDEN), 21)
    emb = VocabParallelEmbedding(vocab, HIDDEN, prefix="model.embed_tokens")
    _load(emb, "weight", w)
    _finish(emb)
    half = -(-vocab // WORLD)
    ids = torch.tensor([0, 1, half - 1, half, vocab - 1, 5, 40])  # both ranks' rows
    _close(emb(ids), F.embedding(ids, w))


def check_vocab_embedding(rank: int) -> None:
    _check_vocab_embedding(VOCAB)


def check_vocab_embedding_padded(rank: int) -> None:
    _check_vocab_embedding(VOCAB - 1)  # not a multiple of the ranks: the last shard is padded


def _check_lm_head(vocab: int) -> None:
    from ember.layers.vocab_embedding import ParallelLMHead

    w, h = _full((vocab, HIDDEN), 22), _full((3, HIDDEN), 23)
    head = ParallelLMHead(vocab, HIDDEN, prefix="lm_head")
    _load(head, "weight", w)
    _finish(head)
    logits = head(h)
    assert logits.dtype == torch.float32
    _close(logits, F.linear(h, w))


def check_lm_head(rank: int) -> None:
    _check_lm_head(VOCAB)


def check_lm_head_padded(rank: int) -> None:
    _check_lm_head(VOCAB - 1)


CHECKS = {name: fn for name, fn in globals().items() if name.startswith("check_")}


def _rank_main(rank: int, init_file: str, out_dir: str, backend: str) -> None:
    from ember.distributed.parallel_state import get_tp_rank, get_tp_size

    def setup() -> None:
        assert (get_tp_rank(), get_tp_size()) == (rank, WORLD)
        if backend == "nccl":
            torch.set_default_device(torch.device("cuda", rank))
            # float32 products as float32 (no TF32), for the tight tolerance.
            torch.backends.cuda.matmul.allow_tf32 = False

    run_checks_on_rank(rank, WORLD, init_file, out_dir, {name: partial(fn, rank) for name, fn in CHECKS.items()},
                       backend=backend, timeout_s=_TIMEOUT_S, setup=setup)
    assert get_tp_size() == 1


# ------------------------------------------------------------------ test side

def _run_ranks(tmp: Path, backend: str) -> list[dict[str, str]]:
    """Run every check on two ranks; one dict of outcomes per rank."""
    return run_ranks(_rank_main, WORLD, tmp, backend, timeout_s=_TIMEOUT_S)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, str]]:
    return _run_ranks(tmp_path_factory.mktemp("tp_gloo"), "gloo")


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_on_two_ranks(rank_results: list[dict[str, str]], check: str) -> None:
    for rank, res in enumerate(rank_results):
        assert res.get(check) == "ok", f"rank {rank}, {check}:\n{res.get(check)}"


@pytest.mark.gpu
def test_on_two_gpus_with_nccl(tmp_path) -> None:
    """The same checks on two CUDA devices over NCCL."""
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} CUDA devices")
    results = _run_ranks(tmp_path, "nccl")
    failed = {f"rank {r}, {name}": out for r, res in enumerate(results) for name, out in res.items() if out != "ok"}
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
    assert all(set(res) == set(CHECKS) for res in results)


def test_single_rank_collectives_are_identity() -> None:
    from ember.distributed.communicator import Communicator

    x = torch.randn(3, 4)
    comm = Communicator()
    assert comm.all_reduce(x) is x
    assert comm.all_gather(x, dim=0) is x


def test_init_distributed_rejects_bad_sizes() -> None:
    from ember.distributed.parallel_state import init_distributed_environment, init_tensor_parallel

    with pytest.raises(ValueError, match="outside"):
        init_distributed_environment(2, 2, backend="gloo")
    with pytest.raises(ValueError, match="divisor"):
        init_distributed_environment(0, 4, backend="gloo", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="backend"):
        init_distributed_environment(0, 1, backend="mpi")
    with pytest.raises(ValueError, match="process group"):
        init_tensor_parallel(0, 2)


def test_world_of_one_then_teardown(tmp_path) -> None:
    import torch.distributed as dist

    from ember.distributed.parallel_state import (destroy_distributed_environment, get_tp_group,
                                                  init_distributed_environment)

    init_distributed_environment(0, 1, backend="gloo", init_method=f"file://{tmp_path / 'rendezvous'}")
    try:
        assert dist.is_initialized()
        assert get_tp_group().world_size == 1 and get_tp_group().group is None
        with pytest.raises(RuntimeError, match="already"):
            init_distributed_environment(0, 1, backend="gloo")
    finally:
        destroy_distributed_environment()
    assert not dist.is_initialized()
