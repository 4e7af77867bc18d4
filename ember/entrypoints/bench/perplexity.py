"""``ember bench perplexity``: perplexity of a model on a text file, computed by
the engine itself (prompt log-probabilities of ``LLM.generate``), so that a
quantization method, a model dtype or a KV cache dtype is measured exactly as
it serves.

The text is tokenized once and cut into fixed-length sliding windows, as in
Hugging Face transformers' "Perplexity of fixed-length models" recipe
(https://huggingface.co/docs/transformers/perplexity): window ``w`` covers
tokens ``[w * stride, w * stride + context_length)`` and scores only the tokens
the previous window did not reach, so with ``stride < context_length`` every
token after the first is scored exactly once, with at least
``context_length - stride`` tokens of context (fewer only in the first
window). ``stride == context_length`` gives disjoint windows, whose first
tokens are not scored (nothing before them in the window); llama.cpp's
``llama-perplexity`` also runs disjoint ``n_ctx`` chunks, scoring only their
second halves.

    ppl = exp(-(1 / T) * sum_t log p(x_t | x_<t))     over the T scored tokens

The log-probabilities are the engine's: the LM head's logits cast to float32,
then ``log_softmax`` (:func:`ember.sample.logprobs.compute_logprobs`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

from ember.engine.arg_utils import EngineArgs
from ember.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Window:
    """One window of the token stream: tokens ``[begin, end)`` go to the
    model, tokens ``[first_scored, end)`` are scored."""

    begin: int
    end: int
    first_scored: int


def sliding_windows(num_tokens: int, context_length: int, stride: int) -> list[Window]:
    """The windows of a stream of ``num_tokens`` tokens (see the module docstring).

    Raises:
        ValueError: fewer than 2 tokens, ``context_length < 2``, or ``stride``
            outside ``[1, context_length]``.
    """
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2, got {context_length}")
    if not 1 <= stride <= context_length:
        raise ValueError(f"stride must be in [1, context_length={context_length}], got {stride}")
    windows, prev_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context_length, num_tokens)
        # Token 0 has nothing before it: the first window scores from 1.
        windows.append(Window(begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == num_tokens:
            break
    return windows


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """Perplexity of one run.

    Attributes:
        ppl: ``exp(nll)``.
        nll: mean negative log-likelihood per scored token (nats).
        tokens_evaluated: scored tokens (T).
        tokens_processed: tokens the model ran (all windows, context included).
        num_windows: windows run.
        elapsed_s: wall time of the engine run (tokenization excluded).
    """

    ppl: float
    nll: float
    tokens_evaluated: int
    tokens_processed: int
    num_windows: int
    elapsed_s: float


def perplexity(llm: Any, token_ids: list[int], context_length: int, stride: int) -> PerplexityResult:
    """Perplexity of ``llm`` (an :class:`ember.LLM`) on ``token_ids``, every
    window submitted at once (the scheduler batches them).

    Args:
        token_ids: the tokenized text.
        context_length: tokens per window; the engine's ``max_model_len`` must
            be at least ``context_length + 1`` (each window generates one token).
        stride: tokens between window starts, in ``[1, context_length]``.

    Raises:
        ValueError: see :func:`sliding_windows`; a window too long for the engine.
        RuntimeError: the engine returned log-probabilities of other tokens
            than the prompt's.
    """
    windows = sliding_windows(len(token_ids), context_length, stride)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate([token_ids[w.begin: w.end] for w in windows], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    total, count = 0.0, 0
    for w, out in zip(windows, outs):
        entries = out.prompt_logprobs
        for t in range(w.first_scored, w.end):
            e = entries[t - w.begin]
            if e.token_id != token_ids[t]:
                raise RuntimeError(f"prompt log-probability {t - w.begin} of window {w} is of token "
                                   f"{e.token_id}, not the prompt's {token_ids[t]}")
            total -= e.logprob
            count += 1
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens_evaluated=count,
                            tokens_processed=sum(w.end - w.begin for w in windows),
                            num_windows=len(windows), elapsed_s=elapsed)


def run_perplexity(args: argparse.Namespace) -> dict[str, Any]:
    """``ember bench perplexity``: tokenize ``args.text_file`` with the model's
    tokenizer (its own special-token rule, e.g. a BOS at the start only), keep
    ``--max-tokens-evaluated + 1`` tokens if set, and measure.

    Raises:
        ValueError: the model has no tokenizer, or see :func:`perplexity`.
    """
    from ember.engine.llm import LLM

    stride = args.stride or max(1, args.context_length // 2)
    engine_args = EngineArgs.from_cli_args(args)
    if engine_args.max_model_len is None:
        engine_args.max_model_len = args.context_length + 1
    llm = LLM(**dataclasses.asdict(engine_args))
    tokenizer = llm.get_tokenizer()
    if tokenizer is None:
        raise ValueError("perplexity needs the model's tokenizer (drop --skip-tokenizer-init)")
    with open(args.text_file, encoding="utf-8") as f:
        token_ids = tokenizer.encode(f.read())
    if args.max_tokens_evaluated is not None:
        token_ids = token_ids[: args.max_tokens_evaluated + 1]
    r = perplexity(llm, token_ids, args.context_length, stride)
    config = llm.llm_engine.config
    return {
        "benchmark": "perplexity", "model": config.model_config.model, "text_file": args.text_file,
        "quantization": args.quantization, "dtype": str(config.model_config.dtype).removeprefix("torch."),
        "kv_cache_dtype": args.kv_cache_dtype, "context_length": args.context_length, "stride": stride,
        "num_windows": r.num_windows, "tokens_evaluated": r.tokens_evaluated,
        "tokens_processed": r.tokens_processed, "nll": r.nll, "ppl": r.ppl, "elapsed_s": r.elapsed_s,
        "tok_s": r.tokens_processed / r.elapsed_s,
    }


def add_perplexity_parser(kinds: argparse._SubParsersAction) -> None:
    """The ``ember bench perplexity`` subcommand (``kinds``: the ``bench`` sub-parsers)."""
    p = kinds.add_parser("perplexity", help="perplexity on a text file (sliding windows), through the engine")
    p.add_argument("--text-file", required=True, help="UTF-8 text, tokenized with the model's tokenizer")
    p.add_argument("--context-length", type=int, default=1024, help="tokens per window (default 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default context-length / 2); each token is scored "
                        "once, with at least context-length - stride tokens of context")
    p.add_argument("--max-tokens-evaluated", type=int, default=None,
                   help="keep only the text's first N + 1 tokens (N scored with stride < context-length; default: all)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_bench_perplexity)


def cmd_bench_perplexity(args: argparse.Namespace) -> int:
    from ember.entrypoints.bench.offline import print_and_save

    print_and_save(run_perplexity(args), args.output_json)
    return 0
