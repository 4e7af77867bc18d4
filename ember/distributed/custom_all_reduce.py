"""A custom all-reduce for small and medium messages: Triton kernels that read
the other ranks' buffers directly over CUDA IPC (NVLink or PCIe peer access),
for tensor-parallel ranks on one host.

NCCL's all-reduce pays a fixed latency that dominates a decode step's
messages (a few KiB to a few MiB). Here each rank registers one device buffer
at start-up, maps every other rank's buffer into its address space (CUDA IPC
handles exchanged over the tensor-parallel process group), and one kernel
launch does the whole all-reduce (see :mod:`ember.kernels.triton_allreduce`
for the algorithms and their synchronization). The kernel reads the input
tensor and writes the sum back into it, so a call is safe inside a captured
CUDA graph and replays with whatever the input holds.

:class:`~ember.distributed.communicator.Communicator` uses it for the
messages :func:`choose_algorithm` accepts and NCCL for the rest; it is off with
``--disable-custom-all-reduce``, on CPU (gloo), with one rank, over several
hosts, or where a pair of devices lacks peer access. NVLink multicast (NVLS)
is never used.
"""

from __future__ import annotations

import logging
import socket

import torch

logger = logging.getLogger(__name__)

# Largest message (bytes) of the registered buffer: each rank's buffer holds two
# data areas of this size plus a small signal area (about 16 MiB a rank).
DEFAULT_MAX_BYTES = 8 << 20

# Largest message (bytes) the one-shot algorithm takes, by world size; larger
# messages up to CUSTOM_MAX_BYTES take two-shot, the rest NCCL. One-shot has one
# meeting and reads (world - 1) * bytes per rank; two-shot has two meetings and
# reads 2 * (world - 1) / world * bytes, so one-shot wins while latency
# dominates and its lead shrinks with the world size. Starting points from that
# model (vLLM's custom all-reduce switches at similar sizes), not yet measured
# here: retune with ``benchmarks/gpu/custom_all_reduce.py --distinct-devices``
# on each host type.
ONE_SHOT_MAX_BYTES = {2: 1 << 20, 3: 512 << 10, 4: 512 << 10, 5: 256 << 10, 6: 256 << 10, 7: 256 << 10,
                      8: 256 << 10}
# Largest message (bytes) the custom all-reduce takes at all, by world size:
# beyond it NCCL's bandwidth-optimal ring and tree algorithms are as fast.
CUSTOM_MAX_BYTES = {2: 8 << 20, 3: 8 << 20, 4: 8 << 20, 5: 4 << 20, 6: 4 << 20, 7: 4 << 20, 8: 4 << 20}

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def choose_algorithm(nbytes: int, world_size: int, max_bytes: int = DEFAULT_MAX_BYTES) -> str | None:
    """The custom all-reduce's algorithm for a message: ``"one_shot"``,
    ``"two_shot"``, or None where NCCL should take it.

    Args:
        nbytes: the message's size in bytes.
        world_size: ranks of the group (the custom all-reduce needs 2..8).
        max_bytes: the registered buffer's data-area size in bytes.
    """
    if world_size not in ONE_SHOT_MAX_BYTES or nbytes <= 0:
        return None
    if nbytes > min(max_bytes, CUSTOM_MAX_BYTES[world_size]):
        return None
    return "one_shot" if nbytes <= ONE_SHOT_MAX_BYTES[world_size] else "two_shot"


def unsupported_reason(world_size: int, device: torch.device, hosts: list[str] | None = None,
                       devices: list[int] | None = None, peer_access: bool = True) -> str | None:
    """Why this group cannot use the custom all-reduce, or None where it can.

    Args:
        world_size: ranks of the group.
        device: this rank's device.
        hosts, devices: every rank's host name and CUDA device index (None:
            not gathered yet).
        peer_access: whether this rank's device can access every other rank's
            device (peer-to-peer).
    """
    if device.type != "cuda":
        return f"the device is {device.type}, not CUDA"
    if world_size not in ONE_SHOT_MAX_BYTES:
        return f"the group has {world_size} ranks (2..{max(ONE_SHOT_MAX_BYTES)} supported)"
    if hosts is not None and len(set(hosts)) > 1:
        return "the ranks are on several hosts"
    if devices is not None and len(devices) != world_size:
        return "the ranks' devices are unknown"
    if not peer_access:
        return "a pair of devices lacks peer-to-peer access"
    return None


