"""HF safetensors directories: a tiny random Llama saved by transformers, read back."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ember.loader import ModelLoadError, ModelSource, iter_weights, load_tokenizer, read_hf_config, resolve_model_source
from ember.loader.safetensors import INDEX_FILE

_TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=5e5)


def _tiny_model(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_TINY, tie_word_embeddings=tie))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """Untied tiny Llama in ~50 KB shards: (dir, state_dict, config)."""
    path = tmp_path_factory.mktemp("sharded")
    model = _tiny_model(tie=False)
    model.save_pretrained(path, max_shard_size="50KB")
    return path, model.state_dict(), model.config


def test_sharded_weights_exact(sharded_dir):
    path, state, _ = sharded_dir
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    assert len(set(weight_map.values())) > 3  # really sharded
    source = resolve_model_source(str(path))
    assert source == ModelSource("hf", str(path.resolve()))
    ours = dict(iter_weights(source, torch.float32))
    assert set(ours) == set(state) == set(weight_map)
    for name, w in state.items():
        assert torch.equal(ours[name], w), name


def test_weights_in_the_model_dtype_are_views_of_the_file(sharded_dir):
    """No copy is made of a tensor already in the model dtype: each one is a
    view of its file's memory map, so a tensor-parallel rank that copies its
    slice (``narrow`` then ``copy_``) never holds a whole tensor. Writing to a
    view leaves the file as it was (copy-on-write)."""
    path, state, _ = sharded_dir
    weights = dict(iter_weights(ModelSource("hf", str(path)), torch.float32))
    storages = {w.untyped_storage().data_ptr(): w.untyped_storage().nbytes() for w in weights.values()}
    files = sorted(path.glob("*.safetensors"))
    assert len(storages) == len(files) < len(weights)  # one map per file, shared by its tensors
    assert sorted(storages.values()) == sorted(f.stat().st_size for f in files)
    name = next(iter(weights))
    weights[name].zero_()
    assert torch.equal(dict(iter_weights(ModelSource("hf", str(path)), torch.float32))[name], state[name])


def test_dtype_cast(sharded_dir):
    path, state, _ = sharded_dir
    ours = dict(iter_weights(ModelSource("hf", str(path)), torch.bfloat16))
    for name, w in state.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], w.to(torch.bfloat16)), name


def test_config(sharded_dir):
    path, _, config = sharded_dir
    ours = read_hf_config(ModelSource("hf", str(path)))
    assert type(ours) is LlamaConfig
    assert ours.architectures == ["LlamaForCausalLM"]
    for field in (*(k for k in _TINY if k != "rope_theta"), "rope_parameters", "tie_word_embeddings"):
        assert getattr(ours, field) == getattr(config, field), field


def test_single_file_tied(tmp_path):
    model = _tiny_model(tie=True)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / INDEX_FILE).exists()
    ours = dict(iter_weights(resolve_model_source(str(tmp_path)), torch.float32))
    assert "lm_head.weight" not in ours  # transformers does not store tied copies
    for name, w in ours.items():
        assert torch.equal(w, model.state_dict()[name]), name
    assert read_hf_config(ModelSource("hf", str(tmp_path))).tie_word_embeddings is True


def test_tokenizer(tmp_path):
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tok.save_pretrained(tmp_path)
    _tiny_model(tie=True).save_pretrained(tmp_path)
    loaded = load_tokenizer(resolve_model_source(str(tmp_path)))
    assert loaded.encode("hello there world") == [1, 0, 2]
    assert loaded.eos_token == "</s>" and loaded.chat_template == tok.chat_template


def test_dir_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{tmp_path}.*no config.json"):
        resolve_model_source(str(tmp_path))


def test_dir_with_gguf_but_no_config(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match=r"no config.json.*m\.gguf"):
        resolve_model_source(str(tmp_path))


def test_dir_without_safetensors(tmp_path):
    LlamaConfig(**_TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=f"{tmp_path} has no .*safetensors"):
        resolve_model_source(str(tmp_path))


def test_missing_shard(tmp_path):
    _tiny_model(tie=False).save_pretrained(tmp_path, max_shard_size="50KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=shard.name):
        next(iter_weights(resolve_model_source(str(tmp_path)), torch.float32))


def test_corrupt_shard(tmp_path):
    _tiny_model(tie=True).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        next(iter_weights(resolve_model_source(str(tmp_path)), torch.float32))


def test_bad_config(tmp_path):
    _tiny_model(tie=True).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="config.json"):
        read_hf_config(resolve_model_source(str(tmp_path)))
