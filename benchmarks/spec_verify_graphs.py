"""Cost of a speculative verification step against a plain decode step, with
and without the verification CUDA graphs (``VerifyCUDAGraphRunner``), measured
on the model runner's forward pass and logits (no scheduler, no sampling).

One engine (random weights, ``--load-format dummy``) with n-gram speculation
captures decode graphs, piecewise graphs and verification graphs; then, for
batch sizes ``--batches`` and k = 1..``--k`` drafts per request over a
``--context``-token context, it times (median of ``--iters`` steps, each
waited for, as a verification step is):

* ``decode``: one token per request (the decode CUDA graphs),
* ``graphed``: k + 1 tokens per request through the verification graphs,
* ``piecewise``: the same step as the engine runs it without them (piecewise
  graphs, extend attention eager between them),
* ``eager``: the same step with no graph at all,

and checks the graphed step against the piecewise one (argmax of every row's
logits, relative difference of the hidden states). Then, in the same engine,
greedy n-gram speculation end to end (prompts of 64 random tokens and a
64-token span repeated four times, ``--output-len`` tokens) with and without
the verification graphs: output tok/s, ms per step, and whether the tokens
are the same.

    python benchmarks/spec_verify_graphs.py --model Llama-3.1-8B --load-format dummy [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from ember.engine.llm import LLM
from ember.entrypoints.bench.offline import print_and_save
from ember.sampling_params import SamplingParams
from ember.worker.common import HostInputs


def make_host(n: int, q: int, context: int, block_size: int, seed: int) -> HostInputs:
    """``n`` requests of ``context`` cached tokens and ``q`` new ones each, on
    disjoint blocks (request i on blocks ``i * width ..``)."""
    rng = np.random.default_rng(seed)
    width = -(-(context + q) // block_size)
    table = np.arange(n * width, dtype=np.int32).reshape(n, width)
    req_of = np.repeat(np.arange(n), q)
    pos = context + np.tile(np.arange(q), n).astype(np.int64)
    slots = table[req_of, pos // block_size].astype(np.int64) * block_size + pos % block_size
    qsl = (np.arange(n + 1) * q).astype(np.int32)
    seq_lens = np.full(n, context + q, dtype=np.int32)
    ids = rng.integers(100, 30_000, n * q).astype(np.int64)
    rows = list(range(q - 1, n * q, q))
    return HostInputs(ids, pos, slots, qsl, seq_lens, table, q, [f"r{i}" for i in range(n)], rows,
                      n if q == 1 else 0, [f"r{i}" for i in range(n)], [], [], [context + q] * n)


def step_ms(runner, host: HostInputs, iters: int) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Median wall time (ms) of forward + logits of every row, each step waited
    for; and the last step's hidden states and logits."""
    times = []
    with torch.inference_mode():
        for i in range(iters + 3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            hidden = runner._forward(host)
            logits = runner.model.compute_logits(hidden)
            torch.cuda.synchronize()
            if i >= 3:  # warm-up steps
                times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times), hidden.clone(), logits


