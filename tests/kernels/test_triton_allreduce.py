"""The all-reduce kernels' data movement, flags and call counter, in one
process: rank ``rank``'s kernel runs against simulated peers whose buffers
(ordinary tensors on the same device) already hold what the peers would have
written, with their flags raised, so it never waits. Checked against the
float32 sum of the ranks' inputs. On CPU this runs in Triton's interpreter;
the cross-process path (real meetings over CUDA IPC) is checked by
tests/distributed/test_custom_all_reduce.py on CUDA."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import triton_allreduce as K
from tests.kernels.interpret import DEVICE, by_device

AREA_BYTES = by_device(1 << 20, 4096)
BLOCK = by_device(K.DEFAULT_BLOCK, 16)
SIZES = by_device([5003, 262144], [1, 600])


def _simulate(rank: int, world: int, n: int, algorithm: str, dtype: torch.dtype, calls: int) -> None:
    gen = torch.Generator().manual_seed(n * 31 + rank)
    xs = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for _ in range(world)]
    want = torch.zeros(n, device=DEVICE)
    for t in xs:
        want += t.float()
    want = want.to(dtype)
    bufs = [torch.zeros(K.buffer_bytes(AREA_BYTES), dtype=torch.uint8, device=DEVICE) for _ in range(world)]
    addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64, device=DEVICE)
    counter = torch.full((K.MAX_BLOCKS,), calls, dtype=torch.int64, device=DEVICE)
    programs, slice_elems = K.launch_plan(n, world, algorithm, BLOCK)
    esz = xs[0].element_size()

    def area(p: int) -> torch.Tensor:  # rank p's data area of this call
        off = K.SIGNAL_BYTES + calls % 2 * AREA_BYTES
        return bufs[p][off:off + n * esz].view(dtype)

    def flags(p: int) -> torch.Tensor:
        return bufs[p][:K.SIGNAL_BYTES].view(torch.int64).view(K.MAX_BLOCKS, K.MAX_WORLD)

    for p in range(world):
        if p == rank:
            continue
        flags(rank)[:, p] = 2 * calls + 2  # peer p reached every meeting of this call
        area(p).copy_(xs[p])
        if algorithm == "two_shot":  # peer p's slice holds its reduced sum by the second meeting
            s = slice(p * slice_elems, (p + 1) * slice_elems)
            area(p)[s] = want[s]
    x = xs[rank].clone()
    assert K.all_reduce_ipc(x, addrs, counter, rank, world, AREA_BYTES, algorithm, block=BLOCK) is x
    assert torch.equal(x, want), (x.float() - want.float()).abs().max()
    # The call counter advanced in every entry; this rank raised its flag in
    # every peer's signal area for each launched program, at the last
    # meeting's value.
    assert bool((counter == calls + 1).all())
    raised = 2 * calls + (1 if algorithm == "one_shot" else 2)
    for p in range(world):
        assert flags(p)[:programs, rank].tolist() == [raised] * programs
        assert not bool(flags(p)[programs:, rank].any())
    if algorithm == "two_shot":  # this rank's reduced slice, for the peers to gather
        s = slice(rank * slice_elems, (rank + 1) * slice_elems)
        assert torch.equal(area(rank)[s], want[s])
    else:
        assert torch.equal(area(rank), xs[rank])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("algorithm", K.ALGORITHMS)
@pytest.mark.parametrize("world,rank", [(2, 0), (2, 1), (4, 3)])
def test_all_reduce_against_simulated_peers(world: int, rank: int, algorithm: str, dtype: torch.dtype) -> None:
    for i, n in enumerate(SIZES):
        _simulate(rank, world, n, algorithm, dtype, calls=i + world)  # both data areas


def test_launch_plan() -> None:
    assert K.launch_plan(1, 2, "one_shot", 1024) == (1, 0)
    assert K.launch_plan(10**6, 2, "one_shot", 1024) == (K.MAX_BLOCKS, 0)
    # two-shot: each rank's slice is whole blocks; programs cover one slice.
    assert K.launch_plan(4096, 4, "two_shot", 1024) == (1, 1024)
    assert K.launch_plan(4097, 4, "two_shot", 1024) == (2, 2048)
    assert K.launch_plan(10**6, 2, "two_shot", 1024) == (K.MAX_BLOCKS, 500736)
    with pytest.raises(ValueError, match="unknown"):
        K.launch_plan(16, 2, "ring", 1024)
    with pytest.raises(ValueError, match="multiple of 16"):
        K.buffer_bytes(100)


def test_rejects_messages_over_the_data_area() -> None:
    x = torch.zeros(AREA_BYTES // 4 + 1, dtype=torch.float32, device=DEVICE)
    z = torch.zeros(K.MAX_BLOCKS, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="exceed"):
        K.all_reduce_ipc(x, z[:2], z, 0, 2, AREA_BYTES, "one_shot")


# Consecutive calls of both algorithms, several sizes (so different grids)
# and every dtype: the call counter, the alternating data areas and the flags
# must keep them apart.
_CALLS = [(600, "two_shot", torch.float32), (17, "one_shot", torch.bfloat16), (600, "one_shot", torch.float16),
          (100, "two_shot", torch.float32), (1, "one_shot", torch.float32), (333, "two_shot", torch.bfloat16)]


def _call_inputs(i: int, world: int) -> list[torch.Tensor]:
    n, _, dtype = _CALLS[i]
    gen = torch.Generator().manual_seed(1000 + i)
    return [torch.randn(n, generator=gen).to(dtype) for _ in range(world)]


def _rank_process(rank: int, world: int, addrs: torch.Tensor, out: torch.Tensor) -> None:
    import os

    torch.set_num_threads(1)
    counter = torch.zeros(K.MAX_BLOCKS, dtype=torch.int64)
    try:
        for i, (n, algorithm, _) in enumerate(_CALLS):
            x = _call_inputs(i, world)[rank]
            K.all_reduce_ipc(x, addrs, counter, rank, world, AREA_BYTES, algorithm, block=BLOCK)
            out[rank, i, :n] = x.float()
    finally:
        os._exit(0 if bool((counter == len(_CALLS)).all()) else 1)


@pytest.mark.skipif(DEVICE != "cpu", reason="forked ranks share CPU memory (CUDA: tests/distributed)")
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_meet_across_processes(world: int) -> None:
    """Real meetings: ``world`` forked processes (the interpreter's atomics
    on shared CPU memory, mapped at the same address in each), a sequence of
    all-reduces each."""
    import multiprocessing

    bufs = [torch.zeros(K.buffer_bytes(AREA_BYTES), dtype=torch.uint8).share_memory_() for _ in range(world)]
    addrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    out = torch.full((world, len(_CALLS), max(n for n, _, _ in _CALLS)), float("nan")).share_memory_()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_process, args=(r, world, addrs, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "ranks still waiting for each other"
    assert [p.exitcode for p in procs] == [0] * world
    for i, (n, _, dtype) in enumerate(_CALLS):
        want = torch.zeros(n)
        for t in _call_inputs(i, world):
            want += t.float()
        want = want.to(dtype).float()
        for r in range(world):
            assert torch.equal(out[r, i, :n], want), (r, i)
