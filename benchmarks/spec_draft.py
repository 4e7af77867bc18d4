"""Draft-model speculative decoding against plain decoding, in engines run one
after the other on the same device: output tok/s, acceptance, greedy tokens
compared, and the cost of a step split into its proposer part (the draft's
catch-up and k proposals) and the rest (the target's verification of the
k + 1 positions, rejection sampling, host work).

Configurations (random weights, ``--load-format dummy``):

* ``same``: the draft is the target's preset with the same seeded weights,
  so (numerics aside) every draft is accepted; batch 1. The speed-up a free
  proposer would give is reported too (``verify_bound_speedup``: tokens per
  step x plain step time / verify step time).
* ``small``: a small draft of the target's vocabulary (``--small-draft``,
  default the Llama-3.2-1B preset), at batch 1 and ``--batch-size``; with
  unrelated random weights its drafts are rarely accepted, so the run shows
  the proposer's cost and, at the large batch, that ``disable_by_batch_size``
  keeps plain speed.

    python benchmarks/spec_draft.py --model Llama-3.1-8B --load-format dummy [--json PATH]
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


class _Steps:
    """A step observer: per collected step, whether it computed prompt
    tokens, its wall time since the previous step's collection (the first
    step of a run: since ``start``), and the proposer's time in it."""

    def __init__(self, proposer) -> None:
        self.proposer = proposer
        self.rows: list[tuple[bool, float, float]] = []
        self.start()

    def start(self) -> None:
        self.rows.clear()
        self.last = time.perf_counter()
        self.propose_s = self.proposer.propose_s if self.proposer is not None else 0.0

    def __call__(self, record) -> None:
        spec = record.sched.scheduled_spec_decode_tokens
        prompt = any(n > 1 + len(spec.get(r, ())) for r, n in record.sched.num_scheduled_tokens.items())
        propose_s = self.proposer.propose_s if self.proposer is not None else 0.0
        self.rows.append((prompt, record.collect_time - self.last, propose_s - self.propose_s))
        self.last, self.propose_s = record.collect_time, propose_s

    @property
    def n(self) -> int:
        return len(self.rows)

    def decode(self) -> tuple[int, float, float]:
        """(decode steps, their wall seconds, their proposer seconds): the
        steps without prompt tokens, except the first after the prompts (it
        also waits for the last prompt step's proposals)."""
        rows = self.rows
        first = next((i for i in range(len(rows) - 1, -1, -1) if rows[i][0]), -1) + 2
        sel = rows[first:]
        return len(sel), sum(r[1] for r in sel), sum(r[2] for r in sel)


def _release(llm: LLM) -> None:
    llm.llm_engine.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the next engine sizes its KV cache from free memory


def measure(args: argparse.Namespace, prompts: list[list[int]], batches: list[int], spec: dict | None) -> dict:
    # The previous engine's objects sit in reference cycles until a collection.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    llm = LLM(args.model, load_format=args.load_format, max_model_len=args.max_model_len, skip_tokenizer_init=True,
              dtype=args.dtype, speculative_config=spec)
    return measure_engine(llm, args, prompts, batches)


def measure_engine(llm: LLM, args: argparse.Namespace, prompts: list[list[int]], batches: list[int]) -> dict:
    """Time ``args.repeats`` greedy runs of each batch size on ``llm`` (best
    kept), then release the engine. Per batch size B: output tok/s of the
    whole run, and per decode step (the steps after the prompts' prefill, see
    :meth:`_Steps.decode`): ``bB_step_ms`` (wall time), the proposer's host
    time in it ``bB_propose_ms_per_step`` and the rest ``bB_verify_ms_per_step``
    (on CUDA the proposals run on the device while the host goes on: nothing
    waits for them before the next step is launched, so their device time
    shows in the step time, not in the proposer's);
    ``bB_tokens_per_step`` counts the whole run's steps."""
    core = llm.llm_engine.engine_core
    runner = core.executor.worker.model_runner
    steps = _Steps(runner.draft_proposer)
    core.add_step_observer(steps)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    result: dict = {}
    for batch in batches:
        best = None
        for _ in range(args.repeats):
            steps.start()
            start = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, steps.n, steps.decode(), [list(o.outputs[0].token_ids) for o in outs])
        seconds, num_steps, (decode_steps, decode_s, propose_s), tokens = best
        result[f"b{batch}_tokens"] = tokens
        result[f"b{batch}_output_tok_s"] = sum(len(t) for t in tokens) / seconds
        result[f"b{batch}_decode_steps"] = decode_steps
        result[f"b{batch}_step_ms"] = 1e3 * decode_s / decode_steps
        result[f"b{batch}_propose_ms_per_step"] = 1e3 * propose_s / decode_steps
        result[f"b{batch}_verify_ms_per_step"] = 1e3 * (decode_s - propose_s) / decode_steps
        result[f"b{batch}_tokens_per_step"] = sum(len(t) for t in tokens) / num_steps / batch
    result.update(spec_decode_fields(llm.get_stats()))
    _release(llm)
    del llm
    return result


