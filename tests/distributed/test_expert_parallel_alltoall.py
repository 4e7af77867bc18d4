"""The all-to-all form of expert-parallel dispatch and combine over two gloo
ranks (CPU, float32).

- :meth:`Communicator.all_to_all` with uneven splits (and empty ones).
- One :class:`~ember.layers.moe.FusedMoE` layer with whole experts per rank:
  the all-to-all form, the all-reduce form and a plain float32 per-token
  reference agree on random routing, on a step whose token count does not
  divide by two, on a one-token step (rank 1 owns no tokens) and on steps
  routed only to one rank's experts (the other rank receives no rows);
  ``"auto"`` takes the all-to-all form from :data:`ALLTOALL_MIN_TOKENS` on
  (counted collectives tell the forms apart); the all-to-all form also runs
  the Triton fused-experts kernel (the CUDA path) under Triton's interpreter.
- Tiny random Qwen3-MoE and DeepSeek-V3 models (the checkpoints of the
  engine's expert-parallel tests) on two ranks with the all-to-all form give
  the prompt logits of the unsplit model at one rank, prompts of 1, 5 and 13
  tokens.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.ranks import run_checks_on_rank, run_ranks
from tests.models import test_deepseek_v3, test_qwen3_moe
from tests.models.tiny import make_prompts, one_thread, save_tiny

pytestmark = pytest.mark.slow
WORLD = 2
_TIMEOUT_S = 240
NUM_EXPERTS, HIDDEN, INTER, TOP_K = 8, 32, 48, 2
MODELS = {
    "qwen3_moe": lambda: test_qwen3_moe.tiny_model(),
    "deepseek_v3": lambda: test_deepseek_v3.tiny_model(test_deepseek_v3.tiny_config()),
}
PROMPTS = make_prompts(lengths=(1, 5, 13))


def _expert_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2 * INTER, HIDDEN] (gate rows, then up rows) and w2 [E, HIDDEN, INTER], the same on every rank."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(NUM_EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.2,
            torch.randn(NUM_EXPERTS, HIDDEN, INTER, generator=g) * 0.2)


def _routing(num_tokens: int, experts: range, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [num_tokens, HIDDEN] and top-k weights / ids [num_tokens, TOP_K] (distinct experts per
    token, drawn from ``experts``), the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, generator=g)
    ids = torch.stack([torch.tensor(experts)[torch.randperm(len(experts), generator=g)[:TOP_K]]
                       for _ in range(num_tokens)]) if num_tokens else torch.zeros(0, TOP_K, dtype=torch.int64)
    weights = torch.rand(num_tokens, TOP_K, generator=g).softmax(dim=-1)
    return x, weights, ids


def _reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``sum_k weights[t, k] * down(silu(gate(x_t)) * up(x_t))`` of expert ``ids[t, k]``, one token at a time."""
    w13, w2 = _expert_weights()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            e = int(ids[t, k])
            gate, up = (w13[e] @ x[t]).split(INTER)
            out[t] += weights[t, k] * (w2[e] @ (F.silu(gate) * up))
    return out


def _layer(dispatch: str):
    from ember.distributed.parallel_state import set_expert_parallel
    from ember.layers.moe import FusedMoE

    set_expert_parallel(True, dispatch)
    layer = FusedMoE(NUM_EXPERTS, HIDDEN, INTER, dtype=torch.float32, prefix="experts")
    w13, w2 = _expert_weights()
    layer.weight_loader(layer.w13_weight, w13, "w13")
    layer.weight_loader(layer.w2_weight, w2, "w2")
    assert layer.w13_weight.shape[0] == NUM_EXPERTS // WORLD
    return layer


