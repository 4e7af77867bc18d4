"""EngineArgs: user-facing engine options (CLI flags and keyword arguments)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass

import torch

from ember.config import (
    DISTRIBUTED_EXECUTOR_BACKENDS,
    EXPERT_PARALLEL_DISPATCHES,
    KV_CACHE_DTYPES,
    LOAD_FORMATS,
    PREEMPTION_MODES,
    SCHEDULING_POLICY_NAMES,
    CacheConfig,
    ConfigError,
    DeviceConfig,
    EngineConfig,
    KernelConfig,
    LoadConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_dtype,
)

# NOTE: on CPU the default KV cache is a fixed size rather than a fraction of RAM,
# as vLLM's CPU backend does: host memory is shared with everything else.
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30


def _parse_bytes(text: str) -> int:
    """Parse ``"512M"``, ``"4G"``, ``"4GiB"`` or a plain number of bytes."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
    num = s[:-1] if mult != 1 else s
    try:
        value = float(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"kv-cache-memory: cannot parse {text!r} as a size like 2G or 512M") from None
    return int(value)


def _parse_swap_space(text: str) -> int:
    """Bytes of ``--swap-space``: a size like ``512M`` or ``4G``, or a plain
    number of GiB (``4`` = 4 GiB, as vLLM's flag)."""
    try:
        return int(float(text) * (1 << 30))
    except ValueError:
        return _parse_bytes(text)


