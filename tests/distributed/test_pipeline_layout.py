"""Pipeline stages in one process: which layers a stage holds, what stands
in for the others, and which checkpoint tensors it loads (the stage is set
directly; no process group is needed to build and load a stage)."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from ember.distributed import parallel_state
from ember.distributed.parallel_state import PipelineGroup
from ember.layers.attention import get_attention_backend
from ember.loader import iter_weights, read_hf_config, resolve_model_source
from ember.models.qwen3 import Qwen3ForCausalLM as EmberQwen3
from ember.models.utils import PPMissingLayer, get_pp_layer_range
from tests.models.tiny import save_tiny


@pytest.mark.parametrize("num_layers, pp_size", [(4, 2), (5, 2), (7, 3), (3, 3)])
def test_stages_cover_the_layers_in_order(num_layers: int, pp_size: int) -> None:
    ranges = [get_pp_layer_range(num_layers, r, pp_size) for r in range(pp_size)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_layers
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [end - start for start, end in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot fill"):
        get_pp_layer_range(2, 0, 3)


@pytest.fixture
def stage(monkeypatch):
    def set_stage(rank: int, size: int) -> None:
        monkeypatch.setattr(parallel_state, "_PP", PipelineGroup(rank, size, rank, 1))
    return set_stage


@pytest.fixture(scope="module")
def tied_qwen3(tmp_path_factory) -> str:
    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                      max_position_embeddings=64, tie_word_embeddings=True))
    return save_tiny(hf, tmp_path_factory.mktemp("pp") / "qwen3")


def _build_and_load(path: str) -> tuple[EmberQwen3, set[str], dict[str, torch.Tensor]]:
    source = resolve_model_source(path)
    config = read_hf_config(source)
    model = EmberQwen3(config, get_attention_backend("torch"))
    loaded = model.load_weights(iter_weights(source, torch.float32))
    return model, loaded, dict(iter_weights(source, torch.float32))


def test_first_stage_holds_its_layers_and_the_embedding(stage, tied_qwen3: str) -> None:
    stage(0, 2)
    model, loaded, ckpt = _build_and_load(tied_qwen3)
    stack = model.model
    assert (stack.start_layer, stack.end_layer) == (0, 2)
    assert isinstance(stack.layers[2], PPMissingLayer)
    assert isinstance(stack.norm, PPMissingLayer) and isinstance(model.lm_head, PPMissingLayer)
    assert loaded == {n for n, _ in model.named_parameters()}  # everything it holds, nothing else
    assert not any(n.startswith("model.layers.2.") for n in loaded)
    assert torch.equal(stack.embed_tokens.weight, ckpt["model.embed_tokens.weight"])


def test_last_stage_loads_the_tied_table_into_its_head(stage, tied_qwen3: str) -> None:
    stage(1, 2)
    model, loaded, ckpt = _build_and_load(tied_qwen3)
    stack = model.model
    assert (stack.start_layer, stack.end_layer) == (2, 3)
    assert isinstance(stack.embed_tokens, PPMissingLayer)
    assert all(isinstance(stack.layers[i], PPMissingLayer) for i in (0, 1))
    assert loaded == {n for n, _ in model.named_parameters()}
    assert "lm_head.weight" in loaded
    assert torch.equal(model.lm_head.weight, ckpt["model.embed_tokens.weight"])
