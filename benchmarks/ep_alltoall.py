"""Expert-parallel dispatch on several GPUs: one ``FusedMoE`` layer with whole
experts per rank (NCCL), the all-reduce form against the all-to-all form, by
tokens per step; the measurements that set
:data:`ember.layers.moe.layer.ALLTOALL_MIN_TOKENS` (the ``auto`` threshold).

One process per GPU (``--world``, default: every visible GPU). Each builds the
layer at the expert shapes of ``--shape`` with random bf16 weights (its own
experts) and, for every token count, random hidden states and routing (top-k
of random scores, the same on every rank, as after the replicated router).
Both forms run eagerly (the all-to-all form cannot be captured in a CUDA
graph); a time is the median over ``--iters`` calls of the slowest rank, each
call between barriers. Rank 0 prints one line per token count:

    tokens  allreduce_ms  alltoall_ms  alltoall_speedup  max_rel_diff

(``max_rel_diff``: largest difference between the two forms' outputs over the
largest output magnitude; bf16 rounding, ~1e-2 at most), then the smallest
token count from which the all-to-all form is faster at every larger count
measured: the value to give ``ALLTOALL_MIN_TOKENS``, keeping it above the
largest CUDA-graph decode batch (512).

    python benchmarks/ep_alltoall.py [--world 2] [--shape qwen3-30b-a3b] [--json PATH]
    python benchmarks/ep_alltoall.py --device cpu --tokens 1 7 64 --iters 2   # smoke test (gloo)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

# name -> (experts, top_k, hidden, expert width)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "qwen3-235b-a22b": (128, 8, 4096, 1536),
          "deepseek-v3": (256, 8, 7168, 2048)}
TOKENS = (1, 8, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_ms(fn, iters: int, device: str) -> float:
    """Median ms of ``fn()`` over ``iters`` calls, each between barriers, of the slowest rank."""
    import torch.distributed as dist

    times = []
    for _ in range(iters):
        dist.barrier()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    worst = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)


def _rank_main(rank: int, world: int, init_file: str, args: argparse.Namespace, queue) -> None:
    from ember.distributed.parallel_state import (destroy_distributed_environment, init_distributed_environment,
                                                  set_expert_parallel)
    from ember.layers.moe import FusedMoE

    dev, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    init_distributed_environment(rank, world, backend="nccl" if dev == "cuda" else "gloo",
                                 init_method=f"file://{init_file}", local_rank=rank if dev == "cuda" else None)
    try:
        set_expert_parallel(True, "allreduce")
        num_experts, top_k, hidden, inter = SHAPES[args.shape]
        with torch.device(dev):
            layer = FusedMoE(num_experts, hidden, inter, dtype=dtype, prefix="experts")
        torch.manual_seed(1000 + rank)  # this rank's experts
        for p in (layer.w13_weight, layer.w2_weight):
            p.data.normal_(0, 0.02)
        rows = []
        for n in args.tokens:
            torch.manual_seed(n)  # the same tokens and routing on every rank
            x = torch.randn(n, hidden, device=dev, dtype=dtype)
            scores = torch.rand(n, num_experts, device=dev)
            weights, ids = scores.topk(top_k, dim=-1)
            weights = (weights / weights.sum(-1, keepdim=True)).float()
            outs, ms = {}, {}
            for form in ("allreduce", "alltoall"):
                layer.dispatch = form
                outs[form] = layer(x, weights, ids).float()
                ms[form] = _time_ms(lambda: layer(x, weights, ids), args.iters, dev)
            diff = (outs["alltoall"] - outs["allreduce"]).abs().max() / outs["allreduce"].abs().max().clamp(min=1e-6)
            rows.append(dict(tokens=n, allreduce_ms=ms["allreduce"], alltoall_ms=ms["alltoall"],
                             alltoall_speedup=ms["allreduce"] / ms["alltoall"], max_rel_diff=float(diff)))
        if rank == 0:
            queue.put(rows)
    finally:
        destroy_distributed_environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=None, help="GPUs (default: every visible one)")
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: gloo processes in float32 (a smoke test of this script, not a measurement)")
    args = parser.parse_args()
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if world < 2:
        raise SystemExit(f"expert parallelism needs at least 2 GPUs ({world} visible)")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [ctx.Process(target=_rank_main, args=(r, world, init_file, args, queue)) for r in range(world)]
        for p in procs:
            p.start()
        rows = queue.get(timeout=1800)
        for p in procs:
            p.join()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo, float32)"
    print(f"{name} x {world}, shape {args.shape} {SHAPES[args.shape]} (experts, top_k, hidden, expert width)")
    print(f"{'tokens':>7} {'allreduce_ms':>13} {'alltoall_ms':>12} {'alltoall_speedup':>17} {'max_rel_diff':>13}")
    for r in rows:
        print(f"{r['tokens']:>7} {r['allreduce_ms']:>13.3f} {r['alltoall_ms']:>12.3f} "
              f"{r['alltoall_speedup']:>17.2f} {r['max_rel_diff']:>13.2e}")
    threshold = None
    for r in reversed(rows):
        if r["alltoall_speedup"] <= 1.0:
            break
        threshold = r["tokens"]
    from ember.layers.moe.layer import ALLTOALL_MIN_TOKENS

    print(f"all-to-all faster from {threshold} tokens on (ALLTOALL_MIN_TOKENS is {ALLTOALL_MIN_TOKENS})"
          if threshold is not None else "all-to-all never faster at the largest count measured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(world=world, shape=args.shape, rows=rows, alltoall_faster_from=threshold), f, indent=2)


if __name__ == "__main__":
    main()