def _json_object(flag: str):
    """An argparse ``type`` that reads a JSON object for ``flag`` (its name
    in error messages)."""
    def parse(text: str) -> dict:
        import json

        try:
            value = json.loads(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{flag}: not JSON: {e}") from None
        if not isinstance(value, dict):
            raise argparse.ArgumentTypeError(f"{flag}: expected a JSON object")
        return value

    return parse


@dataclass
class EngineArgs:
    """Options that build an :class:`EngineConfig` (see ``ember serve --help``)."""

    model: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = "auto"
    calculate_kv_scales: bool = False
    memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int = 256
    device: str = "auto"
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False
    expert_parallel_dispatch: str = "auto"
    enable_dp_attention: bool = False
    distributed_executor_backend: str | None = None
    nnodes: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    disable_custom_all_reduce: bool = False
    quantization: str | None = None
    seed: int | None = 0
    enforce_eager: bool = False
    piecewise_cuda_graphs: bool = True
    skip_tokenizer_init: bool = False
    tokenizer: str | None = None
    hf_overrides: dict | None = None
    attention_backend: str | None = None
    enable_prefix_caching: bool = True
    swap_space: int = 4 << 30
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    max_waiting_time_s: float | None = 60.0
    # None: on for CUDA (the host's per-step work hides behind the device's),
    # off for CPU (its kernels run synchronously, so there is nothing to hide).
    async_scheduling: bool | None = None
    # Decode fusions (KernelConfig): each on by default, off for A/B timing.
    skinny_gemm: bool = True
    fold_norm: bool = True
    fold_norm_weights: bool = True
    pdl: bool = True
    # Speculative decoding (ember.spec_decode.config.SpeculativeConfig fields), or None.
    speculative_config: dict | None = None

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        d = EngineArgs()
        parser.add_argument("--model", "-m", default=None,
                            help="path to a .gguf file or HF directory, or a bundled model name "
                                 "(default: SmolLM2-135M-Instruct)")
        parser.add_argument("--served-model-name", default=None, help="model name in the API (default: derived from --model)")
        parser.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"],
                            help="auto: float32 on CPU, bfloat16 on CUDA")
        parser.add_argument("--max-model-len", type=int, default=None, help="context window in tokens (default: the model's)")
        parser.add_argument("--block-size", type=int, default=d.block_size, help="tokens per KV-cache block")
        parser.add_argument("--kv-cache-memory", type=_parse_bytes, default=None,
                            help="memory for the KV cache, e.g. 2G (default: 1G on CPU, --memory-utilization on CUDA)")
        parser.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=list(KV_CACHE_DTYPES),
                            help="KV-cache element type: auto (the model dtype) or FP8 (fp8 = fp8_e4m3), which "
                                 "holds twice the tokens and halves the KV bytes read per decode step; values "
                                 "are stored divided by per-layer scales: the checkpoint's k_scale/v_scale, "
                                 "else 1.0 (not supported for MLA models)")
        parser.add_argument("--calculate-kv-scales", action="store_true",
                            help="with an FP8 --kv-cache-dtype: set each layer's K/V scales from the first "
                                 "prefill (amax / largest FP8 value), then keep them")
        parser.add_argument("--memory-utilization", "--gpu-memory-utilization", dest="memory_utilization", type=float,
                            default=d.memory_utilization, help="fraction of GPU memory to use (CUDA only)")
        parser.add_argument("--num-gpu-blocks-override", type=int, default=None, help=argparse.SUPPRESS)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                            help="token budget per engine step (default: 2048)")
        parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs, help="max requests running at once")
        parser.add_argument("--enable-prefix-caching", dest="enable_prefix_caching", action="store_true",
                            default=d.enable_prefix_caching,
                            help="reuse the KV blocks of shared prompt prefixes across requests (default: on)")
        parser.add_argument("--no-prefix-caching", "--no-enable-prefix-caching", dest="enable_prefix_caching",
                            action="store_false", help="turn automatic prefix caching off")
        parser.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=list(SCHEDULING_POLICY_NAMES),
                            help="fcfs: arrival order; priority: each request's priority (lower first, ties by "
                                 "arrival), preempting the lowest-priority running request")
        parser.add_argument("--preemption-mode", default=d.preemption_mode, choices=list(PREEMPTION_MODES),
                            help="when KV blocks run out: recompute the preempted request later, or swap its "
                                 "blocks to host memory (recompute when --swap-space is full)")
        parser.add_argument("--swap-space", type=_parse_swap_space, default=d.swap_space,
                            help="host memory for swapped-out KV blocks, e.g. 512M; a plain number is GiB "
                                 "(default: 4 GiB; used with --preemption-mode swap)")
        parser.add_argument("--max-waiting-time", dest="max_waiting_time_s", type=float, default=d.max_waiting_time_s,
                            help="priority policy: seconds after which a waiting request is promoted above every "
                                 "priority, so low priority never means never (0 disables; default: 60)")
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help="launch each decode step before the previous step's tokens reach the host, "
                                 "hiding the host's per-step work behind the device's (default: on for CUDA, "
                                 "off for CPU, whose kernels run synchronously)")
        parser.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"])
        parser.add_argument("--load-format", default=d.load_format, choices=list(LOAD_FORMATS))
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                            help="split every layer over this many devices (one worker process each)")
        parser.add_argument("--pipeline-parallel-size", "-pp", type=int, default=d.pipeline_parallel_size,
                            help="split the decoder layers into this many consecutive stages (one worker process "
                                 "per stage and tensor-parallel rank)")
        parser.add_argument("--enable-expert-parallel", action="store_true",
                            help="MoE layers: each tensor-parallel rank holds whole experts (a share of them) "
                                 "instead of a slice of every expert")
        parser.add_argument("--expert-parallel-dispatch", default=d.expert_parallel_dispatch,
                            choices=list(EXPERT_PARALLEL_DISPATCHES),
                            help="with --enable-expert-parallel: allreduce (every rank runs its experts on every "
                                 "token), alltoall (tokens sent to their experts' ranks and back; steps run "
                                 "eagerly) or auto (alltoall for large steps, allreduce for decode-sized ones)")
        parser.add_argument("--enable-dp-attention", action="store_true",
                            help="MLA models (DeepSeek-V3): each tensor-parallel rank attends its own share of the "
                                 "requests with all heads and holds only their latent KV cache; the MLP/MoE layers "
                                 "stay tensor-parallel over all tokens")
        parser.add_argument("--distributed-executor-backend", default=None, choices=list(DISTRIBUTED_EXECUTOR_BACKENDS),
                            help="uni: the model runs in the engine core's process (one device); mp: one worker "
                                 "process per rank (default: mp with several ranks, else uni)")
        parser.add_argument("--nnodes", type=int, default=d.nnodes,
                            help="hosts the ranks are spread over; node 0 runs this engine, every other node runs "
                                 "`ember worker --master-addr ADDR --master-port PORT --node-rank N` (torchrun-style)")
        parser.add_argument("--master-addr", default=d.master_addr,
                            help="node 0's address, reachable from the other nodes (default: $MASTER_ADDR, "
                                 "else 127.0.0.1)")
        parser.add_argument("--master-port", type=int, default=d.master_port,
                            help="rendezvous port on node 0; the engine's control connections use the next port "
                                 "(default: $MASTER_PORT; needed with several nodes)")
        parser.add_argument("--disable-custom-all-reduce", action="store_true",
                            help="send every tensor-parallel all-reduce through NCCL instead of the custom "
                                 "all-reduce over CUDA IPC that takes small messages on one host")
        parser.add_argument("--quantization", "-q", default=None, choices=_quantization_names() + ["none"],
                            help="quantize the weights with this method (see ember.layers.quantization); "
                                 "int8_weight_only: linear layers' weights in int8 with per-channel scales, "
                                 "quantized at load; gguf: a GGUF file's quantized tensors run as stored "
                                 "(default: the checkpoint's own quantization_config, if any; gguf for GGUF "
                                 "files on CUDA); none: no method forced (a GGUF file is dequantized at load)")
        parser.add_argument("--seed", type=int, default=d.seed, help="seed for unseeded sampling")
        parser.add_argument("--enforce-eager", action="store_true", help="do not capture CUDA graphs")
        parser.add_argument("--piecewise-cuda-graphs", action=argparse.BooleanOptionalAction,
                            default=d.piecewise_cuda_graphs,
                            help="run steps with prefill tokens as CUDA graphs cut at attention, not eagerly "
                                 "(default: on; decode steps always use whole-step graphs)")
        kernels = parser.add_argument_group(
            "decode kernels", "fused decode kernels swapped in after load on CUDA (tensor-parallel size 1, "
                              "unquantized layers); turn one off for A/B timing")
        kernels.add_argument("--no-skinny-gemm", dest="skinny_gemm", action="store_false",
                             help="decode rows (<= 16) use cuBLAS instead of the skinny Triton GEMM (also turns "
                                  "off every fusion below)")
        kernels.add_argument("--no-fold-norm", dest="fold_norm", action="store_false",
                             help="keep each pre-norm RMSNorm and residual add out of the decode GEMMs")
        kernels.add_argument("--no-fold-norm-weights", dest="fold_norm_weights", action="store_false",
                             help="keep the input RMSNorm weights out of the qkv weights (no sums-of-squares "
                                  "hand-off between layers)")
        kernels.add_argument("--no-pdl", dest="pdl", action="store_false",
                             help="launch the decode GEMMs without programmatic dependent launch (Hopper)")
        parser.add_argument("--speculative-config", type=_json_object("speculative-config"), default=None,
                            help='speculative decoding as a JSON object, e.g. \'{"method": "ngram", '
                                 '"num_speculative_tokens": 3, "prompt_lookup_max": 4}\' (methods: ngram; '
                                 'draft_model with "model": a draft of the same vocabulary; '
                                 'eagle3 with "model": an EAGLE-3 head of the target\'s hidden size; mtp: the '
                                 'checkpoint\'s own multi-token-prediction layers (DeepSeek-V3); '
                                 'disable_by_batch_size: no drafts above this many running requests)')
        parser.add_argument("--hf-overrides", type=_json_object("hf-overrides"), default=None,
                            help='JSON object of model config fields to override, e.g. \'{"num_hidden_layers": 4}\'')
        parser.add_argument("--attention-backend", default=None, choices=["torch", "triton"],
                            help="force an attention backend (default: triton on CUDA, torch elsewhere)")
        parser.add_argument("--skip-tokenizer-init", action="store_true",
                            help="run without a tokenizer: prompts and outputs are token ids")
        parser.add_argument("--tokenizer", default=None,
                            help="take the tokenizer from here instead of the model (a directory of HF "
                                 "tokenizer files, a .gguf file or a bundled name); e.g. to serve a preset "
                                 "with --load-format dummy as text")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineArgs:
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)})

    def create_engine_config(self) -> EngineConfig:
        """Resolve the model, read its architecture and validate every setting.

        Raises:
            ConfigError: a setting is out of range (the message names it).
            ModelLoadError: the model path is missing or not a model.
        """
        from ember.loader import read_hf_config, resolve_model_source
        from ember.loader.download import DEFAULT_MODEL
        from ember.models.registry import ModelRegistry
        from ember.layers.rotary import rope_context_len

        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        device_config = DeviceConfig(device=device)
        load_config = LoadConfig(load_format=self.load_format)
        parallel_config = ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                                         pipeline_parallel_size=self.pipeline_parallel_size,
                                         enable_expert_parallel=self.enable_expert_parallel,
                                         expert_parallel_dispatch=self.expert_parallel_dispatch,
                                         enable_dp_attention=self.enable_dp_attention,
                                         distributed_executor_backend=self.distributed_executor_backend,
                                         nnodes=self.nnodes,
                                         master_addr=self.master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                         master_port=self.master_port if self.master_port is not None
                                         else _env_port(),
                                         disable_custom_all_reduce=self.disable_custom_all_reduce)

        source = resolve_model_source(self.model or DEFAULT_MODEL)
        hf_config = read_hf_config(source)
        for key, value in (self.hf_overrides or {}).items():
            # NOTE: quantization_config may be added: it describes a checkpoint's
            # storage (e.g. block FP8 for a preset with --load-format dummy).
            if not hasattr(hf_config, key) and key != "quantization_config":
                raise ConfigError(f"hf_overrides: the model config has no field {key!r}")
            setattr(hf_config, key, value)
        architecture = ModelRegistry.resolve(hf_config)
        quantization = None if self.quantization == "none" else self.quantization
        if self.quantization is None and source.format == "gguf" and device == "cuda" and self.load_format != "dummy":
            # NOTE: the one place a GGUF file's default is decided: on CUDA its
            # quantized tensors run as stored (ember.layers.quantization.gguf);
            # elsewhere they are dequantized at load unless --quantization gguf.
            # Dummy weights stay dense (random block bytes would hold NaN scales).
            quantization = "gguf"
        _check_quantization(quantization, hf_config)

        dtype_name = self.dtype
        if dtype_name == "auto":
            dtype_name = "float32" if device == "cpu" else "bfloat16"
        context = rope_context_len(hf_config)  # YaRN configs serve past max_position_embeddings
        max_model_len = self.max_model_len or context
        if max_model_len > context:
            raise ConfigError(f"max_model_len must be <= the model's context window ({context}), got {max_model_len}")
        name = self.served_model_name or _default_served_name(self.model or DEFAULT_MODEL)
        model_config = ModelConfig(
            model=source.path,
            hf_config=hf_config,
            architecture=architecture,
            dtype=parse_dtype(dtype_name),
            max_model_len=max_model_len,
            served_model_name=name,
            seed=self.seed,
            enforce_eager=self.enforce_eager,
            piecewise_cuda_graphs=self.piecewise_cuda_graphs,
            attention_backend=self.attention_backend,
            skip_tokenizer_init=self.skip_tokenizer_init or (source.format == "preset" and self.tokenizer is None),
            tokenizer=self.tokenizer,
            quantization=quantization,
        )
        kv_bytes = self.kv_cache_memory
        if kv_bytes is None and device == "cpu":
            kv_bytes = CPU_DEFAULT_KV_CACHE_BYTES
        cache_config = CacheConfig(
            block_size=self.block_size,
            kv_cache_memory=kv_bytes,
            memory_utilization=self.memory_utilization,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            enable_prefix_caching=self.enable_prefix_caching,
            swap_space=self.swap_space,
            cache_dtype=self.kv_cache_dtype,
            calculate_kv_scales=self.calculate_kv_scales,
        )
        budget = self.max_num_batched_tokens or max(2048, min(self.max_num_seqs, 2048))
        scheduler_config = SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=min(self.max_num_seqs, budget),
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
            preemption_mode=self.preemption_mode,
            max_waiting_time_s=None if self.max_waiting_time_s == 0 else self.max_waiting_time_s,
            # NOTE: a pipeline's first stage needs the last stage's tokens on its host
            # before the next step: no step is launched ahead there.
            async_scheduling=(device == "cuda" and self.pipeline_parallel_size == 1 if self.async_scheduling is None
                              else self.async_scheduling),
        )
        if scheduler_config.async_scheduling and parallel_config.pipeline_parallel_size > 1:
            raise ConfigError("async_scheduling is not supported with pipeline_parallel_size > 1 (the first stage "
                              "needs each step's sampled tokens before the next step)")
        if parallel_config.enable_dp_attention:
            _check_dp_attention(architecture, cache_config, scheduler_config)
        from ember.spec_decode.config import SpeculativeConfig

        speculative_config = SpeculativeConfig.from_dict(self.speculative_config)
        if speculative_config is not None and parallel_config.world_size > 1:
            raise ConfigError("speculative_config is not supported with tensor_parallel_size or "
                              "pipeline_parallel_size above 1 yet")
        if speculative_config is not None and speculative_config.method == "mtp":
            _check_mtp(model_config)
        if speculative_config is not None and speculative_config.uses_draft_model:
            if speculative_config.method == "eagle3":
                from ember.models.llama_eagle3 import eagle3_head_config

                draft_model_config = eagle3_head_config(speculative_config.model, model_config)
            else:
                draft_model_config = _draft_model_config(speculative_config.model, model_config)
            speculative_config = dataclasses.replace(speculative_config, draft_model_config=draft_model_config)
        if speculative_config is not None and speculative_config.proposes_on_worker:
            scheduler_config = dataclasses.replace(
                scheduler_config, num_lookahead_tokens=speculative_config.num_speculative_tokens)
        kernel_config = KernelConfig(skinny_gemm=self.skinny_gemm, fold_norm=self.fold_norm,
                                     fold_norm_weights=self.fold_norm_weights, pdl=self.pdl)
        return EngineConfig(model_config, cache_config, scheduler_config, parallel_config, device_config, load_config,
                            kernel_config=kernel_config, speculative_config=speculative_config)


