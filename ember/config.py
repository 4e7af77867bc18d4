"""Frozen engine configuration, validated once at start-up.

Each config checks its own fields in ``__post_init__`` and raises
:class:`ConfigError` naming the setting and its allowed range. ``EngineArgs``
(in ``ember.engine.arg_utils``) turns user input into an :class:`EngineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


# ``--kv-cache-dtype`` names (vLLM's): "auto" keeps the model dtype; the FP8
# formats store K/V as they are (no scale), saturating at the format's largest
# finite value: 448 for e4m3 (OCP FP8 "E4M3FN"), 57344 for e5m2.
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}


class ConfigError(ValueError):
    """A configuration value is out of its allowed range."""


def _require(ok: bool, setting: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{setting} must be {allowed}, got {value!r}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class ModelConfig:
    """The model to serve.

    Attributes:
        model: path to a ``.gguf`` file or a Hugging Face directory.
        hf_config: architecture hyperparameters (a ``transformers.PretrainedConfig``,
            read from config.json or built from GGUF metadata).
        architecture: registry name, e.g. ``"LlamaForCausalLM"``.
        dtype: dtype of weights and activations.
        max_model_len: context window in tokens (prompt + output).
        served_model_name: the name clients use in the ``model`` field.
        seed: seed for unseeded random sampling (None: nondeterministic).
        enforce_eager: never capture CUDA graphs.
        piecewise_cuda_graphs: also capture steps with prefill tokens, as
            graphs cut at attention (see :mod:`ember.worker.cuda_graph`).
        skip_tokenizer_init: run without a tokenizer (prompts and outputs are token ids).
        tokenizer: where the tokenizer comes from when not from ``model`` (a
            directory of HF tokenizer files, a ``.gguf`` file or a bundled
            name); None: the model's own.
        attention_backend: force a registered attention backend (``"torch"``,
            ``"triton"``); None picks the device's default.
        quantization: a quantization method by name (``--quantization``,
            see :mod:`ember.layers.quantization`); None: the checkpoint's own
            ``quantization_config``, if any. ``EngineArgs`` resolves a GGUF
            file on CUDA to ``"gguf"``.
    """

    model: str
    hf_config: Any
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    served_model_name: str
    seed: int | None = 0
    enforce_eager: bool = False
    piecewise_cuda_graphs: bool = True
    skip_tokenizer_init: bool = False
    tokenizer: str | None = None
    attention_backend: str | None = None
    quantization: str | None = None

    def __post_init__(self) -> None:
        _require(self.dtype in _DTYPES.values(), "dtype", f"one of {sorted(_DTYPES)}", self.dtype)
        _require(_is_int(self.max_model_len) and self.max_model_len >= 1, "max_model_len", "a positive integer", self.max_model_len)
        _require(bool(self.served_model_name), "served_model_name", "a non-empty string", self.served_model_name)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.hf_config, "head_dim", None)
        return hd or self.hf_config.hidden_size // self.hf_config.num_attention_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache settings.

    Attributes:
        block_size: tokens per KV block.
        kv_cache_memory: bytes to give the KV cache; None sizes it from
            ``memory_utilization`` (on CUDA) or a CPU default.
        memory_utilization: fraction of device memory Ember may use in total
            (weights + activations + KV cache) when ``kv_cache_memory`` is None.
        num_gpu_blocks_override: force the number of blocks (tests, debugging).
        enable_prefix_caching: share the KV blocks of identical prompt prefixes
            across requests (automatic prefix caching).
        swap_space: bytes of host memory for blocks of requests preempted by
            swap (used only with ``preemption_mode="swap"``; 4 GiB as vLLM).
        cache_dtype: element type of the KV cache, a key of
            :data:`KV_CACHE_DTYPES`: ``"auto"`` (the model dtype) or an FP8
            format, which halves the cache's bytes per token (twice the tokens
            in the same memory, half the KV bytes each decode step reads).
            An FP8 cache holds ``x / scale`` with per-layer ``k_scale`` /
            ``v_scale``: the checkpoint's, else 1.0, else calibrated.
        calculate_kv_scales: set each layer's FP8 ``k_scale`` / ``v_scale``
            from the first prefill step: ``amax(|K|) / fp8_max`` and
            ``amax(|V|) / fp8_max`` (448 for e4m3), then fixed; overrides the
            checkpoint's scales. Needs an FP8 ``cache_dtype``.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    swap_space: int = 4 << 30
    cache_dtype: str = "auto"
    calculate_kv_scales: bool = False

    def __post_init__(self) -> None:
        _require(self.cache_dtype in KV_CACHE_DTYPES, "kv_cache_dtype", f"one of {list(KV_CACHE_DTYPES)}",
                 self.cache_dtype)
        _require(isinstance(self.calculate_kv_scales, bool), "calculate_kv_scales", "True or False",
                 self.calculate_kv_scales)
        _require(not self.calculate_kv_scales or KV_CACHE_DTYPES[self.cache_dtype] is not None,
                 "calculate_kv_scales", "False unless kv_cache_dtype is an FP8 format", self.calculate_kv_scales)
        _require(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size", "a power of two in [1, 128]", self.block_size)
        _require(
            self.kv_cache_memory is None or (_is_int(self.kv_cache_memory) and self.kv_cache_memory > 0),
            "kv_cache_memory", "a positive number of bytes", self.kv_cache_memory,
        )
        _require(
            isinstance(self.memory_utilization, (int, float)) and 0.0 < self.memory_utilization <= 1.0,
            "memory_utilization", "in (0, 1]", self.memory_utilization,
        )
        _require(
            self.num_gpu_blocks_override is None or (_is_int(self.num_gpu_blocks_override) and self.num_gpu_blocks_override >= 1),
            "num_gpu_blocks_override", "a positive integer", self.num_gpu_blocks_override,
        )
        _require(isinstance(self.enable_prefix_caching, bool), "enable_prefix_caching", "True or False",
                 self.enable_prefix_caching)
        _require(_is_int(self.swap_space) and self.swap_space >= 0, "swap_space", "a non-negative number of bytes",
                 self.swap_space)

    def kv_cache_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's torch dtype for a model running in ``model_dtype``."""
        return KV_CACHE_DTYPES[self.cache_dtype] or model_dtype


