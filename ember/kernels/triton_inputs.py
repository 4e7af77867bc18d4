"""Triton kernels that spread a decode step's (or a verification step's)
staged inputs into the CUDA graph's persistent buffers (CUDA only).

A decode step's inputs reach the device in one host-to-device copy of a packed
int64 buffer (``CUDAGraphRunner.run``). Spreading it with PyTorch took a copy
per buffer, two kernels for the token ids still in flight (asynchronous
scheduling) and two fills for the padding rows: up to nine small kernels before
every replay, about 2 us of GPU time each at batch 1. This kernel does all of
it in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["n", "width", "stride_bt"])
def _unpack_decode_inputs_kernel(Stage, Last, InputIds, Positions, SlotMapping, SeqLens, BlockTable,
                                 n, width, stride_bt, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if row < n:
        token = tl.load(Stage + row)
        if token < 0:  # still in flight: row -token - 1 of the previous step's sampled ids
            token = tl.load(Last + (-token - 1))
        tl.store(InputIds + row, token)
        tl.store(Positions + row, tl.load(Stage + n + row))
        tl.store(SlotMapping + row, tl.load(Stage + 2 * n + row))
        tl.store(SeqLens + row, tl.load(Stage + 3 * n + row).to(tl.int32))
        src = Stage + 4 * n + row * width
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            tl.store(BlockTable + row * stride_bt + cols, tl.load(src + cols, mask=mask).to(tl.int32), mask=mask)
    else:  # padding row of the captured batch size: reads and writes no KV
        tl.store(SlotMapping + row, -1)
        tl.store(SeqLens + row, 0)


def unpack_decode_inputs(stage: torch.Tensor, n: int, width: int, last_sampled: torch.Tensor | None,
                         input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                         seq_lens: torch.Tensor, block_table: torch.Tensor, batch_size: int) -> None:
    """Spread a packed decode step into the graph buffers, in one kernel.

    Args:
        stage: int64 on the device: ``[input_ids (n) | positions (n) |
            slot_mapping (n) | seq_lens (n) | block_table rows (n * width)]``. An
            input id ``-(j + 1)`` stands for ``last_sampled[j]`` (a token the
            previous step is still sampling).
        n: requests in the step; ``width``: block-table columns staged per row.
        last_sampled: the previous step's sampled ids [rows] int64 (None if no
            id refers to it).
        input_ids, positions, slot_mapping: [>= batch_size] int64 buffers.
        seq_lens: [>= batch_size] int32. block_table: [>= n, >= width] int32,
            unit stride along columns.
        batch_size: the captured size the step replays (>= n); rows n..batch_size-1
            get slot -1 and sequence length 0 (padding).
    """
    last = last_sampled if last_sampled is not None else input_ids
    _unpack_decode_inputs_kernel[(batch_size,)](
        stage, last, input_ids, positions, slot_mapping, seq_lens, block_table, n, width, block_table.stride(0),
        BLOCK=256, num_warps=1)  # NOTE: fixed: a tile that followed the width would compile anew mid-serving


@triton.jit(do_not_specialize=["n", "width", "stride_bt"])
def _unpack_verify_inputs_kernel(Stage, Last, InputIds, Positions, SlotMapping, SeqLens, BlockTable, n, width,
                                 stride_bt, QUERY_LEN: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = offs_q < QUERY_LEN
    rows = req * QUERY_LEN + offs_q
    if req < n:
        num_tokens = n * QUERY_LEN
        tokens = tl.load(Stage + rows, mask=mask_q, other=0)
        on_device = mask_q & (tokens < 0)  # entry -token - 1 of Last
        tokens = tl.where(on_device, tl.load(Last + (-tokens - 1), mask=on_device, other=0), tokens)
        tl.store(InputIds + rows, tokens, mask=mask_q)
        tl.store(Positions + rows, tl.load(Stage + num_tokens + rows, mask=mask_q), mask=mask_q)
        tl.store(SlotMapping + rows, tl.load(Stage + 2 * num_tokens + rows, mask=mask_q), mask=mask_q)
        tl.store(SeqLens + req, tl.load(Stage + 3 * num_tokens + req).to(tl.int32))
        src = Stage + 3 * num_tokens + n + req * width
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < width
            tl.store(BlockTable + req * stride_bt + cols, tl.load(src + cols, mask=mask).to(tl.int32), mask=mask)
    else:  # padding request of the captured batch size: reads and writes no KV
        tl.store(SlotMapping + rows, tl.full([BLOCK_Q], -1, tl.int64), mask=mask_q)
        tl.store(SeqLens + req, 0)


def unpack_verify_inputs(stage: torch.Tensor, n: int, query_len: int, width: int, last: torch.Tensor | None,
                         input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                         seq_lens: torch.Tensor, block_table: torch.Tensor, batch_size: int) -> None:
    """Spread a packed verification step (``query_len`` tokens per request)
    into the verification graph's buffers, in one kernel.

    Args:
        stage: int64 on the device: ``[input_ids (n * query_len) | positions
            (n * query_len) | slot_mapping (n * query_len) | seq_lens (n) |
            block_table rows (n * width)]`` (see
            :func:`ember.worker.cuda_graph.stage_verify_inputs`). An input id
            ``-(j + 1)`` stands for ``last[j]`` (a token only the device holds:
            a draft the worker proposed).
        n: requests in the step; ``width``: block-table columns staged per row.
        last: int64 on the device (None if no id refers to it).
        input_ids, positions, slot_mapping: [>= batch_size * query_len] int64.
        seq_lens: [>= batch_size] int32. block_table: [>= n, >= width] int32,
            unit stride along columns.
        batch_size: the captured batch size the step replays (>= n); requests
            n..batch_size-1 get slots -1 and sequence length 0 (padding; their
            ids and positions keep earlier, valid values).
    """
    _unpack_verify_inputs_kernel[(batch_size,)](
        stage, last if last is not None else input_ids, input_ids, positions, slot_mapping, seq_lens, block_table,
        n, width, block_table.stride(0),
        QUERY_LEN=query_len, BLOCK_Q=triton.next_power_of_2(query_len), BLOCK=256, num_warps=1)