def _check_dp_attention(architecture: str, cache_config: CacheConfig, scheduler_config: SchedulerConfig) -> None:
    """Refuse what data-parallel attention does not support.

    Raises:
        ConfigError: a model without MLA data-parallel attention, prefix
            caching on (a hit could name another rank's blocks), or
            preemption by swap.
    """
    from ember.models.registry import ModelRegistry

    if not getattr(ModelRegistry.load_class(architecture), "supports_dp_attention", False):
        raise ConfigError(f"enable_dp_attention needs an MLA model (DeepSeek-V3); {architecture} is not one")
    if cache_config.enable_prefix_caching:
        raise ConfigError("enable_prefix_caching is not supported with enable_dp_attention (each rank caches only "
                          "its own requests' blocks); pass --no-enable-prefix-caching")
    if scheduler_config.preemption_mode == "swap":
        raise ConfigError("preemption_mode 'swap' is not supported with enable_dp_attention; use 'recompute'")


def _check_mtp(target: ModelConfig) -> None:
    """Speculative method ``mtp`` needs a target with multi-token-prediction layers.

    Raises:
        ConfigError: the architecture has no MTP module, or its config has
            ``num_nextn_predict_layers`` 0.
    """
    from ember.models.registry import ModelRegistry

    if target.architecture not in ModelRegistry.mtp_architectures():
        raise ConfigError(f"speculative_config.method 'mtp' needs a model with multi-token-prediction layers; "
                          f"{target.architecture} has none (MTP: {ModelRegistry.mtp_architectures()})")
    n = getattr(target.hf_config, "num_nextn_predict_layers", 0) or 0
    if n < 1:
        raise ConfigError(f"speculative_config.method 'mtp': {target.model!r} has num_nextn_predict_layers {n} "
                          f"(no MTP layer in its checkpoint)")


