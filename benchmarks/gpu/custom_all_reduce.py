"""Check and time the custom all-reduce over CUDA IPC
(:mod:`ember.distributed.custom_all_reduce`) on 2 and 4 spawned ranks.

By default every rank uses cuda:0 (CUDA IPC works between processes on one
device; a gloo group exchanges the handles), so one GPU checks the whole path::

    python benchmarks/gpu/custom_all_reduce.py                  # worlds 2 and 4 on cuda:0
    python benchmarks/gpu/custom_all_reduce.py --world 2 --distinct-devices   # cuda:0, cuda:1 (+ NCCL timings)

For each world size, dtype (bfloat16, float16, float32) and algorithm
(one-shot, two-shot) it all-reduces messages from 1 element to the registered
maximum, eagerly and as a captured CUDA graph replayed with new inputs (with
eager calls in between), and compares every result with the float32 sum of the
ranks' inputs (rank order) rounded to the dtype. It prints one line per world
size with the checks run and the largest error, then the mean time per call
(microseconds) by message size: ranks sharing one device take turns on it, so
those times say nothing about speed; with ``--distinct-devices`` they do, next
to NCCL's (with NVLink SHARP off). Exits 1 on any mismatch, a rank's error, or
a rank still running after ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import ast
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

DTYPES = ("bfloat16", "float16", "float32")
TIMED_BYTES = (8 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20)


def _inputs(n: int, world: int, dtype, device, seed: int) -> list:
    """Every rank's input for one check (the same on every rank)."""
    import torch

    g = torch.Generator(device=device)
    out = []
    for p in range(world):
        g.manual_seed(seed * 1009 + p)
        out.append(torch.randn(n, generator=g, device=device).to(dtype))
    return out


def _expected(inputs: list):
    import torch

    acc = torch.zeros_like(inputs[0], dtype=torch.float32)
    for t in inputs:
        acc += t.float()
    return acc.to(inputs[0].dtype)


