"""The ladders of captured sizes (CPU: no graph is captured here; the graphs
themselves are checked on a GPU by tests/engine/test_gpu_engine.py)."""

from __future__ import annotations

from ember.worker.cuda_graph import capture_sizes, piecewise_sizes


def test_decode_batch_sizes() -> None:
    assert capture_sizes(256)[:5] == [1, 2, 4, 8, 16] and capture_sizes(256)[-1] == 256
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(300)[-3:] == [272, 288, 300]
    assert capture_sizes(1024)[-2:] == [496, 512]  # larger batches run eagerly


def test_piecewise_token_counts_cover_every_step_with_little_padding() -> None:
    sizes = piecewise_sizes(2048)
    assert sizes[0] == 16 and sizes[-1] == 2048 and sizes == sorted(set(sizes))
    for n in range(129, 2049):  # above 128 tokens a step pads by under 128 (to 1024) or 256 tokens
        padded = next(s for s in sizes if s >= n)
        assert padded - n < (128 if n <= 1024 else 256)
    assert piecewise_sizes(1100)[-3:] == [896, 1024, 1100]  # the budget itself is captured
    assert piecewise_sizes(100) == [16, 32, 64, 100]
