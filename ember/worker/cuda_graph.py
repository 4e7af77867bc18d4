"""CUDA graphs: whole decode steps, and piecewise graphs for the other steps.

A step launches hundreds of small kernels; replaying a captured graph removes
the per-launch host cost (tens of microseconds per Triton launch: issuing an
eager 8B step can take longer than running it).

* Decode steps (:class:`CUDAGraphRunner`): graphs for a ladder of batch sizes
  over persistent input buffers; a batch of ``n`` decodes runs in the smallest
  captured size ``>= n``, its padding rows given ``seq_len 0`` and slot ``-1``
  so that they neither read nor write the KV cache.
* Steps with prefill tokens (:class:`PiecewiseCUDAGraphRunner`): the forward is
  captured for a ladder of token counts, cut at every attention layer. The
  pieces between attentions (norms, projections, rotary, MLP: everything whose
  shapes depend only on the token count) replay as graphs; attention, whose
  work depends on each request's context, runs eagerly between them on the
  step's real metadata. This is vLLM's "piecewise" CUDA graph design, done
  here by cutting the capture at :class:`~ember.layers.attention.Attention`
  instead of by compiling the model.
* Speculative verification steps (:class:`VerifyCUDAGraphRunner`): every
  request runs its last token and the same number of drafts, ``q`` tokens in
  all; whole steps are captured per (batch size, ``q``), attention done by
  the split-KV kernel for ``q`` new tokens per request
  (``ember.kernels.triton_attention.verify_attention``), whose launch depends
  only on the shapes. Padding requests get ``seq_len 0`` and slots ``-1``.
"""

from __future__ import annotations

import numpy as np
import torch

from ember.config import EngineConfig
from ember.layers.attention import Attention, AttentionMetadata, ForwardContext
from ember.worker.common import shifted_slots


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, every 8 up to 256, every 16 up to 512 (as vLLM), capped at
    ``max_num_seqs``; larger decode batches run eagerly."""
    ladder = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, 513, 16))
    sizes = [s for s in ladder if s <= max_num_seqs]
    if max_num_seqs < 512 and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class CUDAGraphRunner:
    """Captures and replays ``model(input_ids, positions, ctx)`` for decode-only batches.

    Args:
        model: the loaded model.
        kv_caches: the per-layer KV cache tensors (fixed addresses).
        config: engine config (max_num_seqs, max_model_len, block_size).
        aux_hidden: where the captured steps also write the residual stream at
            chosen depths (:class:`~ember.models.utils.AuxHiddenStates`), or None.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], config: EngineConfig,
                 aux_hidden=None) -> None:
        from ember.kernels.triton_attention import num_decode_splits

        self.model, self.kv_caches, self.aux_hidden = model, kv_caches, aux_hidden
        self.sizes = capture_sizes(config.scheduler_config.max_num_seqs)
        self.block_size = config.cache_config.block_size
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
        # host-to-device copy, then one kernel spreads them into the graph's buffers.
        # NOTE: two, used in turn: with asynchronous scheduling a step is staged
        # before the previous step's copy is known to have run; the one before
        # that has been waited for.
        self._stage_hosts = [torch.empty(4 * n + n * max_blocks, dtype=torch.int64).pin_memory() for _ in range(2)]
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
        return ForwardContext(meta, self.kv_caches, aux_hidden=self.aux_hidden)

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

    def run(self, host, shift: torch.Tensor | None = None) -> torch.Tensor:
        """Copy ``host`` (a ``HostInputs``) into the buffers, the input ids still
        in flight taken from ``host.in_flight_source`` on the device, and
        replay; returns [n, hidden]. ``shift`` ([n] int64 on the device):
        row ``i`` runs at ``host.positions[i] + shift[i]`` (its slot and
        sequence length derived on the device, nothing waits)."""
        from ember.kernels.triton_inputs import unpack_decode_inputs

        n = len(host.seq_lens)
        bs = next(s for s in self.sizes if s >= n)
        width = host.block_table.shape[1]
        total = 4 * n + n * width
        stage_host = self._stage_hosts[self._num_runs % 2]
        self._num_runs += 1
        stage = stage_host.numpy()
        stage[0:n] = host.input_ids
        if host.in_flight_dst:  # -(j + 1): entry j of host.in_flight_source
            stage[host.in_flight_dst] = -1 - np.asarray(host.in_flight_src, dtype=np.int64)
        stage[n:2 * n] = host.positions
        stage[2 * n:3 * n] = host.slot_mapping
        stage[3 * n:4 * n] = host.seq_lens
        stage[4 * n:total] = host.block_table.reshape(-1)
        dev = self._stage_dev[:total]
        dev.copy_(stage_host[:total], non_blocking=True)
        unpack_decode_inputs(dev, n, width, host.in_flight_source if host.in_flight_dst else None, self.input_ids,
                             self.positions, self.slot_mapping, self.seq_lens, self.block_table, bs)
        if shift is not None:
            positions = self.positions[:n]
            positions.add_(shift)
            self.slot_mapping[:n] = shifted_slots(positions, self.block_table, self.block_size)
            self.seq_lens[:n] = positions + 1
        self.graphs[bs].replay()
        return self.outputs[bs][:n]


