"""Pooling requests (embeddings) on the bundled SmolLM2-135M-Instruct in float32:
the engine's pooled hidden states equal Hugging Face's ``AutoModel``
``last_hidden_state`` (after the final norm) pooled the same way, within 1e-4,
also when the prompt is computed in chunks and next to generating requests."""

from __future__ import annotations

import pytest
import torch

from ember.engine.llm import LLM
from ember.pooling_params import PoolingParams
from ember.sampling_params import SamplingParams
from tests.models.tiny import load_hf_gguf

PROMPTS = ["The capital of France is Paris.", "Embeddings map text to vectors of numbers, one vector per text, "
           "so that similar texts get similar vectors."]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # A small token budget: the longer prompt is computed in chunks.
    return LLM(smollm2_path, dtype="float32", max_model_len=256, block_size=16, kv_cache_memory=32 << 20,
               max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def hf_hidden(smollm2_path, llm):
    model = load_hf_gguf(smollm2_path, base_model=True)
    tok = llm.get_tokenizer()
    out = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = tok.encode(p)
            out.append(model(input_ids=torch.tensor([ids])).last_hidden_state[0].float())
    return out


def _reference(hidden: torch.Tensor, params: PoolingParams) -> torch.Tensor:
    v = hidden[-1] if params.pooling_type == "LAST" else hidden.mean(dim=0)
    return torch.nn.functional.normalize(v, dim=0) if params.normalize else v


@pytest.mark.parametrize("pooling_type", ["LAST", "MEAN"])
@pytest.mark.parametrize("normalize", [False, True])
def test_embeddings_equal_hf_hidden_states(llm, hf_hidden, pooling_type, normalize):
    params = PoolingParams(pooling_type, normalize)
    assert len(llm.get_tokenizer().encode(PROMPTS[1])) > 16  # computed in several chunks
    outs = llm.embed(PROMPTS, params, use_tqdm=False)
    for out, hidden in zip(outs, hf_hidden, strict=True):
        assert out.finished and out.outputs[0].finish_reason == "stop" and out.outputs[0].token_ids == []
        got = torch.tensor(out.pooled_output)
        ref = _reference(hidden, params)
        assert got.shape == (576,)
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        if normalize:
            assert abs(got.norm().item() - 1) < 1e-5


def test_pooling_next_to_generation_frees_its_blocks(llm, hf_hidden):
    """A pooling request in the same steps as generating ones: both are right, the
    generation is unchanged, and no KV block stays held."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.add_request("gen", PROMPTS[0], params)
    engine.add_request("emb", PROMPTS[1], None, pooling_params=PoolingParams("MEAN", False))  # type: ignore[arg-type]
    engine.add_request("gen2", PROMPTS[0], params)
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["gen"].outputs[0].token_ids == alone == finals["gen2"].outputs[0].token_ids
    torch.testing.assert_close(torch.tensor(finals["emb"].pooled_output), hf_hidden[1].mean(dim=0),
                               atol=1e-4, rtol=1e-4)
    assert finals["emb"].outputs[0].token_ids == [] and finals["emb"].metrics["num_generation_tokens"] == 0
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0
    assert not engine.engine_core.executor.worker.model_runner._pooling  # the runner forgot it


def test_embed_token_ids_and_prompt_limits(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[0])
    by_text, by_ids = llm.embed([PROMPTS[0], ids], use_tqdm=False)
    assert by_text.pooled_output == by_ids.pooled_output
    with pytest.raises(ValueError, match="prompt is 256 tokens long"):
        llm.embed([[1] * 256], use_tqdm=False)
    with pytest.raises(ValueError, match="pooling_type must be one of LAST, MEAN"):
        PoolingParams("CLS")


def test_preempted_pooling_request_starts_over(smollm2_path, hf_hidden):
    """A MEAN pooling request preempted half-way through its prompt (its partial
    sum is dropped) is recomputed from the start and still equals HF."""
    llm = LLM(smollm2_path, dtype="float32", max_model_len=80, block_size=16, num_gpu_blocks_override=5,
              max_num_batched_tokens=16, enable_prefix_caching=False)
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    long_prompt = tok.encode(" ".join(["word"] * 80))[:60]
    emb_ids = tok.encode(PROMPTS[1])
    assert 16 < len(emb_ids) <= 32  # two blocks: the second cannot be had until "gen" finishes
    engine.add_request("gen", long_prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.add_request("emb", emb_ids, None, pooling_params=PoolingParams("MEAN", False))  # type: ignore[arg-type]
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert llm.get_stats().num_preemptions >= 1
    assert len(finals["gen"].outputs[0].token_ids) == 8
    torch.testing.assert_close(torch.tensor(finals["emb"].pooled_output), hf_hidden[1].mean(dim=0),
                               atol=1e-4, rtol=1e-4)


def test_pooling_under_asynchronous_scheduling(smollm2_path, hf_hidden):
    """With steps launched ahead, a pooling request finishing while a decode step
    is in flight is still right, and is never scheduled again."""
    llm = LLM(smollm2_path, dtype="float32", max_model_len=128, block_size=16, kv_cache_memory=16 << 20,
              max_num_batched_tokens=16, async_scheduling=True)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    engine.add_request("gen", PROMPTS[0], params)
    for i in range(2):  # the first step computes "gen"'s prompt; these join its decode steps
        engine.step()
    engine.add_request("emb", PROMPTS[1], None, pooling_params=PoolingParams("LAST", True))  # type: ignore[arg-type]
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    ref = torch.nn.functional.normalize(hf_hidden[1][-1], dim=0)
    torch.testing.assert_close(torch.tensor(finals["emb"].pooled_output), ref, atol=1e-4, rtol=1e-4)
    alone = llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids
    assert finals["gen"].outputs[0].token_ids == alone and len(alone) == 12
    assert engine.engine_core.scheduler.kv_cache_manager.usage == 0
