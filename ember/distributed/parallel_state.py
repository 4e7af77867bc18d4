"""Process groups: the default group, the tensor-parallel group and the
pipeline stages.

Set once per process at start-up and read by the parallel layers; model code
never touches it. A worker process of a multi-rank engine calls
:func:`init_distributed_environment` (which creates the ``torch.distributed``
default group and the tensor-parallel group) and, when it stops,
:func:`destroy_distributed_environment`. A single-device engine calls only
``init_tensor_parallel(0, 1)``: no process group exists then, and
``get_tp_group()`` is a world of one whose collectives are no-ops.
``get_tp_group()`` is the tensor-parallel
:class:`~ember.distributed.communicator.Communicator` every collective goes
through; ``get_pp_group()`` says which pipeline stage this rank is and sends
activations to the next stage (point to point).
"""

from __future__ import annotations

import datetime
import os

import torch

from ember.distributed.communicator import Communicator

_TP = Communicator()
# Whether MoE layers split their experts over the tensor-parallel group
# (expert parallelism) instead of splitting every expert.
_EXPERT_PARALLEL = False
# How MoE layers dispatch tokens to their experts' ranks with expert parallelism
# (see ember.config.EXPERT_PARALLEL_DISPATCHES).
_EP_DISPATCH = "auto"
# Whether MLA attention runs data-parallel over the tensor-parallel group
# (each rank attends its own requests with all heads; see dp_attention).
_DP_ATTENTION = False