# name -> (num_tokens, experts routed to, seed)
CASES = {
    "random_7_tokens": (7, range(NUM_EXPERTS), 1),
    "random_33_tokens": (33, range(NUM_EXPERTS), 2),
    "one_token": (1, range(NUM_EXPERTS), 3),
    "only_rank0_experts": (6, range(0, NUM_EXPERTS // 2), 4),
    "only_rank1_experts": (5, range(NUM_EXPERTS // 2, NUM_EXPERTS), 5),
}


TRITON_CASES = ("random_7_tokens", "only_rank0_experts")


def _check_all_to_all() -> None:
    """Rank ``r`` sends ``r + j + 1`` rows to rank ``j`` (rank 0 none to rank
    1); every row says where it came from and where it went."""
    from ember.distributed.parallel_state import get_tp_group

    comm = get_tp_group()
    rank = comm.rank
    sizes = [0 if (rank, j) == (0, 1) else rank + j + 1 for j in range(WORLD)]
    x = torch.cat([torch.tensor([[rank, j, i] for i in range(n)], dtype=torch.int64).reshape(n, 3)
                   for j, n in enumerate(sizes)])
    recv_sizes = [0 if (j, rank) == (0, 1) else j + rank + 1 for j in range(WORLD)]
    out = comm.all_to_all(x, recv_sizes, sizes)
    expected = torch.cat([torch.tensor([[j, rank, i] for i in range(n)], dtype=torch.int64).reshape(n, 3)
                          for j, n in enumerate(recv_sizes)])
    assert torch.equal(out, expected), (out, expected)
    # Equal splits (no sizes given): float rows.
    y = torch.arange(WORLD * 2 * 3, dtype=torch.float32).reshape(WORLD * 2, 3) + 100 * rank
    got = comm.all_to_all(y)
    assert torch.equal(got, torch.cat([torch.arange(rank * 6, rank * 6 + 6, dtype=torch.float32).reshape(2, 3)
                                       + 100 * j for j in range(WORLD)]))


def _check_layer(case: str) -> None:
    num_tokens, experts, seed = CASES[case]
    x, weights, ids = _routing(num_tokens, experts, seed)
    ref = _reference(x, weights, ids)
    a2a = _layer("alltoall")
    assert not a2a.cuda_graph_safe
    out_a2a = a2a(x, weights, ids)
    out_ar = _layer("allreduce")(x, weights, ids)
    torch.testing.assert_close(out_a2a, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_ar, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_a2a, out_ar, atol=1e-5, rtol=1e-5)


def _check_triton_experts(case: str) -> None:
    """The all-to-all form through the Triton fused-experts kernel (the CUDA
    path; Triton's interpreter on CPU here): received rows with local expert
    ids and unit weights, or none."""
    from ember.layers.moe.layer import UnquantizedFusedMoEMethod

    num_tokens, experts, seed = CASES[case]
    x, weights, ids = _routing(num_tokens, experts, seed)
    layer = _layer("alltoall")
    layer.quant_method = UnquantizedFusedMoEMethod("triton")
    torch.testing.assert_close(layer(x, weights, ids), _reference(x, weights, ids), atol=1e-5, rtol=1e-5)


def _check_auto(threshold: int = 6) -> None:
    """``auto``: the all-reduce form (one collective) below the threshold,
    the all-to-all form (three all-to-alls and an all-gather) from it on."""
    from ember.distributed.parallel_state import get_tp_group
    from ember.layers.moe import layer as moe_layer

    saved = moe_layer.ALLTOALL_MIN_TOKENS
    moe_layer.ALLTOALL_MIN_TOKENS = threshold
    try:
        layer = _layer("auto")
        for num_tokens, calls in ((threshold - 1, 1), (threshold, 4),
                                  (threshold + 1, 4)):
            x, weights, ids = _routing(num_tokens, range(NUM_EXPERTS), num_tokens)
            with get_tp_group().measure() as stats:
                out = layer(x, weights, ids)
            assert stats.calls == calls, (num_tokens, stats)
            torch.testing.assert_close(out, _reference(x, weights, ids), atol=1e-5, rtol=1e-5)
    finally:
        moe_layer.ALLTOALL_MIN_TOKENS = saved


def _check_model(work: str, name: str) -> None:
    from ember.distributed.parallel_state import set_expert_parallel

    set_expert_parallel(True, "alltoall")
    runner = _runner(str(Path(work, name)))
    experts = next(m for m in runner.model.modules() if type(m).__name__ == "FusedMoE")
    assert experts.num_local_experts == experts.num_experts // WORLD and experts.dispatch == "alltoall"
    refs = torch.load(Path(work, f"{name}.pt"))
    for prompt, ref in zip(PROMPTS, refs):
        torch.testing.assert_close(runner.compute_prompt_logits(prompt), ref, atol=1e-5, rtol=1e-5)


def _runner(path: str):
    from ember.engine.arg_utils import EngineArgs
    from ember.worker.model_runner import ModelRunner

    config = EngineArgs(model=path, device="cpu", dtype="float32", block_size=4, kv_cache_memory=1 << 20,
                        enforce_eager=True).create_engine_config()
    runner = ModelRunner(config)
    runner.load_model()
    runner.initialize_kv_cache(64)
    return runner


def _rank_main(rank: int, init_file: str, work: str) -> None:
    checks = {"all_to_all": _check_all_to_all}
    checks |= {f"layer_{case}": partial(_check_layer, case) for case in CASES}
    checks |= {f"triton_{case}": partial(_check_triton_experts, case) for case in TRITON_CASES}
    checks["auto"] = _check_auto
    checks |= {f"model_{name}": partial(_check_model, work, name) for name in MODELS}
    run_checks_on_rank(rank, WORLD, init_file, work, checks, timeout_s=_TIMEOUT_S)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, str]]:
    work = tmp_path_factory.mktemp("ep_alltoall")
    for name, make in MODELS.items():
        path = save_tiny(make(), work / name, max_shard_size="200KB")
        with one_thread():
            runner = _runner(path)
            # The unsplit model at one rank (the prompts' logits, [len, vocab] float32).
            torch.save([runner.compute_prompt_logits(p) for p in PROMPTS], work / f"{name}.pt")
        del runner
    return run_ranks(_rank_main, WORLD, work, timeout_s=_TIMEOUT_S)


def _assert_ok(results: list[dict[str, str]], check: str) -> None:
    for rank, res in enumerate(results):
        assert res.get(check) == "ok", f"rank {rank}, {check}:\n{res.get(check)}"


def test_communicator_all_to_all_uneven_splits(rank_results) -> None:
    _assert_ok(rank_results, "all_to_all")


@pytest.mark.parametrize("case", list(CASES))
def test_layer_all_to_all_equals_all_reduce_and_reference(rank_results, case: str) -> None:
    _assert_ok(rank_results, f"layer_{case}")


@pytest.mark.parametrize("case", TRITON_CASES)
def test_layer_all_to_all_with_triton_experts(rank_results, case: str) -> None:
    _assert_ok(rank_results, f"triton_{case}")


def test_auto_dispatch_switches_at_threshold(rank_results) -> None:
    _assert_ok(rank_results, "auto")


@pytest.mark.parametrize("name", list(MODELS))
def test_model_all_to_all_on_two_ranks_equals_one_rank(rank_results, name: str) -> None:
    _assert_ok(rank_results, f"model_{name}")


def test_dispatch_option_is_checked() -> None:
    from ember.config import ConfigError, ParallelConfig

    assert ParallelConfig().expert_parallel_dispatch == "auto"
    with pytest.raises(ConfigError, match="expert_parallel_dispatch must be one of"):
        ParallelConfig(tensor_parallel_size=2, enable_expert_parallel=True, expert_parallel_dispatch="a2a")
    with pytest.raises(ConfigError, match="expert_parallel_dispatch must be 'auto' unless enable_expert_parallel"):
        ParallelConfig(tensor_parallel_size=2, expert_parallel_dispatch="alltoall")
