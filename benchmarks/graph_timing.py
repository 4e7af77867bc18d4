"""Timing of GPU kernels for the benchmark scripts: calls replayed in one
CUDA graph, so launch gaps do not count, over several copies of the data, so
the weights are not all in L2 between calls."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton


def graph_time_us(fn_per_copy: Callable[[int], object], copies: int) -> float:
    """Median µs per call of ``fn_per_copy(i)`` for ``i`` in ``range(copies)``,
    all of them captured in one CUDA graph and replayed (``triton.testing.do_bench``)."""
    for i in range(copies):
        fn_per_copy(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn_per_copy(i)
    return triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3 / copies
