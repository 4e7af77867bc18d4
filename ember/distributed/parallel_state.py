"""Tensor-parallel process-group state.

Set once per process at start-up (``init_tensor_parallel``) and read by the
parallel layers; model code never touches it. ``get_tp_group()`` is the
tensor-parallel :class:`~ember.distributed.communicator.Communicator` every
collective goes through (a world of one: every collective is a no-op).
"""

from __future__ import annotations

from ember.distributed.communicator import Communicator

_TP = Communicator()


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


def get_tp_group() -> Communicator:
    """The tensor-parallel group's communicator."""
    return _TP


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.world_size
