"""The custom all-reduce over CUDA IPC: its size thresholds, when it is used,
and (on CUDA) the whole path on ranks that share one GPU.

The kernels' data movement is checked on CPU under Triton's interpreter in
tests/kernels/test_triton_allreduce.py."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ember.distributed import custom_all_reduce as car_mod
from ember.distributed.communicator import Communicator
from ember.distributed.custom_all_reduce import (CUSTOM_MAX_BYTES, DEFAULT_MAX_BYTES, ONE_SHOT_MAX_BYTES,
                                                 CustomAllReduce, choose_algorithm, unsupported_reason)
from tests.distributed.ranks import run_ranks

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("world", sorted(ONE_SHOT_MAX_BYTES))
def test_choose_algorithm_thresholds(world: int) -> None:
    one, most = ONE_SHOT_MAX_BYTES[world], min(CUSTOM_MAX_BYTES[world], DEFAULT_MAX_BYTES)
    assert one < most
    assert choose_algorithm(2, world) == "one_shot"
    assert choose_algorithm(one, world) == "one_shot"
    assert choose_algorithm(one + 2, world) == "two_shot"
    assert choose_algorithm(most, world) == "two_shot"
    assert choose_algorithm(most + 2, world) is None
    # A smaller registered buffer caps what the custom all-reduce takes.
    assert choose_algorithm(one, world, max_bytes=one - 16) is None
    assert choose_algorithm(0, world) is None


def test_thresholds_cover_supported_worlds() -> None:
    from ember.kernels.triton_allreduce import MAX_WORLD

    assert sorted(ONE_SHOT_MAX_BYTES) == sorted(CUSTOM_MAX_BYTES) == list(range(2, MAX_WORLD + 1))
    for world in (1, MAX_WORLD + 1):
        assert choose_algorithm(1024, world) is None


def test_unsupported_reasons() -> None:
    cuda = torch.device("cuda", 0)
    assert unsupported_reason(2, cuda, ["a", "a"], [0, 1]) is None
    assert unsupported_reason(4, cuda, ["a"] * 4, [0, 0, 0, 0]) is None  # ranks sharing one device
    assert "not CUDA" in unsupported_reason(2, torch.device("cpu"))
    assert "1 ranks" in unsupported_reason(1, cuda)
    assert "9 ranks" in unsupported_reason(9, cuda)
    assert "several hosts" in unsupported_reason(2, cuda, ["a", "b"], [0, 0])
    assert "peer-to-peer" in unsupported_reason(2, cuda, ["a", "a"], [0, 1], peer_access=False)


def _bare_car(world: int = 2, max_bytes: int = DEFAULT_MAX_BYTES) -> CustomAllReduce:
    # The selection logic only, without CUDA buffers.
    car = object.__new__(CustomAllReduce)
    car.rank, car.world_size, car.max_bytes, car.device, car.error = 0, world, max_bytes, torch.device("cpu"), None
    return car


def test_algorithm_for_rejects_what_the_kernel_cannot_take() -> None:
    car = _bare_car()
    assert car.algorithm_for(torch.zeros(4096, dtype=torch.bfloat16)) == "one_shot"
    assert car.algorithm_for(torch.zeros(2 << 20, dtype=torch.float16)) == "two_shot"
    assert car.algorithm_for(torch.zeros((4 << 20) + 8, dtype=torch.bfloat16)) is None  # over the buffer
    assert car.algorithm_for(torch.zeros(64, dtype=torch.int32)) is None
    assert car.algorithm_for(torch.zeros(8, 8, dtype=torch.float32).t()) is None  # not contiguous
    car.error = "closed"
    assert car.algorithm_for(torch.zeros(64, dtype=torch.float32)) is None


class _Recorder:
    def __init__(self, world: int) -> None:
        self.inner = _bare_car(world)
        self.calls: list[tuple[int, str]] = []

    def algorithm_for(self, x: torch.Tensor) -> str | None:
        return self.inner.algorithm_for(x)

    def all_reduce(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        self.calls.append((x.numel(), algorithm))
        return x.mul_(2)


def test_communicator_routes_small_messages_to_the_custom_all_reduce(monkeypatch) -> None:
    import torch.distributed as dist

    nccl: list[int] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: nccl.append(x.numel()))
    comm = Communicator(0, 2, group=object())
    rec = _Recorder(2)
    comm.custom_all_reduce = rec
    small = torch.ones(4096, dtype=torch.bfloat16)
    assert comm.all_reduce(small) is small and bool((small == 2).all())  # in place
    medium = torch.ones(1 << 20, dtype=torch.bfloat16)
    comm.all_reduce(medium)
    comm.all_reduce(torch.ones(8 << 20, dtype=torch.bfloat16))  # 16 MiB: NCCL
    comm.all_reduce(torch.ones(16, dtype=torch.int64))  # dtype: NCCL
    assert rec.calls == [(4096, "one_shot"), (1 << 20, "two_shot")]
    assert nccl == [8 << 20, 16]
    with comm.measure() as stats:
        comm.all_reduce(torch.ones(64, dtype=torch.float32))
        comm.all_reduce(torch.ones(16, dtype=torch.int64))
    assert stats.calls == 2 and stats.bytes == 64 * 4 + 16 * 8
    assert rec.calls[-1] == (64, "one_shot") and nccl[-1] == 16


def test_communicator_without_custom_all_reduce_uses_torch_distributed(monkeypatch) -> None:
    import torch.distributed as dist

    nccl: list[int] = []
    monkeypatch.setattr(dist, "all_reduce", lambda x, group=None: nccl.append(x.numel()))
    comm = Communicator(0, 2, group=object())
    comm.init_custom_all_reduce(torch.device("cpu"))  # CPU: never set up
    assert comm.custom_all_reduce is None
    comm.all_reduce(torch.ones(8))
    assert nccl == [8]
    one = Communicator()
    one.init_custom_all_reduce(torch.device("cuda", 0))  # one rank: nothing to set up, no CUDA touched
    assert one.custom_all_reduce is None


def test_cli_flag_disables_custom_all_reduce() -> None:
    from ember.config import ConfigError, ParallelConfig
    from ember.engine.arg_utils import EngineArgs

    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args(["--disable-custom-all-reduce"])).disable_custom_all_reduce
    assert not EngineArgs.from_cli_args(parser.parse_args([])).disable_custom_all_reduce
    assert ParallelConfig(disable_custom_all_reduce=True).disable_custom_all_reduce
    with pytest.raises(ConfigError):
        ParallelConfig(disable_custom_all_reduce="yes")


def _gloo_rank(rank: int, init_file: str, work: str) -> None:
    from ember.distributed.parallel_state import (destroy_distributed_environment, get_tp_group,
                                                  init_distributed_environment)

    torch.set_num_threads(1)
    results = {}
    try:
        init_distributed_environment(rank, 2, backend="gloo", init_method=f"file://{init_file}", timeout_s=45)
        comm = get_tp_group()
        comm.init_custom_all_reduce(torch.device("cpu"))
        # The collective agreement itself declines CPU ranks on every rank.
        declined = CustomAllReduce.create(rank, 2, comm.group, torch.device("cpu")) is None
        x = torch.full((5,), float(rank + 1))
        comm.all_reduce(x)
        ok = declined and comm.custom_all_reduce is None and x.tolist() == [3.0] * 5
        results["gloo"] = "ok" if ok else repr((declined, comm.custom_all_reduce, x))
    except Exception as e:  # reported to the test
        results["init"] = repr(e)
    finally:
        Path(work, f"rank{rank}.json").write_text(json.dumps(results))
        destroy_distributed_environment()


def test_gloo_ranks_never_use_the_custom_all_reduce(tmp_path) -> None:
    results = run_ranks(_gloo_rank, 2, tmp_path, timeout_s=90)
    assert [r["gloo"] for r in results] == ["ok", "ok"]


@pytest.mark.gpu
def test_custom_all_reduce_on_ranks_sharing_one_gpu() -> None:
    """2 and 4 ranks on cuda:0: eager and CUDA-graph all-reduces of every
    dtype and both algorithms against the float32 sum (the script exits 1 on
    a mismatch or a hang)."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/gpu/custom_all_reduce.py"), "--world", "2", "4",
                           "--iters", "5"], capture_output=True, text=True, timeout=400, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("checks passed") == 2, proc.stdout


def test_module_imports_no_kernel_on_cpu_path() -> None:
    # The thresholds and selection logic import without Triton kernels.
    assert "triton" not in car_mod.__dict__
