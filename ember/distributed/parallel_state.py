"""Tensor-parallel process-group state.

Set once per process at start-up (``init_tensor_parallel``) and read by the
parallel linear layers; model code never touches it. Only a world of one
(tp_size 1) exists today: multi-GPU runs will create the NCCL group here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TensorParallelState:
    rank: int = 0
    world_size: int = 1


_TP = TensorParallelState()


def init_tensor_parallel(rank: int, world_size: int) -> None:
    """Record this process's tensor-parallel rank (start-up only).

    Raises:
        NotImplementedError: world_size > 1 (no collective ops yet).
    """
    global _TP
    if world_size != 1:
        raise NotImplementedError("tensor parallelism over several devices is not implemented yet")
    _TP = TensorParallelState(rank, world_size)


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.world_size