class PipelineGroup:
    """This rank's place in the pipeline: stage ``rank`` of ``world_size``.
    Rank r of the world is tensor-parallel rank ``r % tp`` of stage
    ``r // tp``; it exchanges activations with the same tensor-parallel rank
    of the stages before and after it.

    Args:
        rank, world_size: this stage and the number of stages.
        global_rank, tp_size: this process's rank in the default group and
            the tensor-parallel size.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, global_rank: int = 0, tp_size: int = 1) -> None:
        self.rank, self.world_size = rank, world_size
        self.global_rank, self.tp_size = global_rank, tp_size

    @property
    def is_first_rank(self) -> bool:
        return self.rank == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank == self.world_size - 1

    def send_next(self, tensors: list[torch.Tensor]) -> None:
        """Send ``tensors`` (contiguous) to the next stage, in order (blocking).

        Raises:
            RuntimeError: on the last stage.
        """
        if self.is_last_rank:
            raise RuntimeError("the last pipeline stage has no next stage")
        import torch.distributed as dist

        for t in tensors:
            dist.send(t.contiguous(), self.global_rank + self.tp_size)

    def recv_prev(self, tensors: list[torch.Tensor]) -> None:
        """Fill ``tensors`` (their shapes and dtypes must match what the
        previous stage sends) from the previous stage, in order (blocking).

        Raises:
            RuntimeError: on the first stage.
        """
        if self.is_first_rank:
            raise RuntimeError("the first pipeline stage has no previous stage")
        import torch.distributed as dist

        for t in tensors:
            dist.recv(t, self.global_rank - self.tp_size)


_PP = PipelineGroup()

# Seconds a collective (and start-up's rendezvous) may wait for the other
# ranks before it raises, so that a rank that died does not hang the rest.
DEFAULT_TIMEOUT_S = 600.0


def init_tensor_parallel(rank: int, world_size: int, group: object | None = None) -> None:
    """Record this process's tensor-parallel rank and group (start-up only).

    Args:
        rank, world_size: this process's rank in the group and the group's size.
        group: the initialized ``torch.distributed`` process group (None with
            world_size 1).

    Raises:
        ValueError: world_size > 1 without a group, or a rank outside it.
    """
    global _TP
    if not 0 <= rank < world_size:
        raise ValueError(f"tensor-parallel rank {rank} is outside a world of {world_size}")
    if world_size > 1 and group is None:
        raise ValueError("tensor parallelism over several ranks needs an initialized process group")
    _TP = Communicator(rank, world_size, group)


def init_distributed_environment(rank: int, world_size: int, backend: str | None = None,
                                 init_method: str = "env://", tensor_parallel_size: int | None = None,
                                 local_rank: int | None = None,
                                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the ``torch.distributed`` default group and set up the
    tensor-parallel group (start-up of each rank's process).

    The ranks are split into consecutive tensor-parallel groups of
    ``tensor_parallel_size`` ranks (rank r is in group ``r // tp``, as its
    rank ``r % tp``); with one group (the default) it is the whole world.
    Group g is pipeline stage g (see :class:`PipelineGroup`).

    With NCCL, ``NCCL_NVLS_ENABLE`` is set to 0 unless the environment already
    sets it: NVLink SHARP (multicast) buffers cost device memory for no gain
    at the message sizes of a decode step, and not every host supports them.

    Args:
        rank, world_size: this process's global rank and the number of ranks.
        backend: ``"nccl"`` or ``"gloo"``; None: NCCL where CUDA is available,
            else gloo.
        init_method: how the ranks meet (``"env://"`` reads MASTER_ADDR and
            MASTER_PORT; ``"tcp://host:port"``; ``"file:///path"``).
        tensor_parallel_size: ranks per tensor-parallel group (default:
            ``world_size``).
        local_rank: with NCCL, the CUDA device of this process (default:
            ``rank`` modulo the visible devices).
        timeout_s: seconds a collective or the rendezvous waits for the other
            ranks before it raises.

    Raises:
        ValueError: a rank outside the world, a group size that does not
            divide it, or an unknown backend.
        RuntimeError: the default group already exists.
    """
    import torch
    import torch.distributed as dist

    tp = world_size if tensor_parallel_size is None else tensor_parallel_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    if tp < 1 or world_size % tp:
        raise ValueError(f"tensor_parallel_size {tp} must be a positive divisor of the world size {world_size}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"unknown distributed backend {backend!r}; known: gloo, nccl")
    if dist.is_initialized():
        raise RuntimeError("the torch.distributed default group is already initialized")
    device_id = None
    if backend == "nccl":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        device = local_rank if local_rank is not None else rank % torch.cuda.device_count()
        torch.cuda.set_device(device)
        device_id = torch.device("cuda", device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    global _PP
    _PP = PipelineGroup(rank // tp, world_size // tp, rank, tp)
    if tp == world_size:
        init_tensor_parallel(rank, tp, dist.group.WORLD if tp > 1 else None)
        return
    # Every rank creates every group (new_group is collective over the world).
    mine = None
    for start in range(0, world_size, tp):
        group = dist.new_group(list(range(start, start + tp)), timeout=datetime.timedelta(seconds=timeout_s))
        if start <= rank < start + tp:
            mine = group
    init_tensor_parallel(rank % tp, tp, mine if tp > 1 else None)


def set_expert_parallel(enabled: bool, dispatch: str = "auto") -> None:
    """Record whether MoE layers shard whole experts over the tensor-parallel
    group, and how they dispatch tokens to them (``"auto"``, ``"allreduce"``
    or ``"alltoall"``, see :class:`ember.layers.moe.FusedMoE`); start-up only,
    before the model is built."""
    global _EXPERT_PARALLEL, _EP_DISPATCH
    _EXPERT_PARALLEL = bool(enabled)
    _EP_DISPATCH = dispatch


def get_ep_size() -> int:
    """Ranks the experts of an MoE layer are split over: the tensor-parallel
    size with expert parallelism, else 1."""
    return _TP.world_size if _EXPERT_PARALLEL else 1


def get_ep_rank() -> int:
    return _TP.rank if _EXPERT_PARALLEL else 0


def get_ep_dispatch() -> str:
    """The expert-parallel dispatch form given to :func:`set_expert_parallel`."""
    return _EP_DISPATCH


def set_dp_attention(enabled: bool) -> None:
    """Record whether MLA attention runs data-parallel over the
    tensor-parallel group (start-up only, before the model is built): its
    weights are then replicated on every rank."""
    global _DP_ATTENTION
    _DP_ATTENTION = bool(enabled)


def is_dp_attention() -> bool:
    return _DP_ATTENTION


def destroy_distributed_environment() -> None:
    """Leave every process group and reset the tensor-parallel state to a
    world of one (a no-op where no group exists)."""
    global _TP, _EXPERT_PARALLEL, _PP, _EP_DISPATCH, _DP_ATTENTION
    if _TP.custom_all_reduce is not None:
        _TP.custom_all_reduce.close()
    _TP = Communicator()
    _PP = PipelineGroup()
    _EXPERT_PARALLEL = False
    _EP_DISPATCH = "auto"
    _DP_ATTENTION = False
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_tp_group() -> Communicator:
    """The tensor-parallel group's communicator."""
    return _TP


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.world_size


def get_pp_group() -> PipelineGroup:
    """This rank's pipeline stage (a single stage without a process group)."""
    return _PP
