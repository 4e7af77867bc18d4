"""ModelRunner: SchedulerOutput -> packed tensors -> forward -> sampled tokens.

The runner keeps a small state per request (its known tokens and block table)
and is told only what changed each step; it mirrors the scheduler's
``num_computed_tokens`` and never decides who runs or how far. Inputs are
packed without padding: ``input_ids``, ``positions`` and ``slot_mapping`` have
one entry per scheduled token, ``block_table`` and ``seq_lens`` one row per
scheduled request. Only the rows whose request reaches the end of its tokens
(known or in flight) are turned into logits and sampled; a pooling request's
rows are pooled instead (:meth:`ModelRunner._pool`) and it samples nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ember.config import ConfigError, EngineConfig
from ember.core.sched_output import DRAFT_ON_WORKER, GrammarBitmask, ModelRunnerOutput, SchedulerOutput
from ember.distributed.parallel_state import get_pp_group, get_tp_rank, get_tp_size
from ember.layers.attention import AttentionMetadata, ForwardContext, KVCacheSpec, get_attention_backend
from ember.layers.attention.backend import as_copyable, default_backend_name
from ember.models.registry import ModelRegistry
from ember.models.utils import IntermediateTensors, get_pp_layer_range
from ember.sample.logprobs import LogprobsMetadata, compute_logprobs, unpack_logprobs
from ember.outputs import SampleLogprob
from ember.sample.logits_processor import (BitmaskProcessor, LogitsProcessor, TokenMaskMetadata, fit_bitmask,
                                           logits_processors_for, uses_logits_processor)
from ember.pooling_params import PoolingParams
from ember.sample.sampler import Sampler, SamplingMetadata
from ember.sampling_params import SamplingParams
from ember.logger import init_logger
from ember.worker.common import HostInputs, default_dtype, device_inputs, fill_dummy, to_device

logger = init_logger(__name__)



@dataclass(slots=True)
class CachedRequestState:
    """What the runner remembers of a running request."""

    req_id: str
    num_prompt_tokens: int
    token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class PendingOutput:
    """A launched step whose sampled ids are still on their way to the host.

    ``sampled_host``: [num_rows] int64 (pinned on CUDA), valid once ``event``
    (None on CPU) completes; ``logprobs``: the packed log-probabilities of the
    rows that asked, on the device (see :func:`ember.sample.logprobs.compute_logprobs`).
    """

    req_ids: list[str]
    sampled_host: torch.Tensor | None = None
    event: torch.cuda.Event | None = None
    logprobs: torch.Tensor | None = None
    logprobs_meta: Any = None
    prompt_logprobs: _PromptLogprobs | None = None
    # Pooling requests this step finished, and their pooled vectors ([n, hidden] float32).
    pooled_req_ids: list[str] = field(default_factory=list)
    pooled: torch.Tensor | None = None
    # A step with draft tokens: per sampling request its emitted tokens (and
    # their log-probabilities, for those that ask), already on the host.
    spec_tokens: dict[str, list[int]] | None = None
    spec_logprobs: dict[str, list[SampleLogprob]] | None = None
    # How many tokens the worker's proposer drafted for the next step (req_id -> count).
    num_draft_tokens: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _PromptLogprobs:
    """One step's prompt log-probabilities (``SamplingParams.prompt_logprobs``):
    per asking request ``(req_id, first target position, count)``, the target
    token ids in that order, and the packed result on the device (see
    :func:`ember.sample.logprobs.compute_logprobs`)."""

    spans: list[tuple[str, int, int]]
    targets: list[int]
    meta: LogprobsMetadata
    packed: torch.Tensor


@dataclass(slots=True)
class _AwaitingBitmask:
    """A launched step whose sampling waits for its grammar masks."""

    pending: PendingOutput
    logits: torch.Tensor
    states: list[CachedRequestState]
    seq_lens: list[int]


def _copy_blocks(src: list[torch.Tensor], src_ids: tuple[int, ...], dst: list[torch.Tensor],
                 dst_ids: tuple[int, ...], block_dim: int) -> None:
    """``dst[layer][..., dst_ids[i], ...] = src[layer][..., src_ids[i], ...]`` along
    ``block_dim``, one gather + one transfer per layer. Blocking, so the host side
    is complete when this returns."""
    src_idx = torch.tensor(src_ids, dtype=torch.int64, device=src[0].device)
    dst_idx = torch.tensor(dst_ids, dtype=torch.int64, device=dst[0].device)
    for s, d in zip(src, dst):
        if not s.numel():  # a layer of another pipeline stage
            continue
        s, d = as_copyable(s), as_copyable(d)
        d.index_copy_(block_dim, dst_idx, s.index_select(block_dim, src_idx).to(d.device))


def _swap_cache_blocks(sched: SchedulerOutput, device: list[torch.Tensor], host: list[torch.Tensor],
                       block_dim: int) -> None:
    """``sched``'s swap-outs (``device`` -> ``host`` blocks), then its
    swap-ins (``host`` -> ``device``), in every layer's cache."""
    if sched.blocks_to_swap_out:
        dev_ids, host_ids = zip(*sched.blocks_to_swap_out)
        _copy_blocks(device, dev_ids, host, host_ids, block_dim)
    if sched.blocks_to_swap_in:
        dev_ids, host_ids = zip(*sched.blocks_to_swap_in)
        _copy_blocks(host, host_ids, device, dev_ids, block_dim)