def _check(x, inputs, what: str, errors: list[str]) -> float:
    want = _expected(inputs)
    err = (x.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item() + 1e-6
    tol = {2: 1e-2, 4: 1e-6}[x.element_size()] * scale
    if not err <= tol or not bool(x.isfinite().all()):
        errors.append(f"{what}: max abs error {err:.3g} > {tol:.3g}")
    return err


def _sizes(max_numel: int) -> list[int]:
    sizes = {1, 2, 3, 7, 16, 127, 1024, 1025, 4096, 8192 + 16, 65536 + 3, 262144, max_numel // 2 + 5,
             max_numel - 1, max_numel}
    return sorted(n for n in sizes if 1 <= n <= max_numel)


def _rank_main(rank: int, world: int, init_file: str, distinct: bool, max_bytes: int, iters: int,
               status_file: str) -> None:
    import torch
    import torch.distributed as dist

    from ember.distributed.custom_all_reduce import CustomAllReduce

    try:
        device = torch.device("cuda", rank if distinct else 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        car = CustomAllReduce.create(rank, world, dist.group.WORLD, device, max_bytes)
        if car is None:
            raise RuntimeError("the custom all-reduce declined this group (see the log)")
        errors: list[str] = []
        checks, worst, seed = 0, 0.0, 0
        for name in DTYPES:
            dtype = getattr(torch, name)
            max_numel = max_bytes // torch.tensor([], dtype=dtype).element_size()
            for algorithm in ("one_shot", "two_shot"):
                for n in _sizes(max_numel):
                    seed += 1
                    inputs = _inputs(n, world, dtype, device, seed)
                    x = inputs[rank].clone()
                    car.all_reduce(x, algorithm)
                    worst = max(worst, _check(x, inputs, f"eager {name} {algorithm} n={n}", errors))
                    checks += 1
                for n in (4096, 65536 + 3):
                    x = torch.zeros(n, dtype=dtype, device=device)
                    car.all_reduce(x, algorithm)  # compiles outside the capture
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        car.all_reduce(x, algorithm)
                    for replay in range(3):
                        seed += 1
                        inputs = _inputs(n, world, dtype, device, seed)
                        x.copy_(inputs[rank])
                        graph.replay()
                        worst = max(worst, _check(x, inputs, f"graph {name} {algorithm} n={n} replay {replay}",
                                                  errors))
                        # An eager call between replays advances the same device counter.
                        seed += 1
                        other = _inputs(777, world, dtype, device, seed)
                        y = other[rank].clone()
                        car.all_reduce(y)
                        worst = max(worst, _check(y, other, f"eager between replays {name} n=777", errors))
                        checks += 2
        torch.cuda.synchronize()
        timings = _time(car, rank, world, device, distinct, max_bytes, iters)
        Path(status_file).write_text(repr({"errors": errors, "checks": checks, "worst": worst,
                                           "timings": timings}))
        dist.barrier()
        car.close()
        dist.destroy_process_group()
    except Exception:
        Path(status_file).write_text(repr({"errors": [traceback.format_exc()]}))
        raise


def _time(car, rank: int, world: int, device, distinct: bool, max_bytes: int, iters: int) -> dict:
    """Mean microseconds per call by (message bytes, transport)."""
    import torch
    import torch.distributed as dist

    nccl = dist.new_group(backend="nccl") if distinct else None
    out = {}
    for nbytes in TIMED_BYTES:
        if nbytes > max_bytes:
            continue
        x = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
        ops = {"one_shot": lambda: car.all_reduce(x, "one_shot"), "two_shot": lambda: car.all_reduce(x, "two_shot")}
        if nccl is not None:
            ops["nccl"] = lambda: dist.all_reduce(x, group=nccl)
        for name, op in ops.items():
            op()
            torch.cuda.synchronize()
            dist.barrier()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                op()
            end.record()
            end.synchronize()
            out[(nbytes, name)] = start.elapsed_time(end) * 1000 / iters
    return out


def run_world(world: int, distinct: bool, max_bytes: int, iters: int, timeout_s: float) -> bool:
    """Run the checks on ``world`` ranks; prints their outcome. True when all passed."""
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        status = [os.path.join(tmp, f"rank{r}.txt") for r in range(world)]
        procs = [ctx.Process(target=_rank_main, args=(r, world, os.path.join(tmp, "rendezvous"), distinct,
                                                      max_bytes, iters, status[r]), daemon=True)
                 for r in range(world)]
        start = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(max(0.0, timeout_s - (time.monotonic() - start)))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results = []
        for r in range(world):
            try:
                results.append(ast.literal_eval(Path(status[r]).read_text()))
            except (FileNotFoundError, SyntaxError, ValueError):
                results.append({"errors": [f"rank {r} exited with {procs[r].exitcode} and no report"]})
    ok = not hung
    if hung:
        print(f"world {world}: ranks {hung} still running after {timeout_s:.0f} s (killed); ranks sharing one "
              f"device need the driver to time-slice between processes")
    for r, res in enumerate(results):
        for e in res["errors"][:10]:
            print(f"world {world} rank {r}: MISMATCH/ERROR {e}")
            ok = False
    if not ok:
        return False
    checks = sum(res["checks"] for res in results)
    worst = max(res["worst"] for res in results)
    print(f"world {world}: {checks} checks passed (eager and CUDA-graph replays; largest abs error {worst:.3g}) "
          f"in {time.monotonic() - start:.1f} s")
    timings = results[0]["timings"]
    names = sorted({name for _, name in timings})
    print(f"  rank 0 us/call ({'distinct devices' if distinct else 'ranks share cuda:0: not a speed figure'}): "
          + "  ".join(f"{nbytes >> 10} KiB: " + ", ".join(f"{n} {timings[(nbytes, n)]:.1f}" for n in names)
                      for nbytes in sorted({b for b, _ in timings})))
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--distinct-devices", action="store_true",
                        help="rank r on cuda:r (needs that many GPUs); also times NCCL")
    parser.add_argument("--max-bytes", type=int, default=8 << 20, help="registered message size (bytes)")
    parser.add_argument("--iters", type=int, default=10, help="calls per timing")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per world size before failing")
    args = parser.parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ok = all([run_world(w, args.distinct_devices, args.max_bytes, args.iters, args.timeout) for w in args.world])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
