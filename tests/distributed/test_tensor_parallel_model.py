"""A whole tiny Llama split over two gloo ranks (CPU, float32): each rank
builds a :class:`~ember.worker.model_runner.ModelRunner` after joining the
tensor-parallel group, loads the checkpoint's full tensors through the
layers' weight loaders (its shard of every projection, of the vocabulary
and of the KV heads), and its prompt logits must equal HF transformers' on
the unsplit model. Covers grouped-query attention with one KV head per rank
and with a single KV head replicated on both ranks.

The runner is driven directly (the engine's multi-rank executor is not part
of this test): its config says one rank, the process group says two, and the
layers follow the process group.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tests.distributed.ranks import run_checks_on_rank, run_ranks
from tests.models.tiny import TOKENIZER_VOCAB, hf_prefill_logits, make_prompts, randomize_norms_, save_tiny

pytestmark = pytest.mark.slow
WORLD = 2
_TIMEOUT_S = 120
KV_HEADS = (2, 1)


def _check_model(work: str, name: str) -> None:
    """The checkpoint ``work/name`` on this rank: its shard of qkv, and the
    prompt logits against HF's on the unsplit model."""
    from ember.engine.arg_utils import EngineArgs
    from ember.worker.model_runner import ModelRunner

    prompts = json.loads(Path(work, "prompts.json").read_text())
    config = EngineArgs(model=str(Path(work, name)), device="cpu", dtype="float32", block_size=4,
                        kv_cache_memory=1 << 20, enforce_eager=True).create_engine_config()
    runner = ModelRunner(config)
    runner.load_model()
    # Really split: this rank's qkv rows are 2 of the 4 query heads and
    # one KV head (its own, or the replicated single one) of k and v.
    qkv = runner.model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == ((2 + 2 * 1) * 16, 64), qkv.shape
    runner.initialize_kv_cache(64)
    refs = torch.load(Path(work, f"{name}.pt"))
    for prompt, ref in zip(prompts, refs):
        torch.testing.assert_close(runner.compute_prompt_logits(prompt), ref, atol=1e-4, rtol=1e-4)


def _rank_main(rank: int, init_file: str, work: str) -> None:
    checks = {f"kv{kv}": partial(_check_model, work, f"kv{kv}") for kv in KV_HEADS}
    run_checks_on_rank(rank, WORLD, init_file, work, checks, timeout_s=_TIMEOUT_S)


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict[str, str]]:
    work = tmp_path_factory.mktemp("tp_model")
    prompts = make_prompts(lengths=(5, 13))
    (work / "prompts.json").write_text(json.dumps(prompts))
    for kv in KV_HEADS:
        torch.manual_seed(kv)
        config = LlamaConfig(vocab_size=TOKENIZER_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=128,
                             initializer_range=0.2, tie_word_embeddings=False)
        hf = LlamaForCausalLM(config).eval()
        randomize_norms_(hf)
        save_tiny(hf, work / f"kv{kv}")
        torch.save([hf_prefill_logits(hf, p) for p in prompts], work / f"kv{kv}.pt")
    return run_ranks(_rank_main, WORLD, work, timeout_s=_TIMEOUT_S)


@pytest.mark.parametrize("kv_heads", KV_HEADS)
def test_tiny_llama_on_two_ranks_matches_hf(rank_results: list[dict[str, str]], kv_heads: int) -> None:
    for rank, res in enumerate(rank_results):
        assert res.get(f"kv{kv_heads}") == "ok", f"rank {rank}:\n{res.get(f'kv{kv_heads}')}"