def compare(name: str, plain: dict, spec: dict, batches: list[int], out: dict) -> None:
    for batch in batches:
        a, b = plain[f"b{batch}_tokens"], spec[f"b{batch}_tokens"]
        first_diff = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(a, b)]
        pre = f"{name}_b{batch}"
        out[f"{pre}_sequences_equal"] = sum(p == q for p, q in zip(a, b)) / len(a)
        out[f"{pre}_mean_first_difference"] = sum(first_diff) / len(first_diff)
        out[f"{pre}_output_tok_s"] = spec[f"b{batch}_output_tok_s"]
        out[f"{pre}_speedup"] = spec[f"b{batch}_output_tok_s"] / plain[f"b{batch}_output_tok_s"]
        out[f"{pre}_tokens_per_step"] = spec[f"b{batch}_tokens_per_step"]
        out[f"{pre}_step_ms"] = spec[f"b{batch}_step_ms"]
        out[f"{pre}_propose_ms_per_step"] = spec[f"b{batch}_propose_ms_per_step"]
        out[f"{pre}_verify_ms_per_step"] = spec[f"b{batch}_verify_ms_per_step"]
        plain_step = plain[f"b{batch}_step_ms"]
        out[f"{pre}_verify_vs_plain_step"] = spec[f"b{batch}_verify_ms_per_step"] / plain_step
        out[f"{pre}_propose_vs_plain_step"] = spec[f"b{batch}_propose_ms_per_step"] / plain_step
        out[f"{pre}_verify_bound_speedup"] = (spec[f"b{batch}_tokens_per_step"] * plain_step
                                              / spec[f"b{batch}_verify_ms_per_step"])
    for k in ("spec_acceptance_rate", "spec_mean_accepted_length"):
        if k in spec:
            out[f"{name}_{k}"] = spec[k]
    for k, v in spec.items():
        if k.startswith("spec_acceptance_rate_pos"):
            out[f"{name}_{k}"] = v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="Llama-3.1-8B")
    ap.add_argument("--small-draft", default="Llama-3.2-1B", help="the small draft (same vocabulary)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip", default="", help="comma-separated configurations to skip: same, small")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30_000) for _ in range(args.prompt_len)] for _ in range(args.batch_size)]
    batches = sorted({1, args.batch_size})
    plain = measure(args, prompts, batches, None)
    out: dict = {"model": args.model, "k": args.k, "output_len": args.output_len}
    for batch in batches:
        out[f"plain_b{batch}_output_tok_s"] = plain[f"b{batch}_output_tok_s"]
        out[f"plain_b{batch}_step_ms"] = plain[f"b{batch}_step_ms"]
    if "same" not in skip:
        same = measure(args, prompts, [1], {"method": "draft_model", "model": args.model,
                                           "num_speculative_tokens": args.k})
        compare("same", plain, same, [1], out)
    if "small" not in skip:
        small = measure(args, prompts, batches, {"method": "draft_model", "model": args.small_draft,
                                                 "num_speculative_tokens": args.k})
        compare("small", plain, small, batches, out)
    print_and_save(out, args.json)


if __name__ == "__main__":
    main()
