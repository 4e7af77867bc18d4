"""All-reduce kernels over peer buffers mapped with CUDA IPC (one host).

Each rank owns one registered buffer, mapped into every other rank's address
space (see :mod:`ember.distributed.custom_all_reduce`), laid out as::

    [signal area: SIGNAL_BYTES] [data area 0: area_bytes] [data area 1: area_bytes]

The signal area holds one int64 flag per (program, source rank):
``flags[program * MAX_WORLD + src]``. Program ``b`` of rank ``src`` raises its
flag in every rank's signal area (a release store at system scope) and waits
until its own signal area holds the flags of all ranks' program ``b`` (acquire
loads). Programs only ever wait on the same program of the other ranks, and
each program reads only what the same program of the other ranks wrote, so the
ranks meet program by program without a grid-wide barrier.

Two algorithms (both sum in float32, adding the ranks in rank order, so every
rank gets bitwise the same result):

* one-shot: each rank copies its input into its data area, meets the others,
  then reads every rank's copy and writes the sum into its input. One meeting;
  each rank reads ``(world - 1) * bytes`` from its peers. For small messages.
* two-shot: reduce-scatter then all-gather through the data areas. Rank ``r``
  sums slice ``r`` of every rank's copy (writing it back into its own data area),
  then, after a second meeting, gathers the other ranks' reduced slices. Each
  rank reads ``2 * (world - 1) / world * bytes``. For medium messages.

Flag values and the data area in use come from a per-program int64 counter on
the device (``calls``, the number of all-reduces before this one), read and
advanced by the kernel itself, so a captured CUDA graph replays correctly and
eager calls and replays can be mixed. The meeting of call ``c`` waits for flag
values ``>= 2c + 1`` (one-shot, two-shot's first meeting) and ``>= 2c + 2``
(two-shot's second): flags only grow, so a fast rank that already raised a
later value never hides an earlier one. Call ``c`` uses data area ``c % 2``:
call ``c + 2`` overwrites it only after every rank met in call ``c + 1``, which
each rank enters only after it finished reading in call ``c``; so no meeting
at the end of a call is needed.

Ideas from the one-shot/two-shot all-reduce of vLLM and TensorRT-LLM (written
independently here, in Triton). No NVLink multicast (NVLS) is used.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Ranks a buffer has flag slots for, and programs (CTAs) a call may use.
MAX_WORLD = 8
MAX_BLOCKS = 32
# int64 flags of the signal area (a multiple of 16 bytes, so the data areas
# stay 16-byte aligned).
SIGNAL_BYTES = MAX_BLOCKS * MAX_WORLD * 8
# Elements one program handles per step (16 bytes a thread for 16-bit types
# with 4 warps).
DEFAULT_BLOCK = 1024

ALGORITHMS = ("one_shot", "two_shot")


def buffer_bytes(area_bytes: int) -> int:
    """Bytes of one rank's registered buffer for messages of up to
    ``area_bytes`` bytes (a multiple of 16)."""
    if area_bytes <= 0 or area_bytes % 16:
        raise ValueError(f"area_bytes must be a positive multiple of 16, got {area_bytes}")
    return SIGNAL_BYTES + 2 * area_bytes


@triton.jit
def _data_area(addrs_ptr, p, area_off, x_ptr):
    # Rank p's data area in use, as a pointer to x's element type.
    return (tl.load(addrs_ptr + p) + area_off).to(x_ptr.dtype)


@triton.jit
def _at(area, offs):
    # ``area + offs`` for offsets that start blocks of BLOCK elements. A data
    # area starts 16-byte aligned, which the compiler cannot know of an
    # address loaded from memory: saying so keeps the accesses vectorized.
    return tl.multiple_of(area + offs, 16)


@triton.jit
def _meet(addrs_ptr, b, value, RANK: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
          MAX_WORLD: tl.constexpr):
    # Every thread's earlier stores happen before the release below (bar.sync
    # orders them within the program; the release makes them visible to the
    # ranks that acquire the flag).
    tl.debug_barrier()
    peers = tl.arange(0, WORLD_P2)
    pmask = peers < WORLD
    bases = tl.load(addrs_ptr + peers, mask=pmask, other=0)
    remote = bases.to(tl.pointer_type(tl.int64)) + (b * MAX_WORLD + RANK)
    raised = tl.zeros([WORLD_P2], dtype=tl.int64) + value
    tl.atomic_xchg(remote, raised, mask=pmask, sem="release", scope="sys")
    own = tl.load(addrs_ptr + RANK).to(tl.pointer_type(tl.int64)) + b * MAX_WORLD + peers
    zero = tl.zeros([WORLD_P2], dtype=tl.int64)
    # Poll until every rank's flag reached ``value``. The loop carries a
    # scalar rather than the tensor of flags: Triton 3.6's layout passes
    # crash on a while loop that carries a tensor it does not return.
    pending = 1
    while pending != 0:
        seen = tl.atomic_add(own, zero, mask=pmask, sem="acquire", scope="sys")
        pending = (tl.min(tl.where(pmask, seen, value)) < value).to(tl.int32)
    # The other threads read peer data only after the acquire above.
    tl.debug_barrier()


@triton.jit
def _all_reduce_kernel(x_ptr, addrs_ptr, counter_ptr, n, slice_elems, area_bytes,
                       RANK: tl.constexpr, WORLD: tl.constexpr, WORLD_P2: tl.constexpr,
                       MAX_WORLD: tl.constexpr, MAX_BLOCKS: tl.constexpr, SIGNAL_BYTES: tl.constexpr,
                       TWO_SHOT: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    nb = tl.num_programs(0)
    calls = tl.load(counter_ptr + b)
    area_off = SIGNAL_BYTES + (calls % 2) * area_bytes
    mine = _data_area(addrs_ptr, RANK, area_off, x_ptr)
    ar = tl.arange(0, BLOCK)
    if TWO_SHOT:
        # Slice s is elements [s * slice_elems, (s + 1) * slice_elems) (a
        # multiple of BLOCK); program b handles blocks b, b + nb, ... of
        # every slice.
        nblk = slice_elems // BLOCK
        iters = tl.cdiv(nblk, nb)
        for s in tl.static_range(WORLD):
            for j in range(iters):
                blk = j * nb + b
                offs = s * slice_elems + blk * BLOCK + ar
                m = (blk * BLOCK + ar < slice_elems) & (offs < n)
                tl.store(_at(mine, offs), tl.load(x_ptr + offs, mask=m), mask=m)
        _meet(addrs_ptr, b, 2 * calls + 1, RANK, WORLD, WORLD_P2, MAX_WORLD)
        # Reduce-scatter: this rank's slice, summed over the ranks in rank order.
        for j in range(iters):
            blk = j * nb + b
            offs = RANK * slice_elems + blk * BLOCK + ar
            m = (blk * BLOCK + ar < slice_elems) & (offs < n)
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for p in tl.static_range(WORLD):
                acc += tl.load(_at(_data_area(addrs_ptr, p, area_off, x_ptr), offs), mask=m, other=0.0).to(tl.float32)
            out = acc.to(x_ptr.dtype.element_ty)
            tl.store(_at(mine, offs), out, mask=m)
            tl.store(x_ptr + offs, out, mask=m)
        _meet(addrs_ptr, b, 2 * calls + 2, RANK, WORLD, WORLD_P2, MAX_WORLD)
        # All-gather: the other ranks' reduced slices.
        for s in tl.static_range(WORLD):
            if s != RANK:
                peer = _data_area(addrs_ptr, s, area_off, x_ptr)
                for j in range(iters):
                    blk = j * nb + b
                    offs = s * slice_elems + blk * BLOCK + ar
                    m = (blk * BLOCK + ar < slice_elems) & (offs < n)
                    tl.store(x_ptr + offs, tl.load(_at(peer, offs), mask=m), mask=m)
    else:
        # Program b handles blocks b, b + nb, ... of the message.
        iters = tl.cdiv(n, nb * BLOCK)
        for j in range(iters):
            offs = (j * nb + b) * BLOCK + ar
            m = offs < n
            tl.store(_at(mine, offs), tl.load(x_ptr + offs, mask=m), mask=m)
        _meet(addrs_ptr, b, 2 * calls + 1, RANK, WORLD, WORLD_P2, MAX_WORLD)
        for j in range(iters):
            offs = (j * nb + b) * BLOCK + ar
            m = offs < n
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for p in tl.static_range(WORLD):
                acc += tl.load(_at(_data_area(addrs_ptr, p, area_off, x_ptr), offs), mask=m, other=0.0).to(tl.float32)
            tl.store(x_ptr + offs, acc.to(x_ptr.dtype.element_ty), mask=m)
    # Advance the call counter: this program's entry, and (program 0) the
    # entries of the programs this call did not launch, so that every entry
    # counts every call. No other program reads these entries in this call.
    tl.store(counter_ptr + b, calls + 1)
    if b == 0:
        rest = tl.arange(0, MAX_BLOCKS)
        tl.store(counter_ptr + rest, tl.zeros([MAX_BLOCKS], dtype=tl.int64) + (calls + 1), mask=rest >= nb)


def launch_plan(numel: int, world_size: int, algorithm: str, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """``(programs, slice_elems)`` of a call: the grid, and for two-shot the
    elements of each rank's slice (a multiple of ``block``; 0 for one-shot).

    Raises:
        ValueError: an unknown algorithm or an empty message.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if numel <= 0:
        raise ValueError("an all-reduce needs at least one element")
    if algorithm == "one_shot":
        return min(MAX_BLOCKS, triton.cdiv(numel, block)), 0
    slice_elems = triton.cdiv(triton.cdiv(numel, world_size), block) * block
    return min(MAX_BLOCKS, slice_elems // block), slice_elems


def all_reduce_ipc(x: torch.Tensor, addrs: torch.Tensor, counter: torch.Tensor, rank: int, world_size: int,
                   area_bytes: int, algorithm: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """Sum ``x`` over the ranks whose buffers ``addrs`` lists, in place.

    Every rank must make the same calls (same numel, dtype and algorithm) in
    the same order, each on its own stream; the call returns once launched.

    Args:
        x: this rank's input, contiguous, any shape, float32/float16/bfloat16,
            at most ``area_bytes`` bytes; overwritten with the sum.
        addrs: int64 [world_size] on x's device: the base address of every
            rank's registered buffer (see :func:`buffer_bytes`), as mapped in
            this process.
        counter: int64 [MAX_BLOCKS] on x's device, zero at start, owned by
            this rank and advanced by every call (the call count).
        rank, world_size: this rank and the number of ranks (2..MAX_WORLD).
        area_bytes: bytes of each data area of the buffers.
        algorithm: ``"one_shot"`` or ``"two_shot"``.
        block: elements a program handles per step (a power of two, >= 16).

    Returns:
        ``x``.
    """
    n = x.numel()
    if n * x.element_size() > area_bytes:
        raise ValueError(f"{n * x.element_size()} bytes exceed the registered data area ({area_bytes} bytes)")
    if not 1 <= world_size <= MAX_WORLD:
        raise ValueError(f"world_size {world_size} outside 1..{MAX_WORLD}")
    programs, slice_elems = launch_plan(n, world_size, algorithm, block)
    _all_reduce_kernel[(programs,)](
        x, addrs, counter, n, slice_elems, area_bytes, RANK=rank, WORLD=world_size,
        WORLD_P2=max(2, triton.next_power_of_2(world_size)), MAX_WORLD=MAX_WORLD, MAX_BLOCKS=MAX_BLOCKS,
        SIGNAL_BYTES=SIGNAL_BYTES, TWO_SHOT=algorithm == "two_shot", BLOCK=block, num_warps=4)
    return x
