"""Run checks on several spawned processes (one per rank) and collect what
each rank found, never hanging: a rank still alive after the timeout is killed.

The test side calls :func:`run_ranks`; each spawned rank calls
:func:`run_checks_on_rank`, which joins the process group, runs every check in
the same order and writes ``work/rank<r>.json``."""

from __future__ import annotations

import json
import multiprocessing
import traceback
from collections.abc import Callable
from pathlib import Path


def run_checks_on_rank(rank: int, world: int, init_file: str, work: str, checks: dict[str, Callable[[], None]],
                       backend: str = "gloo", timeout_s: float = 90,
                       setup: Callable[[], None] | None = None) -> None:
    """In a spawned rank: join a ``world``-rank group (``backend``, file
    rendezvous), run ``setup`` then every check in order, and write
    ``work/rank<rank>.json``: check name -> "ok" or its traceback ("init": the
    join or ``setup`` failed). Always leaves the group.

    NOTE: every rank runs every check in the same order: a check that fails on
    one rank before a collective fails on the others by the group's timeout.
    """
    import torch

    from ember.distributed.parallel_state import destroy_distributed_environment, init_distributed_environment

    torch.set_num_threads(1)
    results: dict[str, str] = {}
    try:
        init_distributed_environment(rank, world, backend=backend, init_method=f"file://{init_file}",
                                     timeout_s=timeout_s / 2)
        if setup is not None:
            setup()
        for name, fn in checks.items():
            try:
                fn()
                results[name] = "ok"
            except Exception:
                results[name] = traceback.format_exc()
    except Exception:
        results["init"] = traceback.format_exc()
    finally:
        Path(work, f"rank{rank}.json").write_text(json.dumps(results))
        destroy_distributed_environment()


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
