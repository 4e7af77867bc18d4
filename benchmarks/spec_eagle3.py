"""EAGLE-3 speculative decoding against plain decoding, in engines run one
after the other on the same device: the cost of a step with an EAGLE-3 head
split into its proposer part (the head's catch-up and k proposals) and the
rest (the target's verification of the k + 1 positions with its three-depth
capture, rejection sampling, host work), against a plain decode step.

Random weights (``--load-format dummy``): the target preset (default
Llama-3.1-8B) and the head preset of its shape (default
Llama-3.1-8B-EAGLE3: one decoder layer, ``fc`` over three target depths, a
32,000-token draft vocabulary). A random head's drafts are almost never
accepted, so every step emits about one token and the step times are the
overhead a trained head must beat; the target is
``(verify + propose) / plain <= 1.2`` at k = 3, batch 1.

    python benchmarks/spec_eagle3.py --model Llama-3.1-8B --head Llama-3.1-8B-EAGLE3 --k 3 [--json PATH]

Prints (and saves with ``--json``) per batch size ``plain_b{B}_step_ms``,
``eagle3_b{B}_propose_ms_per_step``, ``eagle3_b{B}_verify_ms_per_step``,
``eagle3_b{B}_overhead_vs_plain_step`` (= (verify + propose) / plain), the
acceptance and whether greedy outputs equal plain decoding's. "propose" is
the proposer's host wall time; where the head is launched before the
verification's read-back (uniform greedy steps) that time overlaps the
verification on the device, so only the overhead (the whole step) compares
with the plain step.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_draft import compare, measure  # noqa: E402  (the draft-model benchmark's step split)

from ember.entrypoints.bench.offline import print_and_save  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--head", default="Llama-3.1-8B-EAGLE3", help="the EAGLE-3 head (path or preset)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--k", type=int, default=3, help="num_speculative_tokens")
    ap.add_argument("--disable-by-batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-token-id", type=int, default=30_000, help="prompt token ids are drawn below this")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    batches = sorted({int(b) for b in args.batch_sizes.split(",")})
    rng = random.Random(0)
    lo = min(100, args.max_token_id // 2)
    prompts = [[rng.randrange(lo, args.max_token_id) for _ in range(args.prompt_len)] for _ in range(max(batches))]
    plain = measure(args, prompts, batches, None)
    spec = measure(args, prompts, batches, {"method": "eagle3", "model": args.head, "num_speculative_tokens": args.k,
                                            "disable_by_batch_size": args.disable_by_batch_size})
    out: dict = {"model": args.model, "head": args.head, "k": args.k, "output_len": args.output_len}
    for batch in batches:
        out[f"plain_b{batch}_output_tok_s"] = plain[f"b{batch}_output_tok_s"]
        out[f"plain_b{batch}_step_ms"] = plain[f"b{batch}_step_ms"]
    compare("eagle3", plain, spec, batches, out)
    for batch in batches:
        pre = f"eagle3_b{batch}"
        out[f"{pre}_overhead_vs_plain_step"] = spec[f"b{batch}_step_ms"] / plain[f"b{batch}_step_ms"]
    print_and_save(out, args.json)


if __name__ == "__main__":
    main()
