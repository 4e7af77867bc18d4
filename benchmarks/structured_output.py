"""JSON-schema-constrained decoding against unconstrained decoding, same engine,
same process: output throughput at a batch of 64 and time per output token at
batch 1, plus grammar compile time (first use and a cached repeat).

Every request decodes ``--output-len`` tokens: the unconstrained ones with
``ignore_eos``; the constrained ones under a schema of one string field whose
``minLength`` (64 characters per output token) keeps the string open, so they
too run to ``--output-len`` whatever the random weights prefer (the script
reports the mean output length of both, and tokens per second counts the
tokens really produced). Speed depends on shapes, not on weight values, so the
model is a preset with random weights; the tokenizer (needed by the grammar)
comes from ``--tokenizer`` and must cover the preset's vocabulary.

    python benchmarks/structured_output.py --model Qwen2.5-7B --load-format dummy \\
        --tokenizer .carry/qwen-tokenizer [--json results/structured_output.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time

from ember.engine.llm import LLM
from ember.engine.step_stats import StepTimes
from ember.entrypoints.bench.offline import print_and_save
from ember.sampling_params import SamplingParams, StructuredOutputsParams



def long_string_schema(output_len: int) -> dict:
    """One string field that cannot close within ``output_len`` tokens."""
    return {"type": "object", "properties": {"text": {"type": "string", "minLength": 64 * output_len}},
            "required": ["text"], "additionalProperties": False}

OTHER_SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def grammar_accepts(llm: LLM, token_lists: list[list[int]], schema: dict) -> float:
    """The fraction of outputs that xgrammar's own matcher accepts token by token
    under ``schema`` (an independent check of the masks the engine applied)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(llm.get_tokenizer(),
                                              vocab_size=llm.llm_engine.model_config.vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema))
    ok = 0
    for tokens in token_lists:
        matcher = xgr.GrammarMatcher(compiled)
        ok += all(matcher.accept_token(t) for t in tokens)
    return ok / max(1, len(token_lists))


def run(llm: LLM, prompts: list[list[int]], params: SamplingParams, times: StepTimes,
        check: dict | None = None) -> dict[str, float]:
    before = (times.num_steps, times.mask_s)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = times.num_steps - before[0]
    return {"elapsed_s": elapsed, "output_tokens": num_out, "output_tok_s": num_out / elapsed,
            "mean_output_len": num_out / len(prompts), "steps": steps,
            "ms_per_step": elapsed / max(1, steps) * 1e3,
            "mask_us_per_step": (times.mask_s - before[1]) / max(1, steps) * 1e6,
            **({"outputs_grammar_valid": grammar_accepts(llm, [list(o.outputs[0].token_ids) for o in outs], check)}
               if check is not None else {})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Qwen2.5-7B")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--tokenizer", default=".carry/qwen-tokenizer")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each variant (the best is kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    llm = LLM(args.model, load_format=args.load_format, tokenizer=args.tokenizer, max_model_len=4096)
    times = StepTimes()
    llm.llm_engine.engine_core.add_step_observer(times)
    vocab = llm.llm_engine.model_config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(100, min(vocab, 100_000)) for _ in range(args.input_len)]
               for _ in range(args.batch_size)]
    schema = long_string_schema(args.output_len)
    free = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True,
                                 structured_outputs=StructuredOutputsParams(json=schema))

    result: dict[str, object] = {"model": args.model, "batch_size": args.batch_size, "input_len": args.input_len,
                                 "output_len": args.output_len}
    # Compile time: a new schema (first use), then the same schema again (cache).
    for tag in ("compile_first", "compile_cached"):
        start = time.perf_counter()
        llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=1,
                                                  structured_outputs=StructuredOutputsParams(json=OTHER_SCHEMA)),
                     use_tqdm=False)
        result[f"{tag}_request_s"] = time.perf_counter() - start
    run(llm, prompts[:2], free, times)  # warm-up of both paths
    run(llm, prompts[:2], constrained, times)
    for batch in sorted({1, args.batch_size}):
        for tag, params in (("free", free), ("json", constrained)):
            best = min((run(llm, prompts[:batch], params, times, check=schema if tag == "json" else None) for _ in range(args.repeats)),
                       key=lambda r: r["elapsed_s"] / r["output_tokens"])
            for k, v in best.items():
                result[f"b{batch}_{tag}_{k}"] = v
        result[f"b{batch}_json_vs_free_tok_s"] = (result[f"b{batch}_json_output_tok_s"]
                                                  / result[f"b{batch}_free_output_tok_s"])
    print_and_save(result, args.json)


if __name__ == "__main__":
    main()
