"""N-gram speculative decoding against plain decoding, in two engines on the same
device: greedy tokens compared token for token, output tok/s at batch 1 and at
a larger batch, and the acceptance the drafts got.

The prompts are random token ids with a repeated span, and the model a preset
with random weights (speed depends on shapes, not values); how many drafts a
random model accepts depends on how often it repeats itself, so the acceptance
rate is reported next to the speed-up and the two are read together.

    python benchmarks/spec_decode.py --model Llama-3.1-8B --load-format dummy [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import torch

from ember.engine.llm import LLM
from ember.entrypoints.bench.offline import print_and_save, spec_decode_fields
from ember.sampling_params import SamplingParams


def timed(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - start


def measure(args: argparse.Namespace, prompts: list[list[int]], spec: dict | None) -> dict:
    llm = LLM(args.model, load_format=args.load_format, max_model_len=4096, skip_tokenizer_init=True,
              dtype=args.dtype, speculative_config=spec)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    timed(llm, prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    result: dict = {}
    for batch in sorted({1, args.batch_size}):
        best = None
        for _ in range(args.repeats):
            tokens, seconds = timed(llm, prompts[:batch], params)
            best = seconds if best is None else min(best, seconds)
        result[f"b{batch}_tokens"] = tokens
        result[f"b{batch}_output_tok_s"] = sum(len(t) for t in tokens) / best
    result.update(spec_decode_fields(llm.get_stats()))
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the second engine sizes its KV cache from free memory
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="model dtype (float32 makes near-ties in the random "
                                                     "model's argmax rarer than bf16 does)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    rng = random.Random(0)
    prompts = []
    for _ in range(args.batch_size):
        span = [rng.randrange(100, 30_000) for _ in range(64)]
        prompts.append([rng.randrange(100, 30_000) for _ in range(64)] + span * 4)
    plain = measure(args, prompts, None)
    spec = measure(args, prompts, {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
                                   "prompt_lookup_max": 4, "disable_by_batch_size": None})
    result: dict = {"model": args.model, "k": args.k, "output_len": args.output_len}
    for batch in sorted({1, args.batch_size}):
        a, b = plain[f"b{batch}_tokens"], spec[f"b{batch}_tokens"]
        first_diff = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
        result[f"b{batch}_greedy_tokens_equal"] = a == b
        result[f"b{batch}_sequences_equal"] = sum(p == q for p, q in zip(a, b)) / len(a)
        result[f"b{batch}_mean_first_difference"] = sum(first_diff) / len(first_diff)
        result[f"b{batch}_plain_tok_s"] = plain[f"b{batch}_output_tok_s"]
        result[f"b{batch}_ngram_tok_s"] = spec[f"b{batch}_output_tok_s"]
        result[f"b{batch}_speedup"] = spec[f"b{batch}_output_tok_s"] / plain[f"b{batch}_output_tok_s"]
    result.update({k: v for k, v in spec.items() if k.startswith("spec_")})
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
