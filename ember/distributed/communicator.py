"""The one communicator the parallel layers use.

Every collective of the model (the row-parallel all-reduce, the vocabulary
embedding's all-reduce, the LM head's gather) goes through the
tensor-parallel group's :class:`Communicator`, so the transport
(torch.distributed over NCCL or gloo, a custom all-reduce later) is chosen in
one place. With one rank every operation returns its input, so a single-device
step launches nothing extra.
"""

from __future__ import annotations

import torch


class Communicator:
    """Collectives over one process group (``group`` None: a world of one).

    Args:
        rank, world_size: this process's rank and the group's size.
        group: the ``torch.distributed`` process group, or None for one rank.

    The tensors of a collective must have the same shape, dtype and device
    (CUDA with NCCL, CPU with gloo) on every rank, and every rank of the group
    must make the same calls in the same order.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: object | None = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (same shape and dtype).

        NOTE: in place: ``x`` itself is overwritten with the sum and returned
        (no copy, so it stays valid inside a captured CUDA graph). A caller
        that still needs its own partial sum must pass a copy. ``x`` must be
        contiguous.
        """
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The ranks' ``x`` concatenated along ``dim``, in rank order.

        Args:
            x: this rank's part, at least 1-D (e.g. [num_tokens, vocab / tp] of
                the LM head's logits); not modified.
            dim: the dimension to concatenate along (negative counts from the
                end).

        Returns:
            A new tensor whose ``dim`` is ``world_size`` times ``x``'s (the
            input itself with one rank).
        """
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        dim = dim % x.dim()
        # One collective into a buffer of the parts stacked along dim 0 (the
        # form every backend takes), seen as [world_size, *x.shape]; the rank
        # axis is then folded into ``dim`` (a copy only when ``dim`` is not 0).
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather_single(out, x.contiguous(), group=self.group)
        out = out.view(self.world_size, *x.shape).movedim(0, dim)
        return out.reshape(*x.shape[:dim], self.world_size * x.shape[dim], *x.shape[dim + 1:])
