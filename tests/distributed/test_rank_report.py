"""``ember bench``'s per-rank figures: each rank's weight and KV-cache bytes
as stored, and the tensor-parallel collectives of one eager forward, counted
and timed by the communicator."""

from __future__ import annotations

import pytest
import torch

from ember import LLM
from ember.entrypoints.bench.offline import rank_fields
from tests.distributed.test_parallel_engine import _llama
from tests.models.tiny import BLOCK_SIZE, KV_CACHE_BYTES, one_thread, save_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return save_tiny(_llama(), tmp_path_factory.mktemp("rank_report") / "llama")


def _fields(path: str, **kwargs) -> dict:
    llm = LLM(path, dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=KV_CACHE_BYTES, **kwargs)
    try:
        return rank_fields(llm, 8)
    finally:
        llm.llm_engine.shutdown()


def test_one_rank_has_no_collectives(llama_path: str) -> None:
    with one_thread():
        f = _fields(llama_path)
    (r,) = f["ranks"]
    # The parameters in float32, plus buffers (the rotary cos/sin table: a few KB).
    params = sum(p.numel() for p in _llama().parameters())
    assert params * 4 <= r["weight_gb"] * 1e9 <= params * 4 * 1.05
    assert r["kv_cache_gb"] > 0 and r["peak_gb"] is None
    assert r["collectives"] == 0 and f["comm_share"] == 0


def test_two_ranks_split_the_weights_and_count_their_collectives(llama_path: str) -> None:
    one = _fields(llama_path, distributed_executor_backend="mp")["ranks"][0]
    f = _fields(llama_path, tensor_parallel_size=2)
    assert [r["rank"] for r in f["ranks"]] == [0, 1]
    for r in f["ranks"]:
        # Each rank holds about half (norms are replicated).
        assert 0.45 < r["weight_gb"] / one["weight_gb"] < 0.6
        # Per layer: the attention's and the MLP's row-parallel all-reduce; plus
        # the embedding's all-reduce and the LM head's gather.
        assert r["collectives"] == 2 * 2 + 2
        hidden_bytes = 8 * 64 * 4  # [8 tokens, hidden 64] float32
        assert r["collective_mb"] * 1e6 >= 5 * hidden_bytes
        assert 0 < r["comm_share"] < 1 and r["comm_ms"] < r["forward_ms"]
    assert f["comm_share"] == max(r["comm_share"] for r in f["ranks"])