def _draft_model_config(draft: str, target: ModelConfig) -> ModelConfig:
    """The draft model's config for ``speculative_config.model``: the target's
    dtype, context length and seed, and its vocabulary.

    Raises:
        ConfigError: the draft cannot be found or read, is an unknown
            architecture, has a shorter context window than ``max_model_len``,
            or another vocabulary than the target (size or special tokens).
    """
    from ember.layers.rotary import rope_context_len
    from ember.loader import read_hf_config, resolve_model_source
    from ember.loader.base import ModelLoadError
    from ember.models.registry import ModelRegistry

    try:
        source = resolve_model_source(draft)
        hf_config = read_hf_config(source)
        architecture = ModelRegistry.resolve(hf_config)
    except (ModelLoadError, ValueError, OSError) as e:
        raise ConfigError(f"speculative_config.model {draft!r}: {e}") from None
    tv, dv = target.vocab_size, hf_config.vocab_size
    if dv != tv:
        raise ConfigError(f"speculative_config.model {draft!r} has a vocabulary of {dv} tokens, the target "
                          f"{target.model!r} {tv}: a draft model must share the target's vocabulary")
    for key in ("bos_token_id", "eos_token_id"):
        t, d = getattr(target.hf_config, key, None), getattr(hf_config, key, None)
        if t is not None and d is not None and t != d:
            raise ConfigError(f"speculative_config.model {draft!r} has {key} {d}, the target {t}: a draft model "
                              f"must share the target's tokenizer")
    if rope_context_len(hf_config) < target.max_model_len:
        raise ConfigError(f"speculative_config.model {draft!r}: its context window ({rope_context_len(hf_config)}) "
                          f"is shorter than max_model_len ({target.max_model_len})")
    return ModelConfig(model=source.path, hf_config=hf_config, architecture=architecture, dtype=target.dtype,
                       max_model_len=target.max_model_len, served_model_name=draft, seed=target.seed,
                       enforce_eager=True, skip_tokenizer_init=True,
                       attention_backend=target.attention_backend)


