"""Data-parallel attention for MLA models (``--enable-dp-attention``).

With tensor parallelism alone, an MLA model splits its heads over the ranks,
but the cached latent (``kv_lora_rank + qk_rope_head_dim`` per token) is the
same for every head, so every rank stores the whole latent cache. With
data-parallel attention (the idea of SGLang's "DP attention") each of the
``tp`` ranks attends a disjoint share of the requests with all heads (the
attention weights are replicated) and stores only those requests' latents;
the MLP / MoE layers stay tensor-parallel and see every token:

- the scheduler's KV pool is cut into ``tp`` equal partitions of consecutive
  block ids (rank r: ``[r * P, (r + 1) * P)``, ``P`` the blocks of one rank's
  cache) and each request draws all its blocks from one partition, chosen when
  it is admitted (see :class:`ember.core.kv_cache_manager.KVCacheManager`);
  so a request's rank is ``block_ids[0] // P``, and rank r's cache tensor
  holds only its ``P`` blocks (block id ``b`` at ``b - r * P``);
- every rank receives the whole step and packs it rank by rank (rank 0's
  requests first, decodes first within each rank); it embeds every token,
  keeps its own rows ``[start, end)`` (:class:`DPAttentionLayout`), and
  before each MLP / MoE the ranks all-gather their rows' hidden states; after
  it each rank keeps its own rows again. The final hidden states are gathered
  once more, so the logits and sampling see the whole step on every rank, as
  with tensor parallelism alone.

The residual stream of a rank is ``[end - start, hidden]``; the MLP's
all-reduce over ``[num_tokens, hidden]`` is unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ember.distributed.parallel_state import get_tp_group

if TYPE_CHECKING:
    from ember.worker.common import HostInputs


@dataclass
class DPAttentionLayout:
    """Which rows of a step's packed tokens each rank attends.

    Attributes:
        counts: tokens of each rank, in rank order (the step packs rank 0's
            rows first, then rank 1's, ...).
        rank: this rank.
    """

    counts: list[int]
    rank: int
    _unpad: torch.Tensor | None = None

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def end(self) -> int:
        return self.start + self.counts[self.rank]

    @property
    def num_local(self) -> int:
        return self.counts[self.rank]

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of ``x`` ([num_tokens, ...] -> [num_local, ...]; a view)."""
        return x[self.start: self.end]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, in packing order: [num_local, ...] ->
        [num_tokens, ...]. One all-gather over the tensor-parallel group,
        each rank's part padded to the largest (every rank must call it)."""
        pad = max(self.counts)
        n = x.shape[0]
        if n < pad:
            x = torch.cat([x, x.new_zeros(pad - n, *x.shape[1:])])
        full = get_tp_group().all_gather(x, dim=0)
        if all(c == pad for c in self.counts):
            return full
        if self._unpad is None:
            rows = np.concatenate([np.arange(r * pad, r * pad + c) for r, c in enumerate(self.counts)])
            self._unpad = torch.from_numpy(rows).to(x.device)
        return full.index_select(0, self._unpad)


class DPAttentionPlanner:
    """The model runner's side: orders a step rank by rank and cuts out this
    rank's attention inputs.

    Args:
        rank, world_size: this rank and the tensor-parallel size.
        block_size: tokens per KV block.
    """

    def __init__(self, rank: int, world_size: int, block_size: int) -> None:
        self.rank, self.world_size, self.block_size = rank, world_size, block_size
        self.blocks_per_rank = 0  # set with the KV cache (initialize_kv_cache)

    def rank_of(self, block_ids: list[int]) -> int:
        """The rank whose partition holds a request's blocks."""
        return block_ids[0] // self.blocks_per_rank

    def order(self, num_scheduled: dict[str, int], block_ids: dict[str, list[int]]) -> list[str]:
        """The step's request ids, rank by rank, single-token (decode) requests
        first within each rank."""
        return sorted(num_scheduled, key=lambda r: (self.rank_of(block_ids[r]), num_scheduled[r] > 1))

    def split(self, host: HostInputs, block_ids: dict[str, list[int]]) -> tuple[HostInputs, DPAttentionLayout]:
        """This rank's attention inputs and the step's layout.

        Args:
            host: the whole step, packed in :meth:`order`.
            block_ids: request id -> its block ids (pool-wide).
        Returns:
            ``host`` with the attention fields (slot mapping, query starts,
            sequence lengths, block table, decode count) cut to this rank's
            requests and its block ids made local to its cache (no requests:
            empty ones); ``input_ids`` / ``positions`` stay the whole step's.

        Raises:
            AssertionError: a request's blocks outside one partition.
        """
        ranks = np.array([self.rank_of(block_ids[r]) for r in host.req_ids], dtype=np.int64)
        qsl = host.query_start_loc.astype(np.int64)
        counts = np.zeros(self.world_size, dtype=np.int64)
        np.add.at(counts, ranks, np.diff(qsl))
        assert np.all(np.diff(ranks) >= 0), "the step is not packed rank by rank"
        a, b = int(np.searchsorted(ranks, self.rank)), int(np.searchsorted(ranks, self.rank, side="right"))
        t0, t1 = int(qsl[a]), int(qsl[b])
        offset = self.rank * self.blocks_per_rank
        slot_mapping = host.slot_mapping[t0:t1] - offset * self.block_size
        assert slot_mapping.size == 0 or (slot_mapping.min() >= 0
                                          and slot_mapping.max() < self.blocks_per_rank * self.block_size)
        q_lens = np.diff(qsl[a: b + 1])
        local = dataclasses.replace(
            host, slot_mapping=slot_mapping, query_start_loc=(qsl[a: b + 1] - t0).astype(np.int32),
            seq_lens=host.seq_lens[a:b], block_table=np.maximum(host.block_table[a:b] - offset, 0),
            max_query_len=int(q_lens.max(initial=0)), num_decodes=int((q_lens == 1).sum()),
            req_ids=host.req_ids[a:b])
        return local, DPAttentionLayout(counts.tolist(), self.rank)
