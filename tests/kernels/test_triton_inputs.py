"""The decode-step input scatter (``unpack_decode_inputs``) against the
buffers it replaces: on CUDA, and without it on CPU in Triton's interpreter
(tests/kernels/interpret.py)."""

import numpy as np
import pytest
import torch

from tests.kernels.interpret import DEVICE

pytest.importorskip("triton")

from ember.kernels.triton_inputs import unpack_decode_inputs  # noqa: E402


def _buffers(rows, cols):
    dev = DEVICE
    return (torch.full((rows,), 5, dtype=torch.int64, device=dev), torch.zeros(rows, dtype=torch.int64, device=dev),
            torch.full((rows,), 9, dtype=torch.int64, device=dev), torch.full((rows,), 9, dtype=torch.int32, device=dev),
            torch.full((rows, cols), -7, dtype=torch.int32, device=dev))


@pytest.mark.parametrize("n,width,bs", [(1, 1, 1), (3, 5, 4), (16, 600, 24)])
def test_spreads_the_stage_and_pads(n, width, bs):
    rng = np.random.default_rng(n)
    ids, pos, slots = (rng.integers(0, 1 << 40, n) for _ in range(3))
    seq_lens = rng.integers(1, 1 << 20, n)
    table = rng.integers(0, 1 << 30, (n, width))
    stage = np.concatenate([ids, pos, slots, seq_lens, table.reshape(-1)]).astype(np.int64)
    last = torch.tensor([7, 8, 99], dtype=torch.int64, device=DEVICE)
    stage[n - 1] = -1 - 2  # the last request's token is still in flight: last[2]
    bufs = _buffers(32, 700)
    unpack_decode_inputs(torch.from_numpy(stage).to(DEVICE), n, width, last, *bufs, bs)
    input_ids, positions, slot_mapping, lens, block_table = (b.cpu() for b in bufs)
    assert input_ids[:n - 1].tolist() == ids[:n - 1].tolist() and input_ids[n - 1] == 99
    assert positions[:n].tolist() == pos.tolist() and slot_mapping[:n].tolist() == slots.tolist()
    assert lens[:n].tolist() == seq_lens.tolist() and lens.dtype == torch.int32
    assert torch.equal(block_table[:n, :width], torch.from_numpy(table).int())
    assert (block_table[:, width:] == -7).all() and (block_table[n:] == -7).all()  # nothing else written
    assert (slot_mapping[n:bs] == -1).all() and (lens[n:bs] == 0).all()  # padding rows
    assert (slot_mapping[bs:] == 9).all() and (input_ids[n:] == 5).all()