def _env_port() -> int | None:
    """``$MASTER_PORT`` (torchrun's variable), or None when unset.

    Raises:
        ConfigError: it is not an integer.
    """
    text = os.environ.get("MASTER_PORT")
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"MASTER_PORT must be an integer port, got {text!r}") from None


def _quantization_names() -> list[str]:
    from ember.layers.quantization import QUANTIZATION_METHODS

    return sorted(QUANTIZATION_METHODS)


def _check_quantization(quantization: str | None, hf_config: object) -> None:
    """Resolve the model's quantization method once at start-up, so that a
    bad choice fails before the model loads.

    Raises:
        ConfigError: ``quantization`` names no registered method, or one the
            checkpoint's ``quantization_config`` contradicts, or the
            checkpoint's scheme is one its method cannot load, or one that
            neither a method nor the loader runs.
    """
    from ember.layers.quantization import get_quant_config
    from ember.layers.quantization.checkpoint_errors import unsupported_scheme_message

    if quantization is not None and not isinstance(quantization, str):
        raise ConfigError(f"quantization must be a method name or None, got {quantization!r}")
    try:
        method = get_quant_config(quantization, hf_config)
    except ValueError as e:
        raise ConfigError(f"quantization: {e}") from None
    unsupported = unsupported_scheme_message(hf_config) if method is None else None
    if unsupported is not None:
        raise ConfigError(f"quantization: {unsupported}")


def _default_served_name(model: str) -> str:
    base = os.path.basename(os.path.normpath(model))
    return base.removesuffix(".gguf") or model


__all__ = ["EngineArgs", "ConfigError"]
