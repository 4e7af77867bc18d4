"""Measured ceilings of the device (copy bandwidth, bf16 matmul rate) and the
model's bytes and FLOPs per token, for roofline bounds in benchmark output.

Method: the copy bandwidth counts bytes read
plus bytes written of a large device-to-device copy; the matmul rate is a large
square bf16 product on random data. Both are medians of timed repeats after a
warm-up, measured in the benchmark's own process.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceCeilings:
    """``copy_bytes_per_s``: bytes read + written per second;
    ``matmul_flops_per_s``: dense bf16 (CPU: float32) FLOP/s."""

    device: str
    name: str
    copy_bytes_per_s: float
    matmul_flops_per_s: float


def _time(fn, repeats: int, device: torch.device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> DeviceCeilings:
    """Measure copy bandwidth and matmul rate on ``device`` (a few seconds)."""
    cuda = device.type == "cuda"
    n_bytes = (2 << 30) if cuda else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    t_copy = _time(functools.partial(dst.copy_, src), 20 if cuda else 5, device)
    del src, dst
    n = 8192 if cuda else 1024
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t_mm = _time(lambda: a @ b, 10 if cuda else 3, device)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    return DeviceCeilings(device.type, name, 2 * n_bytes / t_copy, 2 * n ** 3 / t_mm)


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """Expected number of distinct experts that ``num_tokens`` tokens route
    to when each picks ``top_k`` of ``num_experts`` uniformly at random,
    independently of the others: each expert is missed by one token with
    probability ``1 - top_k / num_experts``, so

        E[distinct] = num_experts * (1 - (1 - top_k / num_experts) ** num_tokens)

    (``top_k`` at one token, ``num_experts`` as the batch grows). Real routers
    are skewed towards some experts, which touches fewer: the bytes this
    counts are an upper estimate for them, and an MBU from them a high one.
    """
    if num_experts <= 0 or num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - min(top_k, num_experts) / num_experts) ** num_tokens)


@dataclass(frozen=True)
class ModelCost:
    """Bytes and FLOPs of one model as it is stored on the device (per
    tensor-parallel rank), for roofline bounds.

    Attributes:
        weight_bytes: bytes of every weight tensor as stored (``numel *
            element_size`` of the actual tensors: int8 / FP8 / packed int32 /
            GGUF blocks and their scales count at their own size), the token
            embedding included.
        dense_bytes_per_step: weight bytes every forward step reads whatever
            its batch: all weights but the routed experts and the token
            embedding table (a step reads only its tokens' rows of it; a table
            tied to the LM head is read whole, as the head).
        expert_bytes: bytes of all routed experts of this rank (0 for dense
            models); a step reads those of the experts its tokens route to.
        num_experts, top_k: routed experts per MoE layer and experts per token.
        flops_per_token: matmul FLOPs of one token: 2 x the logical (unpacked)
            weight elements of every linear layer and the LM head, the routed
            experts' scaled by ``top_k / num_experts``.
        kv_bytes_per_token: KV-cache bytes of one token across all layers, in
            the cache dtype (the model's KV cache layout).
        attn_flops_per_token_ctx: attention FLOPs of one query token per context token.
    """

    weight_bytes: int
    flops_per_token: int
    kv_bytes_per_token: int
    attn_flops_per_token_ctx: int
    dense_bytes_per_step: int = 0
    expert_bytes: int = 0
    num_experts: int = 0
    top_k: int = 0

    def weight_bytes_read(self, num_tokens: int) -> float:
        """Weight bytes one forward step over ``num_tokens`` tokens reads: the
        dense weights, plus each routed expert's bytes times the expected
        number of distinct experts its tokens touch
        (:func:`expected_distinct_experts`)."""
        if not self.expert_bytes:
            return float(self.dense_bytes_per_step)
        touched = expected_distinct_experts(self.num_experts, self.top_k, num_tokens)
        return self.dense_bytes_per_step + self.expert_bytes * touched / self.num_experts


def _stored_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weight tensors ``module`` itself holds: its parameters, and for a
    layer with a quantization method (which may keep its kernel's tensors as
    buffers or plain attributes) those too. Other buffers (RoPE tables, KV
    scales) are not weights read whole each step."""
    tensors = list(module.parameters(recurse=False))
    if getattr(module, "quant_method", None) is not None:
        tensors += list(module.buffers(recurse=False))
        tensors += [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
    return tensors


def _tensor_key(t: torch.Tensor) -> tuple:
    # NOTE: meta tensors all have data_ptr 0: told apart by identity only.
    return (id(t),) if t.device.type == "meta" else (t.data_ptr(), t.numel(), t.element_size())


def _matmul_elements(module: torch.nn.Module) -> int | None:
    """Logical weight elements of one token's matmul through ``module``
    (None: not a layer this knows)."""
    from ember.layers.linear import LinearBase
    from ember.layers.moe.layer import FusedMoE
    from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

    if isinstance(module, LinearBase):
        return module.in_features * module.out_features
    if isinstance(module, ParallelLMHead):
        return module.num_embeddings_per_partition * module.embedding_dim
    if isinstance(module, VocabParallelEmbedding):
        return 0  # a lookup
    if isinstance(module, FusedMoE):
        return module.num_local_experts * 3 * module.hidden_size * module.intermediate_size
    return None


def model_cost(model: torch.nn.Module, model_config, kv_cache_dtype: torch.dtype | None = None) -> ModelCost:
    """Bytes and FLOPs of ``model`` as loaded (see :class:`ModelCost`); the KV
    bytes per token in ``kv_cache_dtype`` (default: the model dtype)."""
    from ember.layers.moe.layer import FusedMoE
    from ember.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding

    hf = model_config.hf_config
    top_k = int(getattr(hf, "num_experts_per_tok", 0) or 0)
    seen: set[tuple] = set()
    total = dense = experts = 0
    num_experts = 0
    dense_flops = expert_flops = 0
    for module in model.modules():
        is_table = isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead)
        for t in _stored_tensors(module):
            key = _tensor_key(t)
            if key in seen:
                continue  # a tied table is owned by the module met first: the embedding
            seen.add(key)
            nbytes = t.numel() * t.element_size()
            total += nbytes
            if isinstance(module, FusedMoE):
                experts += nbytes
            elif not is_table:
                dense += nbytes
        elements = _matmul_elements(module)
        if isinstance(module, FusedMoE):
            num_experts = module.num_experts
            expert_flops += elements * min(top_k, num_experts) / num_experts if num_experts else 0
        elif elements is not None:
            dense_flops += elements
        else:  # e.g. routers, MLA's absorbed projections
            dense_flops += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2)
    embed = model.get_submodule("model.embed_tokens")
    head = model.get_submodule("lm_head")
    if getattr(head, "weight", None) is not None and getattr(embed, "weight", None) is head.weight:
        dense += head.weight.numel() * head.weight.element_size()  # tied: read whole as the LM head
    dtype = kv_cache_dtype or model_config.dtype
    spec = getattr(type(model), "kv_cache_spec", None)
    if spec is not None:
        kv = spec(hf, 1, dtype).bytes_per_block  # one-token blocks: bytes per token across layers
    else:
        elem = torch.empty((), dtype=dtype).element_size()
        kv = 2 * model_config.num_layers * model_config.num_kv_heads * model_config.head_dim * elem
    attn = 4 * model_config.num_layers * hf.num_attention_heads * model_config.head_dim
    return ModelCost(total, int(2 * (dense_flops + expert_flops)), kv, attn, dense_bytes_per_step=dense,
                     expert_bytes=experts, num_experts=num_experts, top_k=top_k)