class CustomAllReduce:
    """One rank's registered IPC buffer and the other ranks' mapped buffers.

    Build it with :meth:`create` (collective over the group). The buffer is
    ``buffer_bytes(max_bytes)`` bytes of device memory on each rank.

    Args:
        rank, world_size: this rank in the group and the group's size.
        group: the ``torch.distributed`` process group used to exchange the
            IPC handles (gloo or NCCL; only at construction).
        device: this rank's CUDA device.
        max_bytes: the largest message in bytes (a multiple of 16).

    Attributes:
        error: why this rank cannot use the buffers (a buffer that could not
            be exported or mapped), or None. :meth:`create` gathers it and
            returns None on every rank where any rank has one.
    """

    def __init__(self, rank: int, world_size: int, group: object, device: torch.device,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        import torch.distributed as dist

        from ember.kernels.triton_allreduce import MAX_BLOCKS, buffer_bytes

        self.rank, self.world_size, self.max_bytes = rank, world_size, max_bytes
        self.device = device
        # Zeroed (the signal area's flags start below every value a call waits
        # for) and finished before any rank can see the handle.
        self.buffer = torch.zeros(buffer_bytes(max_bytes), dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        error = None
        try:
            handle = self.buffer.untyped_storage()._share_cuda_()
        except RuntimeError as e:
            handle, error = None, f"rank {rank} cannot export its buffer over CUDA IPC: {e}"
        # Every rank gathers, even one that failed, so that none waits alone.
        handles: list = [None] * world_size
        dist.all_gather_object(handles, handle, group=group)
        # Peer buffers are mapped on this rank's device (the CUDA IPC mapping
        # enables peer access lazily), so no context is created on the peers'
        # devices. NOTE: the storages must outlive every kernel that reads them.
        self._peer_storages: list[torch.UntypedStorage] = []
        addrs = []
        for p, h in enumerate(handles):
            if error is not None:
                break
            if p == rank:
                addrs.append(self.buffer.data_ptr())
                continue
            if h is None:
                error = f"rank {p} cannot export its buffer over CUDA IPC"
                break
            try:
                _, ipc_handle, size_bytes, offset_bytes, rc_handle, rc_offset, event_handle, _ = h
                storage = torch.UntypedStorage._new_shared_cuda(
                    device.index, ipc_handle, size_bytes, offset_bytes, rc_handle, rc_offset, event_handle, False)
            except RuntimeError as e:
                error = f"rank {rank} cannot map rank {p}'s buffer: {e}"
                break
            self._peer_storages.append(storage)
            addrs.append(storage.data_ptr())
        self.error = error
        self.addrs = torch.tensor(addrs if error is None else [0] * world_size, dtype=torch.int64, device=device)
        # Calls made so far, one entry per kernel program (see the kernel).
        self.counter = torch.zeros(MAX_BLOCKS, dtype=torch.int64, device=device)
        torch.cuda.synchronize(device)

    @classmethod
    def create(cls, rank: int, world_size: int, group: object, device: torch.device,
               max_bytes: int = DEFAULT_MAX_BYTES) -> CustomAllReduce | None:
        """Build the custom all-reduce on every rank of ``group``, or return
        None on every rank (NCCL then takes every all-reduce) where the group
        cannot use it (see :func:`unsupported_reason`). Collective: every rank
        of the group must call it, after its CUDA device is set.
        """
        import torch.distributed as dist

        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        reason = unsupported_reason(world_size, device)
        info = (socket.gethostname(), device.index if device.type == "cuda" else None, reason)
        infos: list = [None] * world_size
        dist.all_gather_object(infos, info, group=group)
        reasons = [r for _, _, r in infos if r is not None]
        if not reasons:
            devices = [d for _, d, _ in infos]
            peer_access = all(d == device.index or torch.cuda.can_device_access_peer(device.index, d)
                              for d in devices)
            reason = unsupported_reason(world_size, device, [h for h, _, _ in infos], devices, peer_access)
            ok: list = [None] * world_size
            dist.all_gather_object(ok, reason, group=group)
            reasons = [r for r in ok if r is not None]
        if reasons:
            if rank == 0:
                logger.info(f"custom all-reduce off: {reasons[0]}")
            return None
        car = cls(rank, world_size, group, device, max_bytes)
        errors: list = [None] * world_size
        dist.all_gather_object(errors, car.error, group=group)
        errors = [e for e in errors if e is not None]
        if errors:
            if rank == 0:
                logger.warning(f"custom all-reduce off: {errors[0]}")
            car.close()
            return None
        return car

    def algorithm_for(self, x: torch.Tensor) -> str | None:
        """The algorithm for ``x`` (see :func:`choose_algorithm`), or None
        where NCCL should take it: not on this rank's device, not contiguous,
        or not float32/float16/bfloat16. The same on every rank for the same
        tensor shape and dtype."""
        if self.error is not None or x.device != self.device or x.dtype not in SUPPORTED_DTYPES \
                or not x.is_contiguous():
            return None
        return choose_algorithm(x.numel() * x.element_size(), self.world_size, self.max_bytes)

    def all_reduce(self, x: torch.Tensor, algorithm: str | None = None) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (one kernel launch; safe inside
        a CUDA graph capture).

        Args:
            x: contiguous, float32/float16/bfloat16, on this rank's device, at
                most ``max_bytes`` bytes; the same shape and dtype on every rank.
            algorithm: ``"one_shot"`` or ``"two_shot"``; None: by
                :func:`choose_algorithm` (one-shot beyond its thresholds).

        Returns:
            ``x``, overwritten with the sum.

        Raises:
            ValueError: ``x`` is too large, of an unsupported dtype, or not
                contiguous.
        """
        from ember.kernels.triton_allreduce import all_reduce_ipc

        if x.dtype not in SUPPORTED_DTYPES or not x.is_contiguous() or x.device != self.device:
            raise ValueError(f"the custom all-reduce needs a contiguous float32/float16/bfloat16 tensor on "
                             f"{self.device}, got {x.dtype} on {x.device}")
        if algorithm is None:
            algorithm = choose_algorithm(x.numel() * x.element_size(), self.world_size, self.max_bytes) \
                or "two_shot"
        return all_reduce_ipc(x, self.addrs, self.counter, self.rank, self.world_size, self.max_bytes, algorithm)

    def close(self) -> None:
        """Unmap the peers' buffers (every rank must have finished its calls)."""
        torch.cuda.synchronize(self.device)
        self._peer_storages.clear()
        self.error = self.error or "closed"
