"""Weight memory per rank of each parallel layout, computed (no GPU needed).

For every layout, each rank's model is built on the meta device exactly as
that rank builds it (its tensor-parallel slices, its pipeline stage's
layers, its experts with expert parallelism), and its parameters' bytes are
summed: in bf16, and as a block-FP8 checkpoint (128 x 128 weight blocks,
DeepSeek-V3's format: FP8 linear and expert weights with float32 block
scales; embeddings, norms and the LM head in bf16). The KV cache per token and rank follows from the attention layout
(KV heads split over tensor-parallel ranks, replicated when there are more
ranks than KV heads; layers split over stages; an MLA latent cache is whole on
every rank, or, with data-parallel attention ("DP-attn": attention weights
replicated, each rank holding its own requests' latents), a 1/tp share of
the tokens per rank on average).

Usage: python benchmarks/parallel_memory.py [--json results/parallel_memory.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import dataclass

import torch

from ember.distributed import parallel_state as ps
from ember.distributed.communicator import Communicator
from ember.layers.attention import get_attention_backend
from ember.layers.quantization.fp8 import Fp8Config
from ember.loader import read_hf_config, resolve_model_source
from ember.models.registry import ModelRegistry


@dataclass(frozen=True)
class Layout:
    model: str
    tp: int = 1
    pp: int = 1
    ep: bool = False
    dp_attention: bool = False

    @property
    def name(self) -> str:
        parts = ([f"TP={self.tp}"] + ([f"PP={self.pp}"] if self.pp > 1 else []) + (["EP"] if self.ep else [])
                 + (["DP-attn"] if self.dp_attention else []))
        return " x ".join(parts)


LAYOUTS = [
    Layout("Llama-3.1-8B"), Layout("Llama-3.1-8B", tp=2),
    Layout("Llama-3.1-70B", tp=4), Layout("Llama-3.1-70B", tp=8), Layout("Llama-3.1-70B", tp=2, pp=2),
    Layout("Qwen3-30B-A3B", tp=4, ep=True), Layout("Qwen3-30B-A3B", tp=8, ep=True),
    Layout("Qwen3-235B-A22B", tp=4, ep=True), Layout("Qwen3-235B-A22B", tp=8, ep=True),
    Layout("DeepSeek-V3", tp=8), Layout("DeepSeek-V3", tp=8, ep=True),
    Layout("DeepSeek-V3", tp=8, ep=True, dp_attention=True),
]


@contextlib.contextmanager
def as_rank(tp_rank: int, tp: int, pp_rank: int, pp: int, ep: bool, dp_attention: bool = False):
    """This process's parallel state set to one rank's (no process group: the
    model is only built, on the meta device, never run)."""
    saved = ps._TP, ps._PP, ps._EXPERT_PARALLEL, ps._DP_ATTENTION
    ps._TP = Communicator(tp_rank, tp, group=object() if tp > 1 else None)
    ps._PP = ps.PipelineGroup(pp_rank, pp, pp_rank * tp + tp_rank, tp)
    ps._EXPERT_PARALLEL = ep
    ps._DP_ATTENTION = dp_attention
    try:
        yield
    finally:
        ps._TP, ps._PP, ps._EXPERT_PARALLEL, ps._DP_ATTENTION = saved


def rank_bytes(hf_config, layout: Layout, tp_rank: int, pp_rank: int, dtype: torch.dtype,
               quant_config=None) -> int:
    cls = ModelRegistry.load_class(hf_config.architectures[0])
    with as_rank(tp_rank, layout.tp, pp_rank, layout.pp, layout.ep, layout.dp_attention), torch.device("meta"):
        saved = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = cls(hf_config, get_attention_backend("torch"), quant_config=quant_config)
        finally:
            torch.set_default_dtype(saved)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(hf_config, layout: Layout, dtype: torch.dtype) -> int:
    """KV-cache bytes per token on one rank (the stage holding the most layers)."""
    cls = ModelRegistry.load_class(hf_config.architectures[0])
    spec = cls.kv_cache_spec(hf_config, 1, dtype)
    per_layer = spec.bytes_per_block // spec.num_layers
    layers = -(-spec.num_layers // layout.pp)
    kv_heads = getattr(hf_config, "num_key_value_heads", None)
    if spec.leading_shape and kv_heads:  # per-head K/V: split over the tensor-parallel ranks
        per_layer = per_layer * max(1, kv_heads // layout.tp) // kv_heads
    if not spec.leading_shape and layout.dp_attention:  # MLA: each rank holds its own requests' latents
        return per_layer * layers // layout.tp
    return per_layer * layers  # an MLA latent cache is replicated on every rank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = torch.bfloat16
    rows = []
    fp8 = Fp8Config(is_checkpoint_fp8_serialized=True, weight_block_size=(128, 128))
    print(f"{'model':<18} {'layout':<20} {'full GB':>8} {'max rank GB':>12} {'FP8 max rank GB':>16} "
          f"{'KV KB/token':>12}")
    for layout in LAYOUTS:
        hf_config = read_hf_config(resolve_model_source(layout.model))
        full = rank_bytes(hf_config, Layout(layout.model), 0, 0, dtype)
        ranks = [(t, p) for p in range(layout.pp) for t in range(layout.tp)]
        per_rank = [rank_bytes(hf_config, layout, t, p, dtype) for t, p in ranks]
        per_rank_fp8 = [rank_bytes(hf_config, layout, t, p, dtype, fp8) for t, p in ranks]
        kv = kv_bytes_per_token(hf_config, layout, dtype)
        rows.append({"model": layout.model, "layout": layout.name, "world_size": layout.tp * layout.pp,
                     "full_gb": full / 1e9, "rank_gb": [b / 1e9 for b in per_rank],
                     "rank_gb_fp8_block": [b / 1e9 for b in per_rank_fp8], "kv_bytes_per_token_per_rank": kv})
        print(f"{layout.model:<18} {layout.name:<20} {full / 1e9:>8.1f} {max(per_rank) / 1e9:>12.2f} "
              f"{max(per_rank_fp8) / 1e9:>16.2f} {kv / 1024:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": "bfloat16", "layouts": rows}, f, indent=2)


if __name__ == "__main__":
    main()
