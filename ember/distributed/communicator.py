"""The one communicator the parallel layers use.

Every collective of the model (the row-parallel all-reduce, the vocabulary
embedding's all-reduce, the LM head's gather) goes through the
tensor-parallel group's :class:`Communicator`, so the transport
(torch.distributed over NCCL or gloo, or the custom all-reduce over CUDA IPC of
:mod:`ember.distributed.custom_all_reduce` for small messages) is chosen in one
place. With one rank every operation returns its input, so a single-device
step launches nothing extra.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class CommStats:
    """Collectives counted by :meth:`Communicator.measure`: ``calls``, the
    bytes of their inputs, and their wall time in seconds (each one
    synchronized on CUDA)."""

    calls: int = 0
    bytes: int = 0
    seconds: float = 0.0


class Communicator:
    """Collectives over one process group (``group`` None: a world of one).

    Args:
        rank, world_size: this process's rank and the group's size.
        group: the ``torch.distributed`` process group, or None for one rank.

    The tensors of a collective must have the same shape, dtype and device
    (CUDA with NCCL, CPU with gloo) on every rank, and every rank of the group
    must make the same calls in the same order.

    ``custom_all_reduce`` (set by :meth:`init_custom_all_reduce`) takes the
    all-reduces it accepts (see
    :meth:`~ember.distributed.custom_all_reduce.CustomAllReduce.algorithm_for`);
    torch.distributed takes the rest.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, group: object | None = None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self._stats: CommStats | None = None
        self.custom_all_reduce = None  # CustomAllReduce | None

    def init_custom_all_reduce(self, device: torch.device) -> None:
        """Set up the custom all-reduce over CUDA IPC where the group can use
        it (collective over the group; start-up only, after the CUDA device is
        set). Leaves ``custom_all_reduce`` None with one rank, on CPU, or where
        :meth:`~ember.distributed.custom_all_reduce.CustomAllReduce.create`
        declines."""
        if self.world_size == 1 or torch.device(device).type != "cuda":
            return
        from ember.distributed.custom_all_reduce import CustomAllReduce

        self.custom_all_reduce = CustomAllReduce.create(self.rank, self.world_size, self.group, device)

    @contextlib.contextmanager
    def measure(self) -> Iterator[CommStats]:
        """Count and time this communicator's collectives inside the block.

        For eager measurements only (``ember bench``): each collective is
        synchronized on CUDA before and after, so it must not run inside a
        CUDA graph capture. With one rank nothing is counted (no collective
        runs).
        """
        self._stats = stats = CommStats()
        try:
            yield stats
        finally:
            self._stats = None

    def _timed(self, op, x: torch.Tensor, *args, **kwargs) -> None:
        stats, cuda = self._stats, x.is_cuda
        if cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        op(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize(x.device)
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.bytes += x.numel() * x.element_size()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the ranks (same shape and dtype).

        NOTE: in place: ``x`` itself is overwritten with the sum and returned
        (no copy, so it stays valid inside a captured CUDA graph). A caller
        that still needs its own partial sum must pass a copy. ``x`` must be
        contiguous.
        """
        if self.world_size == 1:
            return x
        car = self.custom_all_reduce
        if car is not None and (algorithm := car.algorithm_for(x)) is not None:
            if self._stats is not None:
                self._timed(car.all_reduce, x, x, algorithm)
            else:
                car.all_reduce(x, algorithm)
            return x
        import torch.distributed as dist

        if self._stats is not None:
            self._timed(dist.all_reduce, x, x, group=self.group)
        else:
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
        if self._stats is not None:
            self._timed(gather_single, x, out, x.contiguous(), group=self.group)
        else:
            gather_single(out, x.contiguous(), group=self.group)
        out = out.view(self.world_size, *x.shape).movedim(0, dim)
        return out.reshape(*x.shape[:dim], self.world_size * x.shape[dim], *x.shape[dim + 1:])

    def all_to_all(self, x: torch.Tensor, output_split_sizes: list[int] | None = None,
                   input_split_sizes: list[int] | None = None) -> torch.Tensor:
        """Rows of ``x`` scattered to the ranks and the rows the ranks sent
        here gathered, in rank order (``all_to_all_single``).

        Args:
            x: [num_rows, ...]; rows ``input_split_sizes[j]`` (in order) go to
                rank ``j``; not modified.
            output_split_sizes: rows received from each rank (host ints,
                ``world_size`` of them); None: ``num_rows / world_size`` each.
            input_split_sizes: rows sent to each rank (host ints summing to
                ``num_rows``); None: ``num_rows / world_size`` each.

        Returns:
            A new tensor [sum(output_split_sizes), ...] of ``x``'s dtype (the
            input itself with one rank).

        NOTE: the split sizes are host integers, so a caller with sizes on the
        device synchronizes to read them: not for use inside a CUDA graph.
        """
        if self.world_size == 1:
            return x
        import torch.distributed as dist

        rows = sum(output_split_sizes) if output_split_sizes is not None else x.shape[0]
        out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        x = x.contiguous()
        if self._stats is not None:
            self._timed(dist.all_to_all_single, x, out, x, output_split_sizes, input_split_sizes, group=self.group)
        else:
            dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=self.group)
        return out
