"""CUDA graphs for decode steps.

A decode step launches hundreds of small kernels; replaying a captured graph
removes the per-launch host cost. Graphs are captured for a ladder of batch
sizes over persistent input buffers; a batch of ``n`` decodes runs in the
smallest captured size ``>= n``, its padding rows given ``seq_len 0`` and slot
``-1`` so that they neither read nor write the KV cache.
"""

from __future__ import annotations

import torch

from ember.config import EngineConfig
from ember.layers.attention import AttentionMetadata, ForwardContext


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256 (as vLLM), capped at ``max_num_seqs``."""
    ladder = [1, 2, 4] + list(range(8, 257, 8))
    sizes = [s for s in ladder if s <= max_num_seqs]
    if max_num_seqs < 256 and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class CUDAGraphRunner:
    """Captures and replays ``model(input_ids, positions, ctx)`` for decode-only batches.

    Args:
        model: the loaded model.
        kv_caches: the per-layer KV cache tensors (fixed addresses).
        config: engine config (max_num_seqs, max_model_len, block_size).
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], config: EngineConfig) -> None:
        from ember.kernels.triton_attention import num_decode_splits

        self.model, self.kv_caches = model, kv_caches
        self.sizes = capture_sizes(config.scheduler_config.max_num_seqs)
        self._num_splits = num_decode_splits
        self.num_kv_heads = config.model_config.num_kv_heads
        self.num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        n = self.sizes[-1]
        max_blocks = -(-config.model_config.max_model_len // config.cache_config.block_size)
        dev = torch.device("cuda")
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        # Pinned staging areas: a step's inputs travel in a single asynchronous
        # host-to-device copy, then spread into the graph's buffers on the device.
        # NOTE: two, used in turn: with asynchronous scheduling a step is staged
        # before the previous step's copy is known to have run; the one before
        # that has been waited for.
        self._stage_hosts = [torch.empty(6 * n + n * max_blocks, dtype=torch.int64).pin_memory() for _ in range(2)]
        self._stage_dev = torch.empty_like(self._stage_hosts[0], device=dev)
        self._num_runs = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _context(self, bs: int) -> ForwardContext:
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs], max_query_len=1,
            max_seq_len=self.block_table.shape[1], query_start_loc_cpu=[], seq_lens_cpu=[],
            num_kv_splits=self._num_splits(bs, self.num_kv_heads, self.num_sms))
        return ForwardContext(meta, self.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its memory pool
            ctx = self._context(bs)
            args = (self.input_ids[:bs], self.positions[:bs], ctx)
            self.model(*args)  # warm-up: compiles Triton kernels, sets up cuBLAS handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, host) -> bool:
        """True for a decode-only batch (one token per request) that fits a graph."""
        n = len(host.seq_lens)
        return host.max_query_len == 1 and n <= self.sizes[-1]

    def run(self, host, runner) -> torch.Tensor:
        """Copy ``host`` (a ``HostInputs``) into the buffers, fill in the input
        ids still in flight (``runner.fill_in_flight_ids``), replay; returns [n, hidden]."""
        n = len(host.seq_lens)
        bs = next(s for s in self.sizes if s >= n)
        width = host.block_table.shape[1]
        k = len(host.in_flight_dst)
        total = 4 * n + n * width + 2 * k
        stage_host = self._stage_hosts[self._num_runs % 2]
        self._num_runs += 1
        stage = stage_host.numpy()
        stage[0:n] = host.input_ids
        stage[n:2 * n] = host.positions
        stage[2 * n:3 * n] = host.slot_mapping
        stage[3 * n:4 * n] = host.seq_lens
        end = 4 * n + n * width
        stage[4 * n:end] = host.block_table.reshape(-1)
        if k:
            stage[end:end + k] = host.in_flight_dst
            stage[end + k:total] = host.in_flight_src
        dev = self._stage_dev[:total]
        dev.copy_(stage_host[:total], non_blocking=True)
        self.input_ids[:n].copy_(dev[0:n])
        self.positions[:n].copy_(dev[n:2 * n])
        self.slot_mapping[:n].copy_(dev[2 * n:3 * n])
        self.seq_lens[:n].copy_(dev[3 * n:4 * n])
        self.block_table[:n, :width].copy_(dev[4 * n:end].view(n, width))
        if k:
            runner.fill_in_flight_ids(self.input_ids, dev[end:end + k], dev[end + k:total])
        if bs > n:
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
