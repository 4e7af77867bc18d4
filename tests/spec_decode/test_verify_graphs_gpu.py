"""Verification steps inside CUDA graphs (``VerifyCUDAGraphRunner``) on a GPU:
greedy speculative decoding (n-gram, and a draft model equal to the target)
gives the same tokens with the verification graphs as without them (the
steps then take the piecewise graphs with eager extend attention), and as
decoding without speculation; the graphs are used. float32 keeps the
models' near-ties apart."""

from __future__ import annotations

import pytest

from ember import LLM, SamplingParams

pytestmark = pytest.mark.gpu

PROMPTS = [
    "Repeat this line three times: the quick brown fox jumps over the lazy dog. the quick brown fox",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "A B C D E F G A B C D E F G A B C",
    "red green blue red green blue red green",
    "The capital of France is",
]
GREEDY = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
# A fixed KV size (engines of earlier tests may still hold device memory); few graphs to capture.
KW = dict(device="cuda", dtype="float32", max_model_len=512, kv_cache_memory=256 << 20, max_num_seqs=8,
          max_num_batched_tokens=256)


def _generate(llm: LLM, prompts, batched: bool) -> list[list[int]]:
    if batched:
        return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    return [list(llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) for p in prompts]


def _runner(llm: LLM):
    return llm.llm_engine.engine_core.executor.worker.model_runner


@pytest.fixture(scope="module")
def reference(smollm2_path):
    base = LLM(smollm2_path, **KW)
    prompts = [base.llm_engine.input_processor.tokenize(p) for p in PROMPTS]
    ref = {b: _generate(base, prompts, b) for b in (False, True)}
    base.llm_engine.shutdown()
    return prompts, ref


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_verify_graphs_equal_eager_verification(smollm2_path, reference, method):
    prompts, ref = reference
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
            if method == "ngram" else {"method": "draft_model", "model": smollm2_path, "num_speculative_tokens": 3})
    llm = LLM(smollm2_path, speculative_config=spec, **KW)
    runner = _runner(llm)
    graphs = runner.verify_graphs
    assert graphs is not None and set(graphs.sizes) == {2, 3, 4}
    with_graphs = {b: _generate(llm, prompts, b) for b in (False, True)}
    assert graphs.num_runs > 0, "no verification step replayed a graph"
    runner.verify_graphs = None  # today's path: piecewise graphs, extend attention eager
    without = {b: _generate(llm, prompts, b) for b in (False, True)}
    for b in (False, True):
        assert with_graphs[b] == without[b], f"batched={b}: tokens differ with the verification graphs"
        assert with_graphs[b] == ref[b], f"batched={b}: tokens differ from decoding without speculation"
    if method == "draft_model":
        stats = llm.get_stats()
        assert stats.spec_num_draft_tokens > 0 and stats.spec_acceptance_rate > 0.95
    llm.llm_engine.shutdown()
