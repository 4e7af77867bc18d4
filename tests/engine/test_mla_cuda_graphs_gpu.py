"""DeepSeek-V3 (MLA + MoE) cut to 4 layers at full width (3 dense, 1 MoE of
32 experts), random weights, on the Triton MLA backend: the engine captures
CUDA graphs for its decode steps (and, with MTP speculation, its
verification steps and the MTP layer's decode steps) and gives the greedy
tokens of ``enforce_eager``. float32, so that the graphs' padded batches and
the eager steps agree beyond near-ties."""

from __future__ import annotations

import gc

import pytest
import torch

from ember import LLM, SamplingParams
from tests.models.tiny import runner_of

pytestmark = pytest.mark.gpu

# 32 routed experts instead of 256: the float32 weights (and the MTP layer's
# MoE) fit one GPU with room for three engines in turn.
OVERRIDES = {"num_hidden_layers": 4, "n_routed_experts": 32}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[11, 400, 7, 9000, 12], [5] * 37, list(range(100, 180)), [3, 1, 4, 1, 5, 9, 2, 6]]


def _run(**kw) -> tuple[list[list[int]], dict]:
    llm = LLM("DeepSeek-V3", load_format="dummy", hf_overrides=OVERRIDES, dtype="float32",
              max_model_len=256, kv_cache_memory=256 << 20, max_num_seqs=8, skip_tokenizer_init=True, **kw)
    runner = runner_of(llm)
    draft = runner.draft_proposer
    info = {"graphs": runner.cuda_graphs is not None, "verify_graphs": runner.verify_graphs is not None,
            "draft_graphs": draft is not None and draft.cuda_graphs is not None}
    outs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    outs += [llm.generate([PROMPTS[1]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids]  # batch 1
    llm.llm_engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return outs, info


def test_deepseek_v3_cuda_graphs_equal_eager():
    ref, info = _run(enforce_eager=True)
    assert not info["graphs"]
    got, info = _run()
    assert info["graphs"], "MLA model did not capture CUDA graphs"
    assert got == ref
    spec, info = _run(speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    assert info["graphs"] and info["verify_graphs"] and info["draft_graphs"]  # the MTP layer's decode graphs too
    assert spec == ref