SCHEDULING_POLICY_NAMES = ("fcfs", "priority")
PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits.

    Attributes:
        max_num_batched_tokens: tokens computed per engine step (the token budget);
            prompts longer than this are prefilled in chunks.
        max_num_seqs: requests running at once.
        max_model_len: copied from the model config.
        policy: ``"fcfs"`` (arrival order) or ``"priority"`` (each request's
            ``priority``, lower first, ties by arrival; the lowest-priority
            running request is the one preempted).
        preemption_mode: ``"recompute"`` (free the blocks, redo the prefill later)
            or ``"swap"`` (copy the blocks to host memory and back; recompute
            when the swap space is full).
        max_waiting_time_s: fairness guard of the ``priority`` policy: a request
            waiting longer than this (seconds) is promoted above every priority;
            None disables it.
        async_scheduling: launch each step before the previous step's tokens
            reach the host, where its plan allows, so the device does not wait
            for the host's per-step work (see :mod:`ember.engine.core`).
        num_lookahead_tokens: KV slots reserved past each step's tokens
            (a draft model writes its proposals' K/V there; 0 without one).
    """

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    max_model_len: int = 8192
    policy: str = "fcfs"
    preemption_mode: str = "recompute"
    max_waiting_time_s: float | None = 60.0
    async_scheduling: bool = False
    num_lookahead_tokens: int = 0

    def __post_init__(self) -> None:
        _require(_is_int(self.num_lookahead_tokens) and self.num_lookahead_tokens >= 0, "num_lookahead_tokens",
                 "a non-negative integer", self.num_lookahead_tokens)
        _require(isinstance(self.async_scheduling, bool), "async_scheduling", "a bool", self.async_scheduling)
        _require(_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 1,
                 "max_num_batched_tokens", "a positive integer", self.max_num_batched_tokens)
        _require(_is_int(self.max_num_seqs) and 1 <= self.max_num_seqs <= 65536,
                 "max_num_seqs", "an integer in [1, 65536]", self.max_num_seqs)
        _require(self.max_num_seqs <= self.max_num_batched_tokens,
                 "max_num_seqs", f"<= max_num_batched_tokens ({self.max_num_batched_tokens})", self.max_num_seqs)
        _require(self.policy in SCHEDULING_POLICY_NAMES, "policy", f"one of {list(SCHEDULING_POLICY_NAMES)}", self.policy)
        _require(self.preemption_mode in PREEMPTION_MODES, "preemption_mode", f"one of {list(PREEMPTION_MODES)}",
                 self.preemption_mode)
        _require(self.max_waiting_time_s is None
                 or (isinstance(self.max_waiting_time_s, (int, float)) and not isinstance(self.max_waiting_time_s, bool)
                     and self.max_waiting_time_s > 0),
                 "max_waiting_time_s", "a positive number of seconds or None", self.max_waiting_time_s)


DISTRIBUTED_EXECUTOR_BACKENDS = ("uni", "mp")
# How MoE layers reach their experts' ranks with expert parallelism (see ember.layers.moe.layer).
EXPERT_PARALLEL_DISPATCHES = ("auto", "allreduce", "alltoall")


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is spread over devices (one process per device).

    Attributes:
        tensor_parallel_size: ranks each layer is split over (Megatron-style
            column/row sharding, see :mod:`ember.layers.linear`).
        pipeline_parallel_size: stages the decoder layers are split into, in
            order (see :func:`ember.models.utils.get_pp_layer_range`).
        enable_expert_parallel: MoE layers hold a share of the experts on each
            tensor-parallel rank (whole experts) instead of a slice of every
            expert.
        expert_parallel_dispatch: with expert parallelism, how tokens reach
            their experts' ranks: ``"allreduce"`` (every rank runs its experts
            on every token, one all-reduce sums the shares), ``"alltoall"``
            (each rank routes a slice of the tokens and exchanges rows with
            the experts' owners; never inside a CUDA graph) or ``"auto"``
            (all-to-all for steps of at least
            :data:`ember.layers.moe.layer.ALLTOALL_MIN_TOKENS` tokens, else
            all-reduce); see :class:`ember.layers.moe.FusedMoE`.
        distributed_executor_backend: ``"uni"`` (the model in the engine
            core's process; one device only) or ``"mp"`` (one worker process
            per rank, see :mod:`ember.executor.multiproc`); None: ``"mp"`` when
            ``world_size`` > 1, else ``"uni"``.
        nnodes: hosts the ranks are spread over, ``world_size / nnodes``
            consecutive ranks on each; this engine runs on node 0, the others
            run ``ember worker`` (see :mod:`ember.executor.multiproc`).
        master_addr, master_port: where the ranks meet with several nodes:
            node 0's address, reachable from the others; the process groups'
            rendezvous listens on ``master_port`` and the engine's control
            connections on ``master_port + 1``. With one node the port is
            picked free on 127.0.0.1 when None.
        disable_custom_all_reduce: send every tensor-parallel all-reduce
            through NCCL, never the custom all-reduce over CUDA IPC (see
            :mod:`ember.distributed.custom_all_reduce`).
        enable_dp_attention: data-parallel attention for MLA models: each
            tensor-parallel rank attends a disjoint share of the requests with
            all heads (attention weights replicated) and holds only their
            latent KV cache (a partition of the blocks), while the MLP / MoE
            layers still run tensor-parallel over every token (see
            :mod:`ember.distributed.dp_attention`). Needs
            ``tensor_parallel_size`` > 1 and one pipeline stage.
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_parallel_dispatch: str = "auto"
    distributed_executor_backend: str | None = None
    nnodes: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    disable_custom_all_reduce: bool = False
    enable_dp_attention: bool = False

    def __post_init__(self) -> None:
        _require(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
                 "a positive integer", self.tensor_parallel_size)
        _require(_is_int(self.pipeline_parallel_size) and self.pipeline_parallel_size >= 1,
                 "pipeline_parallel_size", "a positive integer", self.pipeline_parallel_size)
        _require(isinstance(self.enable_expert_parallel, bool), "enable_expert_parallel", "True or False",
                 self.enable_expert_parallel)
        _require(self.expert_parallel_dispatch in EXPERT_PARALLEL_DISPATCHES, "expert_parallel_dispatch",
                 f"one of {list(EXPERT_PARALLEL_DISPATCHES)}", self.expert_parallel_dispatch)
        _require(self.expert_parallel_dispatch == "auto" or self.enable_expert_parallel, "expert_parallel_dispatch",
                 "'auto' unless enable_expert_parallel is set", self.expert_parallel_dispatch)
        _require(isinstance(self.disable_custom_all_reduce, bool), "disable_custom_all_reduce", "True or False",
                 self.disable_custom_all_reduce)
        _require(self.distributed_executor_backend is None
                 or self.distributed_executor_backend in DISTRIBUTED_EXECUTOR_BACKENDS,
                 "distributed_executor_backend", f"one of {list(DISTRIBUTED_EXECUTOR_BACKENDS)}",
                 self.distributed_executor_backend)
        _require(self.executor_backend == "mp" or self.world_size == 1, "distributed_executor_backend",
                 f"'mp' with {self.world_size} ranks (tensor x pipeline parallel)",
                 self.distributed_executor_backend)
        _require(_is_int(self.nnodes) and self.nnodes >= 1 and self.world_size % self.nnodes == 0, "nnodes",
                 f"a positive divisor of the {self.world_size} ranks (tensor x pipeline parallel)", self.nnodes)
        _require(self.master_port is None or (_is_int(self.master_port) and 0 < self.master_port < 65535),
                 "master_port", "a TCP port below 65535 (the next port is used too)", self.master_port)
        if self.nnodes > 1:
            _require(self.master_port is not None, "master_port",
                     "set with several nodes (the other nodes' `ember worker` must know it)", self.master_port)
            _require(self.executor_backend == "mp", "distributed_executor_backend", "'mp' with several nodes",
                     self.distributed_executor_backend)
        _require(isinstance(self.enable_dp_attention, bool), "enable_dp_attention", "True or False",
                 self.enable_dp_attention)
        if self.enable_dp_attention:
            _require(self.tensor_parallel_size > 1, "enable_dp_attention",
                     "False with tensor_parallel_size 1 (it splits requests over the tensor-parallel ranks)", True)
            _require(self.pipeline_parallel_size == 1, "enable_dp_attention",
                     "False with pipeline_parallel_size > 1 (not supported)", True)

    @property
    def local_world_size(self) -> int:
        """Ranks (devices) on each node."""
        return self.world_size // self.nnodes

    @property
    def world_size(self) -> int:
        """Ranks (worker processes, one device each): tensor x pipeline parallel size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The executor that runs: ``distributed_executor_backend`` resolved."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        return "mp" if self.world_size > 1 else "uni"


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs: ``"cpu"`` or ``"cuda"``."""

    device: str = "cpu"

    def __post_init__(self) -> None:
        _require(self.device in ("cpu", "cuda"), "device", "'cpu' or 'cuda'", self.device)
        if self.device == "cuda":
            _require(torch.cuda.is_available(), "device", "'cpu' on a machine without CUDA", self.device)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)


LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")


@dataclass(frozen=True)
class LoadConfig:
    """How weights are read: ``auto`` picks GGUF or safetensors from the path."""

    load_format: str = "auto"

    def __post_init__(self) -> None:
        _require(self.load_format in LOAD_FORMATS, "load_format", f"one of {list(LOAD_FORMATS)}", self.load_format)


@dataclass(frozen=True)
class KernelConfig:
    """Which fused decode kernels replace the plain layers after load (CUDA,
    one rank (tensor and pipeline parallel size 1), unquantized weights; elsewhere the plain path runs
    whatever these say). Each switch exists for A/B timing (``--no-...`` flags).

    Attributes:
        skinny_gemm: linear layers and the LM head take the skinny Triton GEMM
            at decode row counts (at most 16 rows) instead of cuBLAS.
        fold_norm: a pre-norm block's RMSNorm is folded into the GEMM that
            consumes it, and the residual add into the epilogue of the GEMM
            that ends the block (needs ``skinny_gemm``).
        fold_norm_weights: the input RMSNorm's weight is multiplied into the
            qkv weight at load and the sums of squares travel from the previous
            layer's down GEMM (needs ``fold_norm``).
        pdl: programmatic dependent launch of the skinny GEMMs on Hopper.
    """

    skinny_gemm: bool = True
    fold_norm: bool = True
    fold_norm_weights: bool = True
    pdl: bool = True


@dataclass(frozen=True)
class EngineConfig:
    """All configs of one engine."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    load_config: LoadConfig
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    # ember.spec_decode.config.SpeculativeConfig, or None (no speculative decoding).
    speculative_config: Any = None


def parse_dtype(name: str) -> torch.dtype:
    """Map ``"float32" | "float16" | "bfloat16"`` to a torch dtype.

    Raises:
        ConfigError: for any other name.
    """
    _require(name in _DTYPES, "dtype", f"one of {sorted(_DTYPES)}", name)
    return _DTYPES[name]
