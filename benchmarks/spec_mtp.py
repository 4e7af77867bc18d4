"""DeepSeek MTP speculative decoding (``speculative_config`` method ``mtp``)
against plain decoding, in engines run one after the other on the same
device: the cost of a step with MTP (verification of the k + 1 positions plus
the MTP layer's proposals) over a plain decode step, split into its parts.

The DeepSeek-V3 preset at reduced depth and full width (``--layers``, default
4: 3 dense layers + 1 MoE layer, plus the preset's one MTP layer: MLA + MoE
of 256 experts + shared head), random weights (``--load-format dummy``): the
MTP layer's proposals are almost never accepted, so a step emits about one
token per request and its time is the speculation overhead that trained MTP
weights (DeepSeek reports 85-90% acceptance of the second token) would buy
back. Greedy tokens with and without MTP are compared.

Printed per batch size B (``mtp_bB_*``): ``step_overhead`` (MTP step time /
plain decode step time), ``verify_vs_plain_step`` (the step without the
proposer's part) and ``propose_vs_plain_step`` (the MTP layer's catch-up and
k proposals, host wall time), ``tokens_per_step`` and ``sequences_equal``.
With ``--project-depth 61`` the engines also run at one layer less, and the
overhead is extrapolated to the full depth (``projected_61_layers_step_overhead``,
see :func:`project`): at 4 layers the MTP layer is a fifth of the model, at
61 layers a sixtieth.

    python benchmarks/spec_mtp.py --layers 4 --k 1 [--batch-size 32] [--json PATH]

A smoke run on CPU at a tiny width (timings meaningless)::

    python benchmarks/spec_mtp.py --device cpu --batch-size 2 --output-len 8 --repeats 1 --hf-overrides \
        '{"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": 32, "n_routed_experts": 8,
          "n_group": 1, "topk_group": 1, "num_experts_per_tok": 2, "num_attention_heads": 4, "q_lora_rank": 64,
          "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16, "vocab_size": 1000}'
"""

from __future__ import annotations

import argparse
import gc
import json
import random

import torch

from ember.engine.llm import LLM
from ember.entrypoints.bench.offline import print_and_save
from spec_draft import compare, measure_engine


def measure(args: argparse.Namespace, prompts: list[list[int]], batches: list[int], spec: dict | None,
            layers: int | None = None) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM("DeepSeek-V3", load_format="dummy", max_model_len=args.max_model_len, skip_tokenizer_init=True,
              hf_overrides={"num_hidden_layers": layers or args.layers} | json.loads(args.hf_overrides),
              speculative_config=spec, memory_utilization=args.memory_utilization,
              max_num_seqs=max(batches),  # CUDA graphs up to the batch measured only
              **({"device": args.device} if args.device else {}))
    return measure_engine(llm, args, prompts, batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the DeepSeek-V3 preset (full width)")
    ap.add_argument("--k", type=int, default=1, help="num_speculative_tokens")
    ap.add_argument("--batch-size", type=int, default=32, help="the larger batch measured (besides 1)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--memory-utilization", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hf-overrides", default="{}", help="more preset fields to override (JSON; a smoke run "
                    "on CPU shrinks the width)")
    ap.add_argument("--project-depth", type=int, default=0,
                    help="also run at --layers - 1 and extrapolate the step overhead to this many layers (61: "
                         "DeepSeek-V3); the layer dropped must be an MoE one (--layers >= 4: the preset's first 3 "
                         "layers are dense)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rng = random.Random(0)
    vocab = json.loads(args.hf_overrides).get("vocab_size", 129280)
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.batch_size)]
    batches = sorted({1, args.batch_size})
    # NOTE: speculation stays on at the larger batch (disable_by_batch_size above it).
    spec = {"method": "mtp", "num_speculative_tokens": args.k, "disable_by_batch_size": max(batches)}
    mtp = measure(args, prompts, batches, spec)
    plain = measure(args, prompts, batches, None)
    out: dict = {"model": f"DeepSeek-V3 x {args.layers} layers + MTP", "k": args.k, "output_len": args.output_len}
    for batch in batches:
        out[f"plain_b{batch}_output_tok_s"] = plain[f"b{batch}_output_tok_s"]
        out[f"plain_b{batch}_step_ms"] = plain[f"b{batch}_step_ms"]
    compare("mtp", plain, mtp, batches, out)
    for batch in batches:
        out[f"mtp_b{batch}_step_overhead"] = mtp[f"b{batch}_step_ms"] / plain[f"b{batch}_step_ms"]
    if args.project_depth:
        project(args, prompts, batches, spec, plain, mtp, out)
    print_and_save(out, args.json)


def project(args: argparse.Namespace, prompts: list[list[int]], batches: list[int], spec: dict, plain: dict,
            mtp: dict, out: dict) -> None:
    """The step overhead at ``--project-depth`` layers, extrapolated from one
    layer less: the last layer's share of the plain step and of the MTP
    step's extra time (the verify step's extra rows, i.e. the experts the
    k + 1 positions route to), times the layers added; the MTP layer's own
    cost does not grow with depth."""
    fewer = args.layers - 1
    mtp_less = measure(args, prompts, batches, spec, fewer)
    plain_less = measure(args, prompts, batches, None, fewer)
    added = args.project_depth - args.layers
    for batch in batches:
        key = f"b{batch}_step_ms"
        per_layer = plain[key] - plain_less[key]
        extra, extra_less = mtp[key] - plain[key], mtp_less[key] - plain_less[key]
        plain_full = plain[key] + added * per_layer
        extra_full = extra + added * (extra - extra_less)
        out[f"mtp_b{batch}_layer_{args.layers - 1}_plain_ms"] = per_layer
        out[f"mtp_b{batch}_layer_{args.layers - 1}_extra_ms"] = extra - extra_less
        out[f"mtp_b{batch}_projected_{args.project_depth}_layers_step_overhead"] = (plain_full + extra_full) / plain_full


if __name__ == "__main__":
    main()
