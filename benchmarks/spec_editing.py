"""N-gram speculative decoding on an editing workload with a real model: the
prompt holds a document of about 1,000 tokens and asks for it back with a
small change, so most of the greedy output copies spans of the prompt and
prompt lookup finds them. Batch 1, greedy, against the same engine without
speculation in the same process; also reports how much of the output is a copy
of the document (the workload's property the speed-up rests on: a model too
small to follow the instruction, such as SmolLM2-135M, repeats itself instead,
which prompt lookup also finds, so read the two together) and whether both
runs produced the same tokens.

    python benchmarks/spec_editing.py --model Qwen2.5-Coder-0.5B-Instruct [--quantization none] [--json PATH]

The document is the start of the Python documentation text shipped with the
tests (``tests/data/perplexity_text.txt``, PSF licence), cut to
``--doc-tokens`` tokens of the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from ember.engine.llm import LLM
from ember.entrypoints.bench.offline import print_and_save, spec_decode_fields
from ember.sampling_params import SamplingParams

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "perplexity_text.txt"
INSTRUCTION = ("Rewrite the following text exactly as it is, word for word, except that every occurrence of "
               "the word \"block\" becomes \"unit\". Output only the rewritten text.\n\n")


def editing_prompt(tokenizer, doc_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids with the chat template applied, the document's ids)."""
    doc_ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:doc_tokens]
    doc = tokenizer.decode(doc_ids)
    messages = [{"role": "user", "content": INSTRUCTION + doc}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    return list(prompt), doc_ids


def copied_fraction(output: list[int], doc: list[int], n: int = 4) -> float:
    """Share of output positions whose preceding ``n`` tokens plus the token
    itself occur in ``doc`` (how much of the output prompt lookup can find)."""
    grams = {tuple(doc[i:i + n + 1]) for i in range(len(doc) - n)}
    hits = sum(tuple(output[i - n:i + 1]) in grams for i in range(n, len(output)))
    return hits / max(1, len(output) - n)


def run(args: argparse.Namespace, spec: dict | None) -> dict:
    llm = LLM(args.model, load_format=args.load_format, max_model_len=4096, dtype=args.dtype,
              quantization=args.quantization, speculative_config=spec)
    prompt, doc = editing_prompt(llm.get_tokenizer(), args.doc_tokens)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len)
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)  # warm-up
    best, tokens = None, None
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        tokens = list(out[0].outputs[0].token_ids)
        best = seconds if best is None else min(best, seconds)
    result = {"prompt_tokens": len(prompt), "output_tokens": len(tokens), "seconds": best,
              "output_tok_s": len(tokens) / best, "tokens": tokens,
              "copied_fraction": copied_fraction(tokens, doc),
              "text_head": llm.get_tokenizer().decode(tokens[:120])}
    result.update(spec_decode_fields(llm.get_stats()))
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen2.5-Coder-0.5B-Instruct")
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", default=None, help="as --quantization (e.g. none: a GGUF file dequantized)")
    ap.add_argument("--doc-tokens", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=1100)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    plain = run(args, None)
    spec = run(args, {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2,
                      "prompt_lookup_max": args.lookup_max})
    result = {"model": args.model, "k": args.k, "prompt_lookup_max": args.lookup_max,
              "prompt_tokens": plain["prompt_tokens"], "output_tokens": plain["output_tokens"],
              "copied_fraction": plain["copied_fraction"], "greedy_tokens_equal": plain["tokens"] == spec["tokens"],
              "plain_tok_s": plain["output_tok_s"], "ngram_tok_s": spec["output_tok_s"],
              "speedup": spec["output_tok_s"] / plain["output_tok_s"], "output_head": plain["text_head"]}
    result.update({k: v for k, v in spec.items() if k.startswith("spec_")})
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
