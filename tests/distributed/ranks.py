"""Run a function on several spawned CPU processes (one per rank) and collect
what each wrote, never hanging: a rank still alive after the timeout is killed."""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path


def run_ranks(target: Callable[..., None], world: int, work: Path, *args: object,
              timeout_s: float = 90) -> list[dict[str, str]]:
    """Start ``target(rank, rendezvous_file, work_dir, *args)`` in ``world``
    spawned processes; each writes ``work/rank<r>.json`` (check name -> "ok" or
    a traceback; "init" holds a failed start-up). Returns those dicts in rank
    order, after asserting each exists and that no rank failed to start."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, str(work / "rendezvous"), str(work), *args), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(world):
        path = work / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no results (exit code {procs[r].exitcode})"
        results.append(json.loads(path.read_text()))
        assert "init" not in results[-1], f"rank {r} failed to initialize:\n{results[-1]['init']}"
    return results
