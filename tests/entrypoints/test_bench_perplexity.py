"""``ember bench perplexity``: the sliding windows, and the engine's perplexity
against Hugging Face's fixed-length recipe run on HF transformers (a tiny
random Llama, float32)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from transformers import LlamaForCausalLM

from ember.entrypoints.bench.perplexity import Window, perplexity, sliding_windows
from tests.models.tiny import TOKENIZER_VOCAB, ember_llm, one_thread, random_llama, save_tiny


def test_windows_score_every_token_after_the_first_once() -> None:
    assert sliding_windows(10, 4, 2) == [Window(0, 4, 1), Window(2, 6, 4), Window(4, 8, 6), Window(6, 10, 8)]
    # Disjoint windows: a window's first token has nothing before it.
    assert sliding_windows(10, 4, 4) == [Window(0, 4, 1), Window(4, 8, 5), Window(8, 10, 9)]
    assert sliding_windows(3, 8, 4) == [Window(0, 3, 1)]
    for n, c, s in [(2960, 1024, 512), (1000, 64, 7), (65, 64, 63), (64, 64, 1)]:
        windows = sliding_windows(n, c, s)
        scored = [t for w in windows for t in range(w.first_scored, w.end)]
        assert scored == list(range(1, n)), (n, c, s)
        assert all(w.end - w.begin <= c for w in windows)
        # Past the first window, every scored token sees at least c - s tokens before it.
        assert all(w.first_scored - w.begin >= c - s for w in windows[1:])


@pytest.mark.parametrize(("n", "c", "s", "match"), [
    (1, 4, 2, "at least 2 tokens"), (10, 1, 1, "context_length"), (10, 4, 0, "stride"), (10, 4, 5, "stride")])
def test_windows_refuse_bad_arguments(n, c, s, match) -> None:
    with pytest.raises(ValueError, match=match):
        sliding_windows(n, c, s)


def _hf_recipe_ppl(model: LlamaForCausalLM, ids: list[int], max_length: int, stride: int) -> float:
    """The fixed-length perplexity recipe of the transformers docs
    (https://huggingface.co/docs/transformers/perplexity), summing the
    token losses exactly (the docs average per-window means)."""
    seq = torch.tensor([ids])
    total, count, prev_end = 0.0, 0, 0
    with torch.inference_mode():
        for begin in range(0, len(ids), stride):
            end = min(begin + max_length, len(ids))
            trg_len = end - prev_end
            input_ids = seq[:, begin:end]
            target_ids = input_ids.clone()
            target_ids[:, :-trg_len] = -100
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            labels = target_ids[0, 1:]
            total += float(torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
            count += int((labels != -100).sum())
            prev_end = end
            if end == len(ids):
                break
    return math.exp(total / count)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = random_llama(max_position_embeddings=256)
    return hf, save_tiny(hf, tmp_path_factory.mktemp("ppl") / "llama")


@one_thread()
def test_engine_perplexity_matches_hf_recipe(tiny) -> None:
    hf, path = tiny
    rng = random.Random(0)
    ids = [rng.randrange(TOKENIZER_VOCAB - 1) for _ in range(150)]
    llm = ember_llm(path, max_model_len=65)
    for c, s in [(64, 32), (64, 64), (64, 17)]:
        ours = perplexity(llm, ids, c, s)
        windows = sliding_windows(len(ids), c, s)
        assert ours.tokens_evaluated == len(ids) - (len(windows) if s == c else 1)
        assert ours.tokens_processed == sum(w.end - w.begin for w in windows)
        ref = _hf_recipe_ppl(hf, ids, c, s)
        assert ours.ppl == pytest.approx(ref, rel=1e-4), (c, s)
        assert ours.nll == pytest.approx(math.log(ref), rel=1e-4)


@one_thread()
def test_cli_writes_json(tiny, tmp_path) -> None:
    from ember.entrypoints.cli import main

    _, path = tiny
    rng = random.Random(1)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{rng.randrange(TOKENIZER_VOCAB - 1)}" for _ in range(120)))
    out = tmp_path / "ppl.json"
    assert main(["bench", "perplexity", "--model", path, "--text-file", str(text), "--context-length", "48",
                 "--max-tokens-evaluated", "100", "--dtype", "float32", "--kv-cache-memory", "4M",
                 "--block-size", "4", "--output-json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["benchmark"] == "perplexity" and r["stride"] == 24 and r["context_length"] == 48
    assert r["tokens_evaluated"] == 100 and r["dtype"] == "float32" and r["kv_cache_dtype"] == "auto"
    assert r["ppl"] == pytest.approx(math.exp(r["nll"])) and 1 < r["ppl"] < 10 * TOKENIZER_VOCAB
    assert r["tok_s"] > 0 and r["tokens_processed"] >= r["tokens_evaluated"]