def piecewise_sizes(max_tokens: int) -> list[int]:
    """Token counts captured for steps with prefill tokens: 16 to 128 by
    doubling, every 128 to 1024, every 256 above, and ``max_tokens`` itself,
    up to ``max_tokens``."""
    ladder = [16, 32, 64, 128] + list(range(256, 1025, 128)) + list(range(1280, max_tokens + 1, 256))
    sizes = [s for s in ladder if s <= max_tokens]
    if max_tokens not in sizes:
        sizes.append(max_tokens)
    return sizes


class _Splitter:
    """Cuts one capture into graphs at each attention call (``ForwardContext.piecewise``)."""

    def __init__(self, runner: PiecewiseCUDAGraphRunner, pool: tuple) -> None:
        self.runner, self.pool = runner, pool
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.layers: list[Attention] = []
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=pool)

    def split(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n = q.shape[0]
        qb, kb, vb, out = self.runner.buffers(n)
        qb.copy_(q)
        kb.copy_(k)
        vb.copy_(v)
        self.graph.capture_end()
        self.graphs.append(self.graph)
        self.layers.append(layer)
        self.graph = torch.cuda.CUDAGraph()
        self.graph.capture_begin(pool=self.pool)
        return out

    def finish(self) -> list[torch.cuda.CUDAGraph]:
        self.graph.capture_end()
        return self.graphs + [self.graph]


class PiecewiseCUDAGraphRunner:
    """Captures and replays ``model(input_ids, positions, ctx)`` for steps with
    prefill tokens, as graphs cut at each attention layer (see the module
    docstring).

    A step of ``n`` tokens runs in the smallest captured count ``T >= n``. The
    graphs compute all ``T`` rows; rows past ``n`` hold stale but valid ids and
    positions, and every row is independent of the others outside attention,
    so they cost compute but change nothing. Between graphs, each attention
    layer reads its ``q``/``k``/``v`` (first ``n`` rows) from buffers the graph
    before it filled and writes its output to the buffer the graph after it
    reads.

    Args:
        model: the loaded model (its attention layers are :class:`Attention`).
        kv_caches: the per-layer KV cache tensors.
        config: engine config (the token budget bounds the captured counts).
        aux_hidden: as :class:`CUDAGraphRunner`'s.
    """

    MAX_TOKENS = 4096  # larger steps are compute-bound: their launch cost hides behind the GPU

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], config: EngineConfig,
                 aux_hidden=None) -> None:
        self.model, self.kv_caches, self.aux_hidden = model, kv_caches, aux_hidden
        self.block_size = config.cache_config.block_size
        budget = config.scheduler_config.max_num_batched_tokens
        self.sizes = piecewise_sizes(min(budget, self.MAX_TOKENS))
        attns = [m for m in model.modules() if isinstance(m, Attention)]
        self.q_width = max(a.num_heads * a.head_dim for a in attns)
        self.kv_width = max(a.num_kv_heads * a.head_dim for a in attns)
        n, dev, dtype = self.sizes[-1], torch.device("cuda"), config.model_config.dtype
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        # Attention's inputs and output, shared by all layers and sizes (a layer's
        # are consumed before the next layer's are written, in stream order).
        self._q = torch.zeros(n * self.q_width, dtype=dtype, device=dev)
        self._k = torch.zeros(n * self.kv_width, dtype=dtype, device=dev)
        self._v = torch.zeros(n * self.kv_width, dtype=dtype, device=dev)
        self._out = torch.zeros(n * self.q_width, dtype=dtype, device=dev)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.layers: list[Attention] = []
        # The last piece copies the model's output here, so that no size keeps its
        # own output alive in the graph pool (every size reuses the same memory).
        self._hidden: torch.Tensor | None = None
        self.hidden_size = 0
        self.num_runs = 0

    def buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``[n, width]`` of the q, k, v and attention-output buffers."""
        qw, kw = self.q_width, self.kv_width
        return (self._q[: n * qw].view(n, qw), self._k[: n * kw].view(n, kw), self._v[: n * kw].view(n, kw),
                self._out[: n * qw].view(n, qw))

    def _warmup_context(self, n: int) -> ForwardContext:
        """One request of ``n`` new tokens that writes no KV (slots -1)."""
        dev = self.input_ids.device
        num_blocks = -(-n // self.block_size)
        meta = AttentionMetadata(
            slot_mapping=torch.full((n,), -1, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=dev),
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            block_table=torch.zeros(1, num_blocks, dtype=torch.int32, device=dev),
            max_query_len=n, max_seq_len=n, query_start_loc_cpu=[0, n], seq_lens_cpu=[n])
        return ForwardContext(meta, self.kv_caches, aux_hidden=self.aux_hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        for n in reversed(self.sizes):  # largest first: the others reuse its memory
            ids, pos = self.input_ids[:n], self.positions[:n]
            ctx = self._warmup_context(n)  # NOTE: built before the capture (it copies from the host)
            hidden = self.model(ids, pos, ctx)  # compiles kernels, sets up cuBLAS for n rows
            if self._hidden is None:  # the largest size comes first
                self.hidden_size = hidden.shape[1]
                self._hidden = torch.empty(n * self.hidden_size, dtype=hidden.dtype, device=hidden.device)
            del hidden
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the warm-up's blocks go back to the device for the graph pool
            with torch.cuda.stream(stream):
                ctx.piecewise = splitter = _Splitter(self, pool)
                hidden = self.model(ids, pos, ctx)
                self._hidden[: hidden.numel()].view_as(hidden).copy_(hidden)
                self.graphs[n] = splitter.finish()
            del hidden
            torch.cuda.synchronize()
            if not self.layers:
                self.layers = splitter.layers
            assert splitter.layers == self.layers, "attention layers must run in the same order at every size"

    def can_run(self, host) -> bool:
        """True for a step with prefill tokens that fits the largest captured count."""
        return host.max_query_len > 1 and len(host.input_ids) <= self.sizes[-1]

    def run(self, host, runner) -> torch.Tensor:
        """Replay the step ``host`` (a ``HostInputs``; ids still in flight are
        filled by ``runner``); returns hidden states [n, hidden]."""
        n = len(host.input_ids)
        size = next(s for s in self.sizes if s >= n)
        self.num_runs += 1
        input_ids, positions, meta = runner._device_inputs(host)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        ctx = ForwardContext(meta, self.kv_caches, positions=self.positions[:n], aux_hidden=self.aux_hidden)
        q, k, v, out = self.buffers(n)
        graphs = self.graphs[size]
        for graph, layer in zip(graphs, self.layers):
            graph.replay()
            out.copy_(layer.attend(q, k, v, ctx))
        graphs[-1].replay()
        return self._hidden[: n * self.hidden_size].view(n, self.hidden_size)


def uniform_query_len(host) -> int:
    """``q`` when every request of the step ``host`` (a ``HostInputs``) has
    exactly ``q > 1`` new tokens, else 0."""
    q, n = host.max_query_len, len(host.seq_lens)
    if q > 1 and len(host.input_ids) == n * q:
        return q
    return 0


def stage_verify_inputs(host, stage: np.ndarray) -> int:
    """Pack a uniform step ``host`` into ``stage`` (int64, at least
    ``3 * num_tokens + n * (1 + width)`` long) as
    :func:`~ember.kernels.triton_inputs.unpack_verify_inputs` reads it:
    ``[input_ids | positions | slot_mapping | seq_lens | block_table rows]``,
    an input id still on the device (``host.in_flight_dst``) as ``-(j + 1)``
    for entry ``j`` of ``host.in_flight_source``. Returns the number of
    entries written."""
    t, n = len(host.input_ids), len(host.seq_lens)
    width = host.block_table.shape[1]
    stage[0:t] = host.input_ids
    if host.in_flight_dst:
        stage[host.in_flight_dst] = -1 - np.asarray(host.in_flight_src, dtype=np.int64)
    stage[t:2 * t] = host.positions
    stage[2 * t:3 * t] = host.slot_mapping
    stage[3 * t:3 * t + n] = host.seq_lens
    total = 3 * t + n + n * width
    stage[3 * t + n:total] = host.block_table.reshape(-1)
    return total


class VerifyCUDAGraphRunner:
    """Captures and replays ``model(input_ids, positions, ctx)`` for uniform
    verification steps: ``n`` requests with ``q`` new tokens each (the last
    token and ``q - 1`` drafts), for every ``q`` in ``query_lens`` and a
    ladder of batch sizes (:func:`capture_sizes` of ``max_num_seqs``, those
    whose ``batch * q`` tokens fit the token budget). A step of ``n`` requests
    runs in the smallest captured batch ``>= n``; its token rows are the
    packed rows (request after request), so the first ``n * q`` rows of the
    output are the step's hidden states.

    Args:
        model: the loaded model (its attention layers on the Triton backend, or
            MLA layers on a CUDA-graph-safe MLA backend).
        kv_caches: the per-layer KV cache tensors (fixed addresses).
        config: engine config (max_model_len, block_size, token budget).
        query_lens: the ``q`` values to capture (k + 1 for k drafts).
        max_num_seqs: the largest batch to capture (speculation turns off
            above ``disable_by_batch_size``).
        device, num_sms: where the buffers live and its SM count (which sets
            the split-KV count); default the current CUDA device.
        aux_hidden: as :class:`CUDAGraphRunner`'s.
    """

    def __init__(self, model: torch.nn.Module, kv_caches: list[torch.Tensor], config: EngineConfig,
                 query_lens: list[int], max_num_seqs: int, device: torch.device | None = None,
                 num_sms: int | None = None, aux_hidden=None) -> None:
        self.aux_hidden = aux_hidden
        from ember.kernels.triton_attention import num_decode_splits

        self.model, self.kv_caches = model, kv_caches
        budget = config.scheduler_config.max_num_batched_tokens
        ladder = capture_sizes(max_num_seqs)
        self.sizes: dict[int, list[int]] = {}
        for q in sorted(set(query_lens)):
            fits = [b for b in ladder if b * q <= budget]
            if q > 1 and fits:
                self.sizes[q] = fits
        self._num_splits = num_decode_splits
        self.num_kv_heads = config.model_config.num_kv_heads
        dev = device if device is not None else torch.device("cuda")
        if num_sms is None:
            num_sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        self.num_sms = num_sms
        max_bs = max((s[-1] for s in self.sizes.values()), default=0)
        max_tokens = max((s[-1] * q for q, s in self.sizes.items()), default=0)
        self.max_blocks = -(-config.model_config.max_model_len // config.cache_config.block_size)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        self.block_table = torch.zeros(max_bs, self.max_blocks, dtype=torch.int32, device=dev)
        self._query_start_loc = {q: torch.arange(0, (max_bs + 1) * q, q, dtype=torch.int32, device=dev)
                                 for q in self.sizes}
        # Pinned staging areas used in turn (as CUDAGraphRunner's): one copy per step.
        stage_len = 3 * max_tokens + max_bs * (1 + self.max_blocks)
        pin = dev.type == "cuda"
        self._stage_hosts = [torch.empty(stage_len, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._stage_dev = torch.empty_like(self._stage_hosts[0], device=dev)
        self.num_runs = 0
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}

    @property
    def keys(self) -> list[tuple[int, int]]:
        """Every captured ``(batch size, q)``, most tokens first."""
        return sorted(((b, q) for q, sizes in self.sizes.items() for b in sizes), key=lambda k: (-k[0] * k[1], k))

    def args(self, bs: int, q: int) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """The model's arguments for ``(bs, q)``: views of the buffers and the
        attention metadata over them (``uniform_query_len = q``)."""
        t = bs * q
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:t], query_start_loc=self._query_start_loc[q][: bs + 1],
            seq_lens=self.seq_lens[:bs], block_table=self.block_table[:bs], max_query_len=q,
            max_seq_len=self.max_blocks, query_start_loc_cpu=[], seq_lens_cpu=[],
            num_kv_splits=self._num_splits(bs, self.num_kv_heads, self.num_sms), uniform_query_len=q)
        return self.input_ids[:t], self.positions[:t], ForwardContext(meta, self.kv_caches, aux_hidden=self.aux_hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs, q in self.keys:  # most tokens first: the others reuse its memory pool
            args = self.args(bs, q)
            self.model(*args)  # warm-up: compiles Triton kernels, sets up cuBLAS handles
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[(bs, q)] = self.model(*args)
            pool = graph.pool()
            self.graphs[(bs, q)] = graph
        torch.cuda.synchronize()

    def batch_size(self, host) -> int:
        """The captured batch size that runs the step ``host``, or 0 when none
        does (not uniform, a ``q`` not captured, too many requests)."""
        q = uniform_query_len(host)
        n = len(host.seq_lens)
        sizes = self.sizes.get(q)
        if not sizes or n > sizes[-1] or host.block_table.shape[1] > self.max_blocks:
            return 0
        return next(s for s in sizes if s >= n)

    def can_run(self, host) -> bool:
        """True for a uniform verification step that fits a captured graph."""
        return self.batch_size(host) > 0

    def run(self, host, runner=None) -> torch.Tensor:
        """Stage ``host`` (a ``HostInputs`` that :meth:`can_run`) into the
        buffers in one host-to-device copy and one kernel, and replay;
        returns the hidden states [num_tokens, hidden]."""
        from ember.kernels.triton_inputs import unpack_verify_inputs

        q, n, bs = uniform_query_len(host), len(host.seq_lens), self.batch_size(host)
        stage_host = self._stage_hosts[self.num_runs % 2]
        self.num_runs += 1
        total = stage_verify_inputs(host, stage_host.numpy())
        dev = self._stage_dev[:total]
        dev.copy_(stage_host[:total], non_blocking=True)
        unpack_verify_inputs(dev, n, q, host.block_table.shape[1], host.in_flight_source if host.in_flight_dst
                             else None, self.input_ids, self.positions, self.slot_mapping, self.seq_lens,
                             self.block_table, bs)
        self.graphs[(bs, q)].replay()
        return self.outputs[(bs, q)][: n * q]
