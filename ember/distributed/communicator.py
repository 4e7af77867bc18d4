"""The one communicator the parallel layers use.

Every collective of the model (the row-parallel all-reduce, the LM head's
gather) goes through the tensor-parallel group's :class:`Communicator`, so the
transport (torch.distributed over NCCL or gloo, a custom all-reduce later) is
chosen in one place. With one rank every operation returns its input.
"""

from __future__ import annotations

import torch


class Communicator:
    """Collectives over one process group (``group`` None: a world of one).

    Args:
        rank, world_size: this process's rank and the group's size.
        group: the ``torch.distributed`` process group, or None for one rank.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: object | None = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (same shape and dtype)."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim``, in rank order."""
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)