class ModelRunner:
    """Runs the model for one device.

    Args:
        config: the engine config.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.device = config.device_config.torch_device
        self.block_size = config.cache_config.block_size
        self.requests: dict[str, CachedRequestState] = {}
        self.kv_caches: list[torch.Tensor] = []
        self.host_kv_caches: list[torch.Tensor] = []  # swap space, laid out like kv_caches
        self.model: torch.nn.Module | None = None
        self.cuda_graphs = None  # CUDAGraphRunner once captured
        # speculative_config methods with a model on the worker: the proposer next to the target
        # (load_draft_model), and what the target also writes in each forward for it (or None).
        self.draft_proposer = None
        self.aux_hidden = None
        self.piecewise_graphs = None  # PiecewiseCUDAGraphRunner once captured
        self.verify_graphs = None  # VerifyCUDAGraphRunner once captured (speculative decoding)
        self.prepare_s = 0.0  # cumulative host time packing inputs (seconds)
        # The last launched step's sampled ids (device, [num_rows] int64) and the
        # requests of its rows, in order, until it is collected: the source of
        # the tokens still in flight when the next step is launched first.
        self._last_sampled: torch.Tensor | None = None
        self._last_sample_req_ids: list[str] = []
        self._prompt_logprobs_req_ids: set[str] = set()  # live requests asking for prompt logprobs
        self._awaiting_bitmask: _AwaitingBitmask | None = None  # see sample_with_bitmask
        self._pooling: dict[str, PoolingParams] = {}  # live pooling requests
        # MEAN pooling over a prompt computed in chunks: the float32 sum of its rows so far ([hidden]).
        self._pool_sums: dict[str, torch.Tensor] = {}
        # --calculate-kv-scales: the next step (the first prefill) sets the FP8 KV scales.
        self._calibrate_kv_scales = config.cache_config.calculate_kv_scales
        generator = torch.Generator(device=self.device)
        if self.model_config.seed is not None:
            generator.manual_seed(self.model_config.seed)
        else:
            generator.seed()
        self.sampler = Sampler(generator)
        self.attn_backend = get_attention_backend(
            config.model_config.attention_backend or default_backend_name(config.device_config.device))
        # --enable-dp-attention: this rank attends only the requests of its KV partition.
        self.dp_attention = None
        if config.parallel_config.enable_dp_attention:
            from ember.distributed.dp_attention import DPAttentionPlanner

            self.dp_attention = DPAttentionPlanner(get_tp_rank(), get_tp_size(), self.block_size)

    # ------------------------------------------------------------- start-up
    def load_model(self) -> None:
        """Build the model (with the quantization config that
        ``ModelConfig.quantization`` or the checkpoint names), load its weights
        (or dummy ones), let every quant method process them, then swap in the
        decode fusions that ``EngineConfig.kernel_config`` asks for where they
        apply (:func:`ember.layers.fusion.apply_decode_fusions`). Logs the load time.

        Raises:
            ModelLoadError / ValueError: unreadable weights, a missing or
                unexpected tensor (named, with its quantization scheme), a
                shape mismatch.
        """
        from ember.layers.fusion import apply_decode_fusions
        from ember.layers.quantization import get_quant_config
        from ember.layers.quantization.checkpoint_errors import missing_weights_message
        from ember.loader import iter_weights, resolve_model_source

        start = time.perf_counter()
        mc = self.model_config
        model_cls = ModelRegistry.load_class(mc.architecture)
        quant_config = get_quant_config(mc.quantization, mc.hf_config)
        with default_dtype(mc.dtype), self.device:
            model = model_cls(mc.hf_config, self.attn_backend, quant_config=quant_config)
        if self.config.load_config.load_format == "dummy":
            # Seeded, so two engines with the same seed get the same random weights.
            gen = torch.Generator(device=self.device).manual_seed(mc.seed or 0)
            for p in model.parameters():
                fill_dummy(p.data, gen)
        else:
            source = resolve_model_source(mc.model)
            keep_quantized = quant_config is not None and quant_config.raw_checkpoint
            loaded = model.load_weights(iter_weights(source, mc.dtype, keep_quantized, lazy=True))
            missing = {n for n, _ in model.named_parameters()} - loaded
            if missing:
                scheme = quant_config.describe() if quant_config is not None else None
                raise ValueError(missing_weights_message(mc.model, model, missing, scheme))
        for module in model.modules():
            method = getattr(module, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(module)
        apply_decode_fusions(model, self.config.kernel_config, self.device)
        self.model = model.eval()
        num_params = sum(p.numel() for p in model.parameters())
        num_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        logger.info(f"loaded {mc.architecture} ({num_params / 1e6:.1f}M parameters, {mc.dtype}, "
                    f"{num_bytes / 2**30:.2f} GiB as stored) in {time.perf_counter() - start:.1f} s")
        self._log_kv_scales()

    def _log_kv_scales(self) -> None:
        """Say where an FP8 KV cache's per-layer scales come from."""
        cc = self.config.cache_config
        if cc.kv_cache_torch_dtype(self.model_config.dtype) == self.model_config.dtype:
            return
        from ember.layers.attention.kv_scales import attention_layers_by_block

        layers = attention_layers_by_block(self.model).values()
        from_checkpoint = sum(bool((m.k_scale != 1) | (m.v_scale != 1)) for m in layers)
        if cc.calculate_kv_scales:
            logger.info(f"FP8 KV cache: scales of {len(layers)} layers are calibrated on the first prefill")
        else:
            logger.info(f"FP8 KV cache: checkpoint scales for {from_checkpoint} of {len(layers)} layers, "
                        f"1.0 for the rest")

    def load_draft_model(self) -> None:
        """Load the proposer's model of ``speculative_config`` (a draft model,
        or a head conditioned on the target's hidden states, such as the
        target checkpoint's MTP layer), if any
        (:func:`ember.spec_decode.worker_proposer_class`), after the target's."""
        sc = self.config.speculative_config
        if sc is None or not sc.proposes_on_worker:
            return
        from ember.spec_decode import worker_proposer_class

        self.draft_proposer = worker_proposer_class(sc.method)(self, sc)
        self.draft_proposer.load()
        self.aux_hidden = self.draft_proposer.aux_hidden_states()

    def kv_cache_spec(self) -> KVCacheSpec:
        """The model's per-layer KV cache layout (its class's ``kv_cache_spec``)
        in the cache dtype (``CacheConfig.cache_dtype``).

        Raises:
            ConfigError: an FP8 cache for an MLA model (its latent-cache kernels
                read the model dtype only).
        """
        mc = self.model_config
        dtype = self.config.cache_config.kv_cache_torch_dtype(mc.dtype)
        spec = ModelRegistry.load_class(mc.architecture).kv_cache_spec(mc.hf_config, self.block_size, dtype)
        if dtype != mc.dtype and not spec.leading_shape:
            raise ConfigError(f"kv_cache_dtype {self.config.cache_config.cache_dtype!r} is not supported for "
                              f"{mc.architecture} (MLA latent cache); use kv_cache_dtype 'auto'")
        return spec

    def _local_layers(self, num_layers: int) -> range:
        """The layers of this pipeline stage (all of them without pipeline parallelism)."""
        return range(*get_pp_layer_range(num_layers))

    def kv_cache_bytes_per_block(self) -> int:
        """Bytes one block takes across this stage's layers (and the draft
        model's layers, which share the block)."""
        spec = self.kv_cache_spec()
        draft = self.draft_proposer.bytes_per_block() if self.draft_proposer is not None else 0
        return spec.bytes_per_block * len(self._local_layers(spec.num_layers)) // spec.num_layers + draft

    def _allocate(self, num_blocks: int, device: torch.device | str, pin: bool = False,
                  zero: bool = True) -> list[torch.Tensor]:
        """One cache tensor per layer (:meth:`kv_cache_spec`); the layers of
        other pipeline stages get empty placeholders."""
        spec = self.kv_cache_spec()
        local = self._local_layers(spec.num_layers)
        make = torch.zeros if zero else torch.empty
        return [make(spec.layer_shape(num_blocks), dtype=spec.dtype, device=device, pin_memory=pin)
                if i in local else torch.empty(0, dtype=spec.dtype, device=device)
                for i in range(spec.num_layers)]

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate one KV tensor per layer, shaped by :meth:`kv_cache_spec`
        (``[2, num_blocks, block_size, num_kv_heads, head_dim]`` for standard attention)."""
        self.kv_caches = self._allocate(num_blocks, self.device)
        if self.dp_attention is not None:
            self.dp_attention.blocks_per_rank = num_blocks
        if self.draft_proposer is not None:
            self.draft_proposer.kv_caches = self.draft_proposer.allocate(num_blocks, self.device)

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        """Allocate the swap space: one host tensor per layer shaped like the
        device cache with ``num_blocks`` blocks (pinned on CUDA, for DMA; left
        uninitialised: only swapped-out blocks are ever read back)."""
        self.host_kv_caches = self._allocate(num_blocks, "cpu", pin=self.device.type == "cuda", zero=False)
        if self.draft_proposer is not None:
            self.draft_proposer.host_kv_caches = self.draft_proposer.allocate(
                num_blocks, "cpu", pin=self.device.type == "cuda", zero=False)

    def _swap_blocks(self, sched: SchedulerOutput) -> None:
        """Copy the step's swap-outs (device -> host), then its swap-ins (host ->
        device), in every layer. Runs before the forward pass: blocks just swapped
        out may be overwritten by this step."""
        _swap_cache_blocks(sched, self.kv_caches, self.host_kv_caches, len(self.kv_cache_spec().leading_shape))
        if self.draft_proposer is not None:
            self.draft_proposer.swap_blocks(sched, _swap_cache_blocks)

    # ----------------------------------------------------------------- step
    def _update_states(self, sched: SchedulerOutput) -> None:
        for req_id in sched.finished_req_ids:
            self.requests.pop(req_id, None)
            if self.draft_proposer is not None:
                self.draft_proposer.forget(req_id)
            self._prompt_logprobs_req_ids.discard(req_id)
            if self._pooling:
                self._pooling.pop(req_id, None)
                self._pool_sums.pop(req_id, None)
        for new in sched.scheduled_new_reqs:
            if new.sampling_params.prompt_logprobs is not None:
                self._prompt_logprobs_req_ids.add(new.req_id)
            if new.pooling_params is not None:
                self._pooling[new.req_id] = new.pooling_params
                self._pool_sums.pop(new.req_id, None)  # a preempted request starts over
            self.requests[new.req_id] = CachedRequestState(
                req_id=new.req_id,
                num_prompt_tokens=len(new.prompt_token_ids),
                token_ids=list(new.prompt_token_ids) + list(new.output_token_ids),
                sampling_params=new.sampling_params,
                block_ids=list(new.block_ids),
                num_computed_tokens=new.num_computed_tokens,
            )
            if self.draft_proposer is not None:
                self.draft_proposer.add_request(new.req_id, new.num_computed_tokens)
        for cached in sched.scheduled_cached_reqs:
            state = self.requests[cached.req_id]
            state.block_ids.extend(cached.new_block_ids)
            state.num_computed_tokens = cached.num_computed_tokens

    def _prepare_host_inputs(self, sched: SchedulerOutput) -> HostInputs:
        """Pack the step's tokens into host (numpy) arrays."""
        # NOTE: single-token (decode) requests go first, so that attention
        # backends can run them as one decode batch over a prefix of the rows.
        num_scheduled = sched.num_scheduled_tokens
        if self.dp_attention is None:
            req_ids = sorted(num_scheduled, key=lambda r: num_scheduled[r] > 1)
        else:  # rank by rank (see ember.distributed.dp_attention)
            req_ids = self.dp_attention.order(num_scheduled, {r: self.requests[r].block_ids for r in num_scheduled})
        # NOTE: the per-request loops below use Python ints: numpy scalar
        # indexing costs about a microsecond a time, for every request every step.
        cnt = [num_scheduled[r] for r in req_ids]
        states = [self.requests[r] for r in req_ids]
        comp = [s.num_computed_tokens for s in states]
        counts = np.array(cnt, dtype=np.int64)
        computed = np.array(comp, dtype=np.int64)
        query_start = np.zeros(len(req_ids) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        total = int(query_start[-1])

        # positions[t] = computed[req(t)] + index of t within its request
        req_of_token = np.repeat(np.arange(len(req_ids)), counts)
        positions = computed[req_of_token] + np.arange(total) - query_start[:-1][req_of_token]
        in_flight_dst: list[int] = []
        in_flight_src: list[int] = []
        if self._last_sample_req_ids:
            # NOTE: asynchronous scheduling: a request's last input token may be
            # the one the previous step (launched, not collected) is still
            # sampling. Its id is a 0 here; the device copies it from that
            # step's sampled ids.
            ids: list[int] = []
            last_rows = None
            for s, c, n in zip(states, comp, cnt):
                known = s.token_ids[c: c + n]
                ids.extend(known)
                if len(known) < n:
                    assert len(known) == n - 1, f"{s.req_id}: tokens missing"
                    if last_rows is None:
                        last_rows = {r: i for i, r in enumerate(self._last_sample_req_ids)}
                    in_flight_dst.append(len(ids))
                    in_flight_src.append(last_rows[s.req_id])
                    ids.append(0)
            input_ids = np.array(ids, dtype=np.int64)
        else:
            input_ids = np.fromiter(itertools.chain.from_iterable(
                s.token_ids[c: c + n] for s, c, n in zip(states, comp, cnt)), dtype=np.int64, count=total)

        max_blocks = max(len(s.block_ids) for s in states)
        block_table = np.zeros((len(states), max_blocks), dtype=np.int32)
        for i, s in enumerate(states):
            block_table[i, : len(s.block_ids)] = s.block_ids
        slot_mapping = (block_table[req_of_token, positions // self.block_size].astype(np.int64) * self.block_size
                        + positions % self.block_size)
        seq_lens = computed + counts

        # NOTE: a request samples when the step reaches its last token, known
        # or in flight (the scheduler counts it as sampling by the same rule).
        sample_req_ids, sample_rows, sample_seq_lens = [], [], []
        for req_id, s, c, n, end in zip(req_ids, states, comp, cnt, query_start[1:].tolist()):
            if c + n >= len(s.token_ids):
                sample_req_ids.append(req_id)
                sample_rows.append(end - 1)
                sample_seq_lens.append(c + n)
        return HostInputs(input_ids, positions, slot_mapping, query_start.astype(np.int32),
                          seq_lens.astype(np.int32), block_table, max(cnt), sample_req_ids, sample_rows,
                          cnt.count(1), req_ids, in_flight_dst, in_flight_src, sample_seq_lens,
                          self._last_sampled if in_flight_dst else None)

    def _prepare_spec_inputs(self, sched: SchedulerOutput) -> HostInputs:
        """:meth:`_prepare_host_inputs` for a step with draft tokens: each
        request's drafts follow its last token in the packed inputs (they are
        not among its known tokens). Drafts the worker proposed
        (``DRAFT_ON_WORKER``) are fed from the proposer's table on the device
        (``in_flight_*``; ``draft_offsets``: where each request's start)."""
        assert not self._last_sample_req_ids, "a step with drafts continues from a step in flight"
        spec = sched.scheduled_spec_decode_tokens
        extended = [(self.requests[r].token_ids, len(d)) for r, d in spec.items()]
        for (ids, _), d in zip(extended, spec.values()):
            ids.extend(d)
        try:
            host = self._prepare_host_inputs(sched)
        finally:
            for ids, n in extended:
                if n:
                    del ids[-n:]
        on_worker = [r for r, d in spec.items() if d and d[0] == DRAFT_ON_WORKER]
        if on_worker:
            source, firsts = self.draft_proposer.draft_source(on_worker)
            host.draft_offsets = dict(zip(on_worker, firsts))
            row_of = {r: i for i, r in enumerate(host.req_ids)}
            ends = host.query_start_loc[1:].tolist()
            for req_id, first in zip(on_worker, firsts):
                n, end = len(spec[req_id]), ends[row_of[req_id]]
                assert all(t == DRAFT_ON_WORKER for t in spec[req_id]), f"{req_id}: drafts of two sources"
                host.in_flight_dst.extend(range(end - n, end))
                host.in_flight_src.extend(range(first, first + n))
            host.in_flight_source = source
        return host

    def _device_inputs(self, host: HostInputs) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return device_inputs(host, self.device)

    def _forward(self, host: HostInputs) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the packed batch: a CUDA-graph
        replay for decode-only batches and for uniform verification steps that
        fit a captured size, piecewise graphs (attention eager) for other
        steps that fit one, else eager."""
        if self.cuda_graphs is not None and self.cuda_graphs.can_run(host):
            return self.cuda_graphs.run(host)
        if self.verify_graphs is not None and self.verify_graphs.can_run(host):
            return self.verify_graphs.run(host, self)
        if self.piecewise_graphs is not None and self.piecewise_graphs.can_run(host):
            return self.piecewise_graphs.run(host, self)
        if self.dp_attention is not None:
            return self._dp_attention_forward(host)
        input_ids, positions, meta = self._device_inputs(host)
        return self._run_model(input_ids, positions, ForwardContext(meta, self.kv_caches, aux_hidden=self.aux_hidden))

    def _dp_attention_forward(self, host: HostInputs) -> torch.Tensor:
        """:meth:`_forward` with data-parallel attention: this rank attends its
        own requests' rows (attention metadata cut to them, block ids local to
        its cache; none: no metadata); the hidden states returned are every
        row's, [num_tokens, hidden], in ``host``'s packing."""
        local, layout = self.dp_attention.split(host, {r: self.requests[r].block_ids for r in host.req_ids})
        input_ids, positions, meta = self._device_inputs(local)
        if not local.req_ids:
            meta = None
        return self._run_model(input_ids, positions, ForwardContext(meta, self.kv_caches, dp_attention=layout))

    def _calibrating_forward(self, host: HostInputs) -> torch.Tensor:
        """:meth:`_forward`, eagerly, with every FP8 attention layer setting its
        KV scales from this step's keys and values first (``--calculate-kv-scales``);
        later steps keep them."""
        input_ids, positions, meta = self._device_inputs(host)
        hidden = self._run_model(input_ids, positions,
                                 ForwardContext(meta, self.kv_caches, calibrate_kv_scales=True,
                                                aux_hidden=self.aux_hidden))
        self._calibrate_kv_scales = False
        logger.info(f"FP8 KV cache scales calibrated on a step of {len(host.input_ids)} tokens")
        return hidden

    def _run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
                   ) -> torch.Tensor | None:
        """The model's forward; on a pipeline stage it starts from the
        previous stage's stream and hands its own to the next stage (then
        returns None: only the last stage has final hidden states)."""
        pp = get_pp_group()
        if pp.world_size == 1:
            return self.model(input_ids, positions, ctx)
        intermediate = None
        if not pp.is_first_rank:
            shape = (positions.shape[0], self.model_config.hf_config.hidden_size)
            hidden = torch.empty(shape, dtype=self.model_config.dtype, device=self.device)
            residual = torch.empty_like(hidden)
            pp.recv_prev([hidden, residual])
            intermediate = IntermediateTensors(hidden, residual)
        out = self.model(input_ids, positions, ctx, intermediate)
        if pp.is_last_rank:
            return out
        pp.send_next([out.hidden_states, out.residual])
        return None

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        """Start one step on the device: forward over all scheduled tokens,
        logits and sampling for the requests whose tokens are all computed are
        enqueued, and the sampled ids start their copy to the host; nothing
        waits for the device (on CUDA). The step may continue requests whose
        last token the previous launched step is still sampling (asynchronous
        scheduling): that token is fed on the device. A step that names
        constrained requests (``sched.structured_output_req_ids``) stops after
        the logits: :meth:`sample_with_bitmask` samples it.

        A step with draft tokens (``scheduled_spec_decode_tokens``) verifies
        them (:mod:`ember.spec_decode.verify`) and waits for its tokens; it
        must not continue from a step still in flight. The proposer's next
        proposals are launched before that wait where the step is uniform
        (``launch_uniform``), else after it.

        Returns:
            What :meth:`collect` turns into the step's output.
        """
        self._update_states(sched)
        if sched.blocks_to_swap_out or sched.blocks_to_swap_in:
            self._swap_blocks(sched)
        if sched.is_empty:
            return PendingOutput([])
        launched_ahead = bool(self._last_sample_req_ids)  # continues from a step in flight
        t0 = time.perf_counter()
        spec = sched.scheduled_spec_decode_tokens
        if spec:
            host = self._prepare_spec_inputs(sched)
        else:
            host = self._prepare_host_inputs(sched)
        self.prepare_s += time.perf_counter() - t0
        hidden = self._calibrating_forward(host) if self._calibrate_kv_scales else self._forward(host)
        if hidden is None:  # a pipeline stage before the last: the last one samples
            return PendingOutput([])
        prompt_logprobs = self._prompt_logprobs(host, hidden, sched.num_scheduled_tokens)
        pooled_req_ids, pooled = self._pool(host, hidden) if self._pooling else ([], None)
        if not host.sample_req_ids:
            if self.draft_proposer is not None:
                # A head conditioned on the target's hidden states is fed the chunks' positions while they exist.
                self.draft_proposer.observe(sched, host, hidden)
            return PendingOutput([], prompt_logprobs=prompt_logprobs, pooled_req_ids=pooled_req_ids, pooled=pooled)
        if spec:
            from ember.spec_decode.verify import launch_verification

            verification = launch_verification(self, sched, host, hidden)
            # NOTE: a proposer that can plan without the emitted tokens (a
            # uniform step) launches its passes before the read-back below
            # waits for the device, so they queue right behind verification.
            proposer = self.draft_proposer
            launched = proposer is not None and proposer.launch_uniform(sched, host, verification, hidden)
            tokens, logprobs = verification.finish()
            self._last_sampled, self._last_sample_req_ids = None, []
            pending = PendingOutput(host.sample_req_ids, prompt_logprobs=prompt_logprobs, spec_tokens=tokens,
                                    spec_logprobs=logprobs, pooled_req_ids=pooled_req_ids, pooled=pooled)
            if launched:
                pending.num_draft_tokens = proposer.finish_uniform(tokens)
            elif proposer is not None:
                pending.num_draft_tokens = proposer.propose(sched, host, tokens, hidden)
            return pending
        if len(host.sample_rows) == hidden.shape[0]:  # every row samples (decode): no gather
            logits = self.model.compute_logits(hidden)
        else:
            rows = to_device(np.array(host.sample_rows, dtype=np.int64), self.device)
            logits = self.model.compute_logits(hidden[rows])
        states = [self.requests[r] for r in host.sample_req_ids]
        pending = PendingOutput(host.sample_req_ids, prompt_logprobs=prompt_logprobs, pooled_req_ids=pooled_req_ids,
                                pooled=pooled)
        if sched.structured_output_req_ids:
            # NOTE: the forward pass and logits are enqueued; sampling waits for
            # the constrained rows' masks, which the host fills meanwhile
            # (sample_with_bitmask, before any later launch or collect).
            self._awaiting_bitmask = _AwaitingBitmask(pending, logits, states, host.sample_seq_lens)
            return pending
        self._sample(pending, logits, states, host.sample_seq_lens)
        # NOTE: proposing reads this step's tokens on the host (it waits for
        # them); never in a step launched ahead (its requests' tokens are not
        # all known here) nor while speculation is off.
        if self.draft_proposer is not None and not launched_ahead and self.draft_proposer.active():
            if pending.event is not None:
                pending.event.synchronize()
            sampled = pending.sampled_host.tolist()
            pending.num_draft_tokens = self.draft_proposer.propose(
                sched, host, {r: [t] for r, t in zip(pending.req_ids, sampled)}, hidden)
        return pending

    def _sample(self, pending: PendingOutput, logits: torch.Tensor, states: list[CachedRequestState],
                sample_seq_lens: list[int], token_mask: TokenMaskMetadata | None = None,
                processors: list[list[LogitsProcessor]] | None = None) -> None:
        """Sample ``logits`` ([rows, vocab], one row per state) and start the
        sampled ids' copy to the host, into ``pending``."""
        sampling_meta = SamplingMetadata.build(
            [s.sampling_params for s in states],
            [n - s.num_prompt_tokens for s, n in zip(states, sample_seq_lens)], self.device,
            token_ids=[s.token_ids for s in states], vocab_size=logits.shape[-1],
            logits_processors=processors, token_mask=token_mask)
        out = self.sampler(logits, sampling_meta)
        self._last_sampled = out.sampled_token_ids
        self._last_sample_req_ids = pending.req_ids
        pending.logprobs, pending.logprobs_meta = out.logprobs, sampling_meta.logprobs
        if self.device.type == "cuda":
            pending.sampled_host = torch.empty(len(states), dtype=torch.int64, pin_memory=True)
            pending.sampled_host.copy_(out.sampled_token_ids, non_blocking=True)
            pending.event = torch.cuda.Event()
            pending.event.record()
        else:
            pending.sampled_host = out.sampled_token_ids

    @torch.inference_mode()
    def sample_with_bitmask(self, grammar: GrammarBitmask) -> None:
        """Sample the last launched step, whose schedule named constrained
        requests: their rows of ``grammar.bitmask`` mask their logits (the
        step's masks, [sampling rows, words] int32 with all-ones rows for the
        unconstrained ones, travel in one asynchronous host-to-device copy);
        a no-op when the step samples nothing."""
        awaiting, self._awaiting_bitmask = self._awaiting_bitmask, None
        if awaiting is None:
            return
        pending, logits, states, seq_lens = awaiting.pending, awaiting.logits, awaiting.states, awaiting.seq_lens
        masks = fit_bitmask(torch.from_numpy(grammar.bitmask), logits.shape[-1])
        row_of = {r: i for i, r in enumerate(pending.req_ids)}
        pairs = [(row_of[r], i) for i, r in enumerate(grammar.req_ids) if r in row_of]
        if not pairs:
            self._sample(pending, logits, states, seq_lens)
        elif any(uses_logits_processor(s.sampling_params) for s in states):
            # Other processors too: one mask per row, ANDed (the general path).
            mask_of = dict(pairs)
            processors = [logits_processors_for(s.sampling_params)
                          + ([BitmaskProcessor(masks[mask_of[i]])] if i in mask_of else [])
                          for i, s in enumerate(states)]
            self._sample(pending, logits, states, seq_lens, processors=processors)
        else:
            # NOTE: one row per sampling row (all ones where unconstrained): the
            # masks travel in one copy and apply in one masked fill, no gather.
            rows, mask_rows = zip(*pairs)
            if len(rows) == len(states) and list(rows) == list(mask_rows):
                full = masks
            else:
                full = torch.full((len(states), masks.shape[1]), -1, dtype=torch.int32)
                full[list(rows)] = masks[list(mask_rows)]
            token_mask = TokenMaskMetadata.from_rows(full, range(len(states)), len(states), self.device)
            self._sample(pending, logits, states, seq_lens, token_mask=token_mask)

    def collect(self, pending: PendingOutput) -> ModelRunnerOutput:
        """Wait for a launched step's sampled ids and append them to the
        requests' tokens (requests forgotten meanwhile are skipped). Steps
        are collected in launch order.

        Returns:
            The step's output (the token of every sampling request).
        """
        prompt_logprobs = self._unpack_prompt_logprobs(pending.prompt_logprobs)
        pooler_output = ({} if pending.pooled is None else
                         dict(zip(pending.pooled_req_ids, pending.pooled.tolist(), strict=True)))
        if not pending.req_ids:
            return ModelRunnerOutput({}, prompt_logprobs=prompt_logprobs, pooler_output=pooler_output)
        if pending.spec_tokens is not None:
            for req_id, toks in pending.spec_tokens.items():
                s = self.requests.get(req_id)
                if s is not None:
                    s.token_ids.extend(toks)
            return ModelRunnerOutput(pending.spec_tokens, pending.spec_logprobs or {}, prompt_logprobs,
                                     pooler_output=pooler_output, num_draft_tokens=pending.num_draft_tokens)
        if pending.req_ids is self._last_sample_req_ids:  # no later step reads its ids on the device
            self._last_sampled, self._last_sample_req_ids = None, []
        if pending.sampled_host is None:
            raise RuntimeError("collect() of a step still waiting for its token bitmask (sample_with_bitmask)")
        if pending.event is not None:
            pending.event.synchronize()
        sampled = pending.sampled_host.tolist()
        requests = self.requests
        for req_id, tok in zip(pending.req_ids, sampled):
            s = requests.get(req_id)
            if s is not None:
                s.token_ids.append(tok)
        logprobs = {}
        if pending.logprobs is not None:
            rows = pending.logprobs_meta.row_ids
            entries = unpack_logprobs(pending.logprobs.tolist(), [sampled[i] for i in rows], pending.logprobs_meta)
            logprobs = {pending.req_ids[i]: [e] for i, e in zip(rows, entries)}
        return ModelRunnerOutput({r: [t] for r, t in zip(pending.req_ids, sampled)}, logprobs, prompt_logprobs,
                                 pooler_output, num_draft_tokens=pending.num_draft_tokens)

    def _pool(self, host: HostInputs, hidden: torch.Tensor) -> tuple[list[str], torch.Tensor | None]:
        """Pool the hidden states of the step's pooling requests (see
        :mod:`ember.pooling_params`) and take the ones whose prompt the step
        finishes out of ``host``'s sampling rows (they sample nothing).

        Args:
            hidden: [num_tokens, hidden] final hidden states of the packed batch.
        Returns:
            The requests finished here and their pooled vectors, [n, hidden]
            float32 on the device (None if none finished).
        """
        finished: list[str] = []
        vectors: list[torch.Tensor] = []
        qsl = host.query_start_loc
        for i, req_id in enumerate(host.req_ids):
            params = self._pooling.get(req_id)
            if params is None:
                continue
            start, end = int(qsl[i]), int(qsl[i + 1])
            s = self.requests[req_id]
            done = s.num_computed_tokens + (end - start) >= len(s.token_ids)
            if params.pooling_type == "MEAN":
                total = hidden[start:end].float().sum(dim=0)
                if req_id in self._pool_sums:
                    total = total + self._pool_sums.pop(req_id)
                if not done:
                    self._pool_sums[req_id] = total
                    continue
                vector = total / s.num_prompt_tokens
            elif done:
                vector = hidden[end - 1].float()
            else:
                continue
            if params.normalize:
                vector = torch.nn.functional.normalize(vector, dim=0)
            finished.append(req_id)
            vectors.append(vector)
        if not finished:
            return [], None
        gone = set(finished)
        keep = [j for j, r in enumerate(host.sample_req_ids) if r not in gone]
        host.sample_req_ids = [host.sample_req_ids[j] for j in keep]
        host.sample_rows = [host.sample_rows[j] for j in keep]
        host.sample_seq_lens = [host.sample_seq_lens[j] for j in keep]
        return finished, torch.stack(vectors)

    def append_sampled_tokens(self, sampled_token_ids: dict[str, list[int]]) -> None:
        """Append the tokens another rank sampled (the last pipeline stage's
        output) to the requests' tokens; forgotten requests are skipped."""
        for req_id, tokens in sampled_token_ids.items():
            s = self.requests.get(req_id)
            if s is not None:
                s.token_ids.extend(tokens)

    # Rows of prompt logits computed at once (bounds the [rows, vocab] float32 buffer).
    _PROMPT_LOGITS_ROWS = 512

    def _prompt_logprobs(self, host: HostInputs, hidden: torch.Tensor,
                         num_scheduled: dict[str, int]) -> _PromptLogprobs | None:
        """Log-probabilities of the prompt tokens this step predicts, for the
        requests that ask (``SamplingParams.prompt_logprobs``): the row of
        position p predicts the prompt token at p + 1. None if none ask."""
        if not self._prompt_logprobs_req_ids:
            return None
        spans: list[tuple[str, int, int]] = []
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        qsl = host.query_start_loc
        for i, req_id in enumerate(host.req_ids):
            if req_id not in self._prompt_logprobs_req_ids:
                continue
            s = self.requests[req_id]
            k = s.sampling_params.prompt_logprobs
            c = s.num_computed_tokens
            first, last = c + 1, min(c + num_scheduled[req_id], s.num_prompt_tokens - 1)
            if last < first:
                continue
            m = last - first + 1
            spans.append((req_id, first, m))
            start = int(qsl[i])
            rows.extend(range(start, start + m))
            targets.extend(s.token_ids[first: last + 1])
            ks.extend([k] * m)
        if not spans:
            return None
        meta = LogprobsMetadata(list(range(len(rows))), None, ks, max(ks))
        rows_dev = torch.from_numpy(np.array(rows, dtype=np.int64)).to(self.device, non_blocking=True)
        targets_dev = torch.from_numpy(np.array(targets, dtype=np.int64)).to(self.device, non_blocking=True)
        step = self._PROMPT_LOGITS_ROWS
        packed = torch.cat([
            compute_logprobs(self.model.compute_logits(hidden[rows_dev[a: a + step]]), targets_dev[a: a + step], meta)
            for a in range(0, len(rows), step)])  # meta.rows is None: every row of the slice
        return _PromptLogprobs(spans, targets, meta, packed)

    @staticmethod
    def _unpack_prompt_logprobs(p: _PromptLogprobs | None) -> dict[str, tuple[int, list[SampleLogprob]]]:
        if p is None:
            return {}
        entries = unpack_logprobs(p.packed.tolist(), p.targets, p.meta)
        out, at = {}, 0
        for req_id, first, m in p.spans:
            out[req_id] = (first, entries[at: at + m])
            at += m
        return out

    def capture_cuda_graphs(self) -> None:
        """Capture decode steps for a ladder of batch sizes and, with
        ``piecewise_cuda_graphs``, the other steps for a ladder of token counts
        (CUDA, unless ``enforce_eager``); prints the capture times."""
        if self.device.type != "cuda" or self.model_config.enforce_eager:
            return
        if get_pp_group().world_size > 1:
            logger.info("pipeline stages exchange activations between layers: running eager")
            return
        if self.dp_attention is not None:
            logger.info("data-parallel attention sizes each rank's rows per step: running eager")
            return
        if not all(getattr(m, "cuda_graph_safe", True) for m in self.model.modules()):
            logger.info("the model has layers that cannot run in CUDA graphs (e.g. torch MoE/MLA): running eager")
            return
        from ember.worker.cuda_graph import CUDAGraphRunner

        start = time.perf_counter()
        self.cuda_graphs = CUDAGraphRunner(self.model, self.kv_caches, self.config, self.aux_hidden)
        self.cuda_graphs.capture()
        logger.info(f"captured CUDA graphs for decode batch sizes {self.cuda_graphs.sizes[0]}.."
                    f"{self.cuda_graphs.sizes[-1]} in {time.perf_counter() - start:.1f} s")
        if self.draft_proposer is not None:
            self.draft_proposer.capture_cuda_graphs()
        self._capture_verify_graphs()
        if not self.model_config.piecewise_cuda_graphs:
            return
        from ember.layers.attention import Attention
        from ember.layers.attention.mla import MLAAttention
        from ember.worker.cuda_graph import PiecewiseCUDAGraphRunner

        modules = list(self.model.modules())
        if any(isinstance(m, MLAAttention) for m in modules) or not any(isinstance(m, Attention) for m in modules):
            logger.info("piecewise CUDA graphs need the model's attention to be Attention layers: "
                        "steps with prefill tokens run eagerly")
            return
        start = time.perf_counter()
        self.piecewise_graphs = PiecewiseCUDAGraphRunner(self.model, self.kv_caches, self.config, self.aux_hidden)
        self.piecewise_graphs.capture()
        sizes = self.piecewise_graphs.sizes
        logger.info(f"captured piecewise CUDA graphs for {len(sizes)} token counts {sizes[0]}..{sizes[-1]} "
                    f"({len(self.piecewise_graphs.layers) + 1} pieces each) in {time.perf_counter() - start:.1f} s")

    def _capture_verify_graphs(self) -> None:
        """With speculative decoding, capture the uniform verification steps
        (every request: its last token and j drafts, j = 1..k) for batch sizes
        up to ``disable_by_batch_size`` (:class:`~ember.worker.cuda_graph.VerifyCUDAGraphRunner`);
        needs every attention layer to be an ``Attention`` on the Triton backend
        or an ``MLAAttention`` on a CUDA-graph-safe MLA backend."""
        sc = self.config.speculative_config
        if sc is None:
            return
        from ember.layers.attention import Attention
        from ember.layers.attention.mla import MLAAttention
        from ember.layers.attention.triton_backend import TritonAttentionBackend
        from ember.worker.cuda_graph import VerifyCUDAGraphRunner

        modules = list(self.model.modules())
        attns = [m for m in modules if isinstance(m, Attention)]
        mlas = [m for m in modules if isinstance(m, MLAAttention)]
        # MLA layers qualify on a graph-safe backend (Triton: uniform steps run its split-KV kernel).
        if (not (attns or mlas) or not all(isinstance(a.impl, TritonAttentionBackend) for a in attns)
                or not all(m.cuda_graph_safe for m in mlas)):
            logger.info("verification steps run without their own CUDA graphs (they need Attention layers "
                        "on the Triton backend, or MLA layers on a graph-safe backend)")
            return
        limit = sc.disable_by_batch_size
        max_seqs = self.config.scheduler_config.max_num_seqs
        start = time.perf_counter()
        self.verify_graphs = VerifyCUDAGraphRunner(self.model, self.kv_caches, self.config,
                                                   list(range(2, sc.num_speculative_tokens + 2)),
                                                   max_seqs if limit is None else min(limit, max_seqs),
                                                   aux_hidden=self.aux_hidden)
        keys = self.verify_graphs.keys
        if not keys:  # no batch of k + 1 tokens per request fits the token budget
            self.verify_graphs = None
            return
        self.verify_graphs.capture()
        logger.info(f"captured CUDA graphs for {len(keys)} verification steps (batch sizes up to "
                    f"{max(b for b, _ in keys)}, {min(q for _, q in keys)}..{max(q for _, q in keys)} tokens "
                    f"per request) in {time.perf_counter() - start:.1f} s")

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Compile, at start-up, the Triton kernel variants a step may need
        later (CUDA only): extend attention picks its query tile by the step's
        longest run of new tokens (16 rows up to 16 tokens, 64 above), and a
        mixed step whose only prompt chunk is short would otherwise compile the
        16-row variant mid-serving (about half a second). Uses the KV cache's
        first blocks as scratch."""
        if self.device.type != "cuda":
            return
        for n in (16, 64):
            self.compute_prompt_logits([0] * min(n, self.model_config.max_model_len))

    @torch.inference_mode()
    def profile_run(self) -> None:
        """One forward pass of ``max_num_batched_tokens`` tokens on a scratch
        KV cache, so the caller can read the activation peak (CUDA). The
        tokens are packed as prompts of at most ``max_model_len`` tokens
        (equal lengths, give or take one), so every position is one the model
        serves (a position past its rotary cache would index out of bounds)."""
        n = self.config.scheduler_config.max_num_batched_tokens
        num_prompts = -(-n // self.model_config.max_model_len)
        q, rem = divmod(n, num_prompts)
        lengths = [q + 1] * rem + [q] * (num_prompts - rem)
        saved = self.kv_caches
        self.initialize_kv_cache(sum(-(-m // self.block_size) for m in lengths))
        try:
            hidden = self._scratch_forward(lengths)
            if hidden is not None:
                self.model.compute_logits(hidden)
        finally:
            self.kv_caches = saved

    @torch.inference_mode()
    def compute_prompt_logits(self, token_ids: list[int]) -> torch.Tensor | None:
        """Logits of every position of one prompt, [len, vocab] float32, using
        block 0.. of the KV cache as scratch (for tests and debugging; the
        engine must be idle). Every pipeline stage must call it; those before
        the last return None."""
        hidden = self._scratch_forward([len(token_ids)], token_ids)
        return None if hidden is None else self.model.compute_logits(hidden)

    def _scratch_forward(self, lengths: list[int], token_ids: list[int] | None = None) -> torch.Tensor | None:
        """Hidden states [sum(lengths), hidden] of whole prompts of ``lengths``
        tokens each (``token_ids``, packed; None: all zeros), prompt r in the
        KV cache's blocks after those of prompts 0..r-1 (scratch); None on a
        pipeline stage before the last."""
        bs = self.block_size
        counts = np.array(lengths, dtype=np.int64)
        blocks = -(-counts // bs)
        first_block = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        table = np.zeros((len(lengths), int(blocks.max())), dtype=np.int32)
        for r, (b0, nb) in enumerate(zip(first_block, blocks)):
            table[r, :nb] = np.arange(b0, b0 + nb)
        req_of = np.repeat(np.arange(len(lengths)), counts)
        qsl = np.concatenate([[0], np.cumsum(counts)])
        pos = np.arange(int(qsl[-1])) - qsl[:-1][req_of]
        slots = table[req_of, pos // bs].astype(np.int64) * bs + pos % bs
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            query_start_loc=torch.from_numpy(qsl.astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(counts.astype(np.int32)).to(dev), block_table=torch.from_numpy(table).to(dev),
            max_query_len=int(counts.max()), max_seq_len=int(counts.max()), query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=counts.tolist())
        ids = (torch.zeros(int(qsl[-1]), dtype=torch.int64, device=dev) if token_ids is None
               else torch.tensor(token_ids, dtype=torch.int64, device=dev))
        return self._run_model(ids, torch.from_numpy(pos).to(dev), ForwardContext(meta, self.kv_caches))
