"""Data-parallel attention for MLA models (``enable_dp_attention``): each
tensor-parallel rank attends only its own requests (all heads) and holds only
their partition of the latent KV cache, while the MLP / MoE layers see every
token.

The engine runs a tiny random DeepSeek-V3 checkpoint over two CPU worker
processes (gloo) and must give the same greedy tokens as one rank, with the
sampled tokens' log-probabilities within float32 noise: three prompts under a
token budget of 8 (chunked prefills mixed with decodes, the ranks' shares
uneven; also with expert parallelism, asynchronous scheduling and forced
preemption) and a single prompt (the other rank attends nothing, every
step).
Each rank's cache holds half the pool's blocks. The block partitions, the
rank-by-rank packing and the configuration checks are tested without
processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ember import LLM, SamplingParams
from ember.config import ConfigError
from ember.core.kv_cache_manager import KVCacheManager
from ember.distributed.dp_attention import DPAttentionLayout, DPAttentionPlanner
from ember.engine.arg_utils import EngineArgs
from ember.entrypoints.bench.offline import rank_fields
from ember.request import Request
from ember.worker.common import HostInputs
from tests.distributed.test_parallel_engine import MODELS, NUM_NEW, PROMPTS
from tests.models.tiny import BLOCK_SIZE, KV_CACHE_BYTES, one_thread, save_tiny


def _request(req_id: str, num_tokens: int) -> Request:
    return Request(req_id, list(range(num_tokens)), SamplingParams(max_tokens=4), max_model_len=64)


# ----------------------------------------------------------- no processes
def test_requests_take_blocks_from_one_partition_each() -> None:
    kv = KVCacheManager(8, block_size=4, enable_caching=False, num_partitions=2)
    a, b, c = _request("a", 9), _request("b", 4), _request("c", 4)
    assert [blk.block_id for blk in kv.allocate_slots(a, 9)] == [0, 1, 2]  # partition 0: blocks 0..3
    assert [blk.block_id for blk in kv.allocate_slots(b, 4)] == [4]  # the one with more free blocks
    assert [blk.block_id for blk in kv.allocate_slots(c, 4)] == [5]
    assert kv.req_to_partition == {"a": 0, "b": 1, "c": 1}
    assert kv.block_pool.get_num_free_blocks(0) == 1 and kv.block_pool.get_num_free_blocks() == 3
    # a needs two more blocks: its partition has one free, the other two: no.
    a.num_computed_tokens = 9
    assert kv.allocate_slots(a, 8) is None and kv.num_free_blocks(a) == 1
    kv.free(b)
    assert "b" not in kv.req_to_partition and kv.block_pool.get_num_free_blocks(1) == 3
    kv.free(a)
    d = _request("d", 16)
    assert [blk.block_id for blk in kv.allocate_slots(d, 16)] == [3, 2, 1, 0]  # least recently freed first
    with pytest.raises(ValueError, match="prefix caching"):
        KVCacheManager(8, block_size=4, enable_caching=True, num_partitions=2)


def _host(req_ids: list[str], counts: list[int], computed: list[int], block_ids: dict[str, list[int]],
          block_size: int) -> HostInputs:
    qsl = np.concatenate([[0], np.cumsum(counts)])
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(computed, counts)])
    width = max(len(block_ids[r]) for r in req_ids)
    table = np.zeros((len(req_ids), width), dtype=np.int32)
    for i, r in enumerate(req_ids):
        table[i, : len(block_ids[r])] = block_ids[r]
    req_of = np.repeat(np.arange(len(req_ids)), counts)
    slots = table[req_of, positions // block_size].astype(np.int64) * block_size + positions % block_size
    seq_lens = (np.array(computed) + np.array(counts)).astype(np.int32)
    return HostInputs(np.arange(len(positions)), positions, slots, qsl.astype(np.int32), seq_lens, table,
                      max(counts), [], [], req_ids=req_ids)


def test_planner_packs_rank_by_rank_and_cuts_out_its_rows() -> None:
    blocks = {"p0": [0, 1], "d0": [2], "p1": [5, 6], "d1": [4], "e1": [7]}  # 4 blocks per rank
    num_scheduled = {"p0": 6, "p1": 5, "d0": 1, "d1": 1, "e1": 1}
    planner = DPAttentionPlanner(1, 2, block_size=4)
    planner.blocks_per_rank = 4
    order = planner.order(num_scheduled, blocks)
    assert order == ["d0", "p0", "d1", "e1", "p1"]
    computed = {"p0": 0, "d0": 3, "p1": 2, "d1": 2, "e1": 0}
    host = _host(order, [num_scheduled[r] for r in order], [computed[r] for r in order], blocks, 4)
    local, layout = planner.split(host, blocks)
    assert layout.counts == [7, 7] and (layout.start, layout.end) == (7, 14)
    assert local.req_ids == ["d1", "e1", "p1"] and local.num_decodes == 2 and local.max_query_len == 5
    assert local.query_start_loc.tolist() == [0, 1, 2, 7]
    assert local.seq_lens.tolist() == [3, 1, 7]
    assert local.block_table.tolist() == [[0, 0], [3, 0], [1, 2]]  # ids local to rank 1's cache
    # d1 at position 2 of local block 0; e1 at 0 of block 3; p1 at 2..6 of blocks 1, 2.
    assert local.slot_mapping.tolist() == [2, 12, 6, 7, 8, 9, 10]
    assert local.input_ids is host.input_ids  # every rank embeds every token
    rank0 = DPAttentionPlanner(0, 2, 4)
    rank0.blocks_per_rank = 4
    local0, layout0 = rank0.split(host, blocks)
    assert local0.req_ids == ["d0", "p0"] and local0.slot_mapping.tolist() == [11, 0, 1, 2, 3, 4, 5]
    assert (layout0.start, layout0.end) == (0, 7)
    # A rank with no request this step: empty attention inputs.
    only0 = _host(["p0"], [6], [0], blocks, 4)
    empty, layout = planner.split(only0, blocks)
    assert empty.req_ids == [] and empty.query_start_loc.tolist() == [0] and layout.counts == [6, 0]


def test_layout_local_rows() -> None:
    layout = DPAttentionLayout([3, 0, 2], 2)
    x = torch.arange(5)
    assert layout.local(x).tolist() == [3, 4] and layout.num_local == 2
    assert DPAttentionLayout([3, 0, 2], 1).local(x).numel() == 0
    assert DPAttentionLayout([5], 0).gather(x) is x  # one rank: nothing to gather


@pytest.fixture(scope="module")
def deepseek_path(tmp_path_factory) -> str:
    return save_tiny(MODELS["deepseek_v3"](), tmp_path_factory.mktemp("dp_attention") / "deepseek_v3",
                     max_shard_size="200KB")


def _args(path: str, **kwargs) -> EngineArgs:
    return EngineArgs(model=path, device="cpu", dtype="float32", block_size=BLOCK_SIZE, **kwargs)


def test_config_errors(deepseek_path: str, tmp_path) -> None:
    with pytest.raises(ConfigError, match="enable_dp_attention"):
        _args(deepseek_path, enable_dp_attention=True, enable_prefix_caching=False).create_engine_config()
    with pytest.raises(ConfigError, match="enable_dp_attention"):
        _args(deepseek_path, enable_dp_attention=True, tensor_parallel_size=2, pipeline_parallel_size=2,
              enable_prefix_caching=False).create_engine_config()
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        _args(deepseek_path, enable_dp_attention=True, tensor_parallel_size=2).create_engine_config()
    with pytest.raises(ConfigError, match="preemption_mode"):
        _args(deepseek_path, enable_dp_attention=True, tensor_parallel_size=2, enable_prefix_caching=False,
              preemption_mode="swap").create_engine_config()
    llama = save_tiny(MODELS["llama"](), tmp_path / "llama")
    with pytest.raises(ConfigError, match="MLA model"):
        _args(llama, enable_dp_attention=True, tensor_parallel_size=2,
              enable_prefix_caching=False).create_engine_config()
    config = _args(deepseek_path, enable_dp_attention=True, tensor_parallel_size=2,
                   enable_prefix_caching=False).create_engine_config()
    assert config.parallel_config.enable_dp_attention


# --------------------------------------------------------- two processes
def _generate(path: str, prompts: list[list[int]], min_preemptions: int = 0, **kwargs) -> tuple[list, list[int]]:
    """Greedy tokens and their log-probabilities for ``prompts``, all at once,
    and the KV partition of each request that finished (recorded when it is
    freed); asserts the engine preempted at least ``min_preemptions`` times."""
    kwargs = dict(kv_cache_memory=KV_CACHE_BYTES) | kwargs
    llm = LLM(path, dtype="float32", block_size=BLOCK_SIZE, max_num_batched_tokens=8, enable_prefix_caching=False,
              **kwargs)
    try:
        kv = llm.llm_engine.engine_core.scheduler.kv_cache_manager
        partitions, free = [], kv.free
        kv.free = lambda req: (req.is_finished() and partitions.append(kv.partition_of(req)), free(req))
        params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=0)
        outs = llm.generate([list(p) for p in prompts], params, use_tqdm=False)
        assert llm.get_stats().num_preemptions >= min_preemptions
    finally:
        llm.llm_engine.shutdown()
    return [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs], partitions


def _assert_same(ours: list, ref: list) -> None:
    for i, ((toks, lps), (ref_toks, ref_lps)) in enumerate(zip(ours, ref)):
        assert toks == ref_toks, f"prompt {i}: {toks} != {ref_toks}"
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_dp_attention_2_equals_1(deepseek_path: str) -> None:
    prompts = [list(p) for p in PROMPTS]
    with one_thread():
        ref, one = _generate(deepseek_path, prompts)
        ref_single, _ = _generate(deepseek_path, prompts[1:2])
    assert set(one) == {0}
    assert min(len(set(t)) for t, _ in ref) >= 2, f"degenerate reference: {ref}"
    ours, partitions = _generate(deepseek_path, prompts, tensor_parallel_size=2, enable_dp_attention=True)
    assert set(partitions) == {0, 1}, partitions  # both ranks attended requests
    _assert_same(ours, ref)
    # Whole experts per rank: the MoE combines every rank's rows by all-reduce.
    ours, _ = _generate(deepseek_path, prompts, tensor_parallel_size=2, enable_dp_attention=True,
                        enable_expert_parallel=True)
    _assert_same(ours, ref)
    single, partitions = _generate(deepseek_path, prompts[1:2], tensor_parallel_size=2, enable_dp_attention=True)
    assert partitions == [0]  # rank 1 attends nothing
    _assert_same(single, ref_single)
    # Steps launched before the previous one is sampled (the CUDA default):
    # the tokens in flight are fed on the device of every rank.
    ours, _ = _generate(deepseek_path, prompts, tensor_parallel_size=2, enable_dp_attention=True,
                        async_scheduling=True)
    _assert_same(ours, ref)
    # 8 blocks (32 tokens) per rank for requests that need 3, 5 and 7:
    # requests are preempted (within their partition) and recomputed.
    tight, _ = _generate(deepseek_path, prompts, tensor_parallel_size=2, enable_dp_attention=True,
                         num_gpu_blocks_override=8, max_model_len=32, min_preemptions=1)
    _assert_same(tight, ref)


@pytest.mark.slow
def test_each_rank_holds_only_its_partition(deepseek_path: str) -> None:
    def cache(**kwargs) -> tuple[int, list[float]]:
        llm = LLM(deepseek_path, dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=KV_CACHE_BYTES,
                  enable_prefix_caching=False, tensor_parallel_size=2, **kwargs)
        try:
            pool = llm.llm_engine.engine_core.scheduler.kv_cache_manager.block_pool
            return pool.num_blocks, [r["kv_cache_gb"] for r in rank_fields(llm, 8)["ranks"]]
        finally:
            llm.llm_engine.shutdown()

    tp_blocks, tp_bytes = cache()
    dp_blocks, dp_bytes = cache(enable_dp_attention=True)
    bytes_per_block = tp_bytes[0] * 1e9 / tp_blocks  # tensor parallelism alone: every rank holds the whole pool
    # The same memory per rank holds a pool twice as large: each rank's cache is half of it.
    assert dp_blocks == 2 * tp_blocks
    for gb in dp_bytes:
        assert gb * 1e9 == pytest.approx(dp_blocks * bytes_per_block / 2)


@pytest.mark.gpu
def test_gpu_dp_attention_matches_one_rank(deepseek_path: str) -> None:
    """On two GPUs (NCCL, the Triton MLA kernels, asynchronous scheduling):
    the same greedy tokens as one GPU (CUDA graphs), log-probabilities within
    float32 kernel noise."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    prompts = [list(p) for p in PROMPTS]
    common = dict(device="cuda", kv_cache_memory=64 << 20)
    ref, _ = _generate(deepseek_path, prompts, **common)
    ours, partitions = _generate(deepseek_path, prompts, tensor_parallel_size=2, enable_dp_attention=True, **common)
    assert set(partitions) == {0, 1}, partitions
    for (toks, lps), (ref_toks, ref_lps) in zip(ours, ref):
        assert toks == ref_toks
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(ref_lps), atol=2e-3, rtol=0)