class _Steps:
    """Counts the engine's collected steps (a step observer)."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, record) -> None:
        self.n += 1


def end_to_end(llm: LLM, runner, batches: list[int], output_len: int, out: dict, lines: list[str]) -> None:
    """Greedy n-gram speculation with and without the verification graphs."""
    import random

    rng = random.Random(0)
    prompts = []
    for _ in range(max(batches)):
        span = [rng.randrange(100, 30_000) for _ in range(64)]
        prompts.append([rng.randrange(100, 30_000) for _ in range(64)] + span * 4)
    steps = _Steps()
    llm.llm_engine.engine_core.add_step_observer(steps)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    verify = runner.verify_graphs
    for n in batches:
        res = {}
        for name, graphs in (("graphed", verify), ("without", None)):
            runner.verify_graphs = graphs
            llm.generate(prompts[:n], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                         use_tqdm=False)  # warm-up
            steps0, start = steps.n, time.perf_counter()
            outs = llm.generate(prompts[:n], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = [list(o.outputs[0].token_ids) for o in outs]
            res[name] = (tokens, sum(map(len, tokens)) / seconds, 1e3 * seconds / max(1, steps.n - steps0))
        runner.verify_graphs = verify
        (tg, tps_g, ms_g), (tw, tps_w, ms_w) = res["graphed"], res["without"]
        same = sum(a == b for a, b in zip(tg, tw)) / n
        out.update({f"e2e_b{n}_graphed_tok_s": tps_g, f"e2e_b{n}_without_tok_s": tps_w,
                    f"e2e_b{n}_speedup": tps_g / tps_w, f"e2e_b{n}_graphed_step_ms": ms_g,
                    f"e2e_b{n}_without_step_ms": ms_w, f"e2e_b{n}_sequences_equal": same})
        lines.append(f"n-gram end to end, batch {n:>2}: {tps_g:8.1f} tok/s with the verification graphs "
                     f"({ms_g:.3f} ms/step) vs {tps_w:8.1f} without ({ms_w:.3f} ms/step): {tps_g / tps_w:.3f}x; "
                     f"sequences equal {same:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--k", type=int, default=4, help="drafts per request: 1..k are measured")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=512, help="cached tokens per request")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-eager", action="store_true", help="skip the step without any graph")
    ap.add_argument("--output-len", type=int, default=128, help="tokens per request end to end (0: skip)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, max_model_len=args.context + 512,
              skip_tokenizer_init=True, max_num_seqs=max(batches), max_num_batched_tokens=512,
              enable_prefix_caching=False,  # each end-to-end run prefills its prompts
              speculative_config={"method": "ngram", "num_speculative_tokens": args.k,
                                  "disable_by_batch_size": max(batches)})
    runner = llm.llm_engine.engine_core.executor.worker.model_runner
    verify, piecewise = runner.verify_graphs, runner.piecewise_graphs
    assert verify is not None, "the verification graphs were not captured"
    bs = runner.block_size
    # Random K/V in the blocks the steps read, so attention is not over zeros.
    used = max(batches) * -(-(args.context + args.k + 1) // bs)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for cache in runner.kv_caches:
        cache[:, :used].copy_(torch.randn(cache[:, :used].shape, device="cuda", generator=gen).to(cache.dtype))

    out: dict = {"model": args.model, "device": torch.cuda.get_device_name(), "context": args.context}
    lines = []
    for n in batches:
        decode, _, _ = step_ms(runner, make_host(n, 1, args.context, bs, 0), args.iters)
        out[f"b{n}_decode_ms"] = decode
        lines.append(f"batch {n:>2}: plain decode step {decode:7.3f} ms")
        for k in range(1, args.k + 1):
            host = make_host(n, k + 1, args.context, bs, k)
            assert verify.can_run(host)
            graphed, h_graph, l_graph = step_ms(runner, host, args.iters)
            runner.verify_graphs = None
            pw, h_pw, l_pw = step_ms(runner, host, args.iters)
            eager = float("nan")
            if not args.no_eager:
                runner.piecewise_graphs = None
                eager, _, _ = step_ms(runner, host, args.iters)
                runner.piecewise_graphs = piecewise
            runner.verify_graphs = verify
            same_argmax = (l_graph.argmax(-1) == l_pw.argmax(-1)).float().mean().item()
            rel = ((h_graph.float() - h_pw.float()).norm() / h_pw.float().norm()).item()
            pre = f"b{n}_k{k}"
            out.update({f"{pre}_graphed_ms": graphed, f"{pre}_piecewise_ms": pw, f"{pre}_eager_ms": eager,
                        f"{pre}_graphed_vs_decode": graphed / decode, f"{pre}_piecewise_vs_decode": pw / decode,
                        f"{pre}_eager_vs_decode": eager / decode, f"{pre}_argmax_agree": same_argmax,
                        f"{pre}_hidden_rel_diff": rel})
            lines.append(f"batch {n:>2}, k={k} ({k + 1} tokens/request): verify graphed {graphed:7.3f} ms "
                         f"({graphed / decode:.3f}x decode) | piecewise {pw:7.3f} ms ({pw / decode:.3f}x) | "
                         f"eager {eager:7.3f} ms ({eager / decode:.3f}x) | argmax agree {same_argmax:.3f}, "
                         f"hidden rel diff {rel:.1e}")
    if args.output_len:
        end_to_end(llm, runner, batches, args.output_len, out, lines)
    llm.llm_engine.shutdown()
    print_and_save(out, args.json)
    print(f"== verification steps on {out['device']}, {args.model}, context {args.context}; step times: "
          f"median of {args.iters} steps (forward + logits of every row) ==")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
