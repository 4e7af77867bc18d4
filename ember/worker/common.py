"""What the model runner and the draft-model proposer share: a step's packed
host inputs, building a model under a default dtype, and random weights for
``--load-format dummy``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ember.layers.attention.backend import AttentionMetadata


@dataclass(slots=True)
class HostInputs:
    """One step's packed inputs on the host (numpy), before any device copy.

    Shapes: ``input_ids``, ``positions``, ``slot_mapping``: [num_tokens] int64;
    ``query_start_loc``: [num_reqs + 1] int32; ``seq_lens``: [num_reqs] int32;
    ``block_table``: [num_reqs, max_blocks] int32. ``in_flight_dst`` /
    ``in_flight_src``: the input positions whose token only the device holds
    (one the previous step is still sampling, or a draft the worker
    proposed), and that token's index in ``in_flight_source`` (int64 on the
    device: the previous step's sampled ids, or the proposer's table).
    ``draft_offsets``: for a step verifying the worker's proposals, per
    request the index of its first draft in ``in_flight_source``.
    ``sample_seq_lens``: per sampling request, its tokens once the step is done
    (the sampled token's position).
    """

    input_ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    query_start_loc: np.ndarray
    seq_lens: np.ndarray
    block_table: np.ndarray
    max_query_len: int
    sample_req_ids: list[str]
    sample_rows: list[int]
    num_decodes: int = 0
    req_ids: list[str] = field(default_factory=list)  # the packing order
    in_flight_dst: list[int] = field(default_factory=list)
    in_flight_src: list[int] = field(default_factory=list)
    sample_seq_lens: list[int] = field(default_factory=list)
    in_flight_source: torch.Tensor | None = None
    draft_offsets: dict[str, int] = field(default_factory=dict)


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """``a`` as a tensor on ``device``, its copy queued on the current stream
    without the host waiting. On CUDA the array goes through pinned memory
    (PyTorch's caching host allocator, which keeps the block until the copy
    is done): a copy from pageable memory may wait for the work already
    queued on the stream ("API synchronization behavior", CUDA Runtime API)."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


class HostCopy:
    """A device tensor's copy to the host, started when made: on CUDA a
    non-blocking copy into pinned memory with an event recorded behind it,
    so that reading it (:meth:`tolist`) waits for the work queued before the
    copy only, not for what is launched after it. Elsewhere the tensor itself."""

    def __init__(self, t: torch.Tensor) -> None:
        self._host, self._event = t, None
        if t.is_cuda:
            self._host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()

    def tolist(self) -> list:
        """The values as (nested) Python lists; waits for the copy."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def device_inputs(host: HostInputs, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``host``'s token ids, positions and attention metadata on ``device``
    (each array through :func:`to_device`), with the ids that only the device
    holds copied into the token ids (:func:`copy_in_flight`)."""
    meta = AttentionMetadata(
        slot_mapping=to_device(host.slot_mapping, device),
        query_start_loc=to_device(host.query_start_loc, device),
        seq_lens=to_device(host.seq_lens, device),
        block_table=to_device(host.block_table, device),
        max_query_len=host.max_query_len,
        max_seq_len=int(host.seq_lens.max(initial=0)),
        query_start_loc_cpu=host.query_start_loc.tolist(),
        seq_lens_cpu=host.seq_lens.tolist(),
        num_decodes=host.num_decodes,
    )
    input_ids = to_device(host.input_ids, device)
    if host.in_flight_dst:
        copy_in_flight(input_ids, host.in_flight_dst, host.in_flight_source, host.in_flight_src)
    return input_ids, to_device(host.positions, device), meta


def copy_in_flight(out: torch.Tensor, dst: list[int], source: torch.Tensor, src: list[int]) -> None:
    """``out[dst[i]] = source[src[i]]``: ids that only the device holds (see
    :class:`HostInputs`) copied into ``out`` (1-D int64, ``source``'s device). The
    indices go to the device asynchronously and the copy is queued in stream
    order after the step that computes ``source``: the host does not wait."""
    def index(a: list[int]) -> torch.Tensor:
        return to_device(np.array(a, dtype=np.int64), out.device)

    out.index_copy_(0, index(dst), source.index_select(0, index(src)))


def shifted_slots(positions: torch.Tensor, block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slot of each decode row's position, on the device: row ``i`` at
    ``positions[i]`` ([n] int64) writes ``block_table[i, pos // block_size]
    * block_size + pos % block_size`` ([n] int64; ``block_table`` [>= n,
    max_blocks] int32)."""
    n = positions.shape[0]
    blocks = block_table[:n].gather(1, (positions // block_size).unsqueeze(1)).squeeze(1).to(torch.int64)
    return blocks * block_size + positions % block_size


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def fill_dummy(t: torch.Tensor, gen: torch.Generator) -> None:
    """Random weights for ``--load-format dummy`` (speed depends on shapes, not
    values): floating tensors uniform in [-0.05, 0.05) (drawn in float32 and
    cast for dtypes ``uniform_`` lacks, e.g. FP8), integer ones (packed
    quantized weights, indices) random over their dtype's range."""
    if t.is_floating_point():
        if t.element_size() >= 2:
            t.uniform_(-0.05, 0.05, generator=gen)
        else:
            t.copy_(torch.empty(t.shape, dtype=torch.float32, device=t.device).uniform_(-0.05, 0.05, generator=gen))
    elif t.dtype != torch.bool:
        info = torch.iinfo(t.dtype)
        t.random_(info.min, info.max, generator=gen)
