"""GGUF loading checked against HF transformers' own GGUF reader (an independent
implementation of the name mapping, q/k un-permutation and config mapping).

HF's path builds a ``gguf.GGUFReader``, which is slow (~3 s SmolLM2, ~10 s Qwen);
one reader per file is built per module and handed to every HF call.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import (
    TENSOR_PROCESSORS,
    TensorProcessor,
    get_gguf_hf_weights_map,
    load_gguf_checkpoint,
)

from ember.loader import (
    ModelLoadError,
    ModelSource,
    UnsupportedArchitectureError,
    iter_weights,
    load_tokenizer,
    read_hf_config,
    resolve_model_source,
)
from ember.loader import gguf as ember_gguf

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- HF reference helpers


class HFReference:
    """transformers' GGUF reading, with one ``gguf.GGUFReader`` and one config per file."""

    def __init__(self) -> None:
        self._readers: dict[str, gguf.GGUFReader] = {}
        self._configs: dict[str, object] = {}

    def reader(self, path: str) -> gguf.GGUFReader:
        if path not in self._readers:
            self._readers[path] = gguf.GGUFReader(path)
        return self._readers[path]

    @contextlib.contextmanager
    def patched(self, path: str):
        """Make transformers' GGUF code (which imports from gguf at call time) reuse
        this file's reader, and build each gguf tensor-name map once instead of once
        per submodule (~10 s per call otherwise)."""
        reader = self.reader(path)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(gguf, "GGUFReader", lambda *args, **kwargs: reader)
            mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
            yield

    def config(self, path: str):
        if path not in self._configs:
            with self.patched(path):
                self._configs[path] = AutoConfig.from_pretrained(os.path.dirname(path),
                                                                 gguf_file=os.path.basename(path))
        return self._configs[path]

    def tensors(self, path: str) -> dict[str, torch.Tensor]:
        """All tensors as transformers loads them (float32, HF names, q/k un-permuted)."""
        model = _meta_model(self.config(path))
        with self.patched(path):
            return load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]

    def tokenizer(self, path: str):
        with self.patched(path):
            return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.fixture(scope="module")
def hf():
    return HFReference()


def _meta_model(config):
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _assert_same(ours: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, name
    if not torch.equal(ours, ref):  # exact is the norm; allow float rounding noise
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- tiny synthetic GGUF


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute`` (HF -> GGUF row order)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_TINY_TYPES = {  # one GGUF storage type per tensor kind: covers every type gguf-py can quantize
    "token_embd": Q.F16, "output": Q.Q8_0, "output_norm": Q.F32, "attn_norm": Q.F32, "ffn_norm": Q.F32,
    "attn_q": Q.F32, "attn_k": Q.Q8_0, "attn_v": Q.Q4_0, "attn_output": Q.Q4_1,
    "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_1, "ffn_down": Q.BF16,
}
_HF_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(hf_name: str) -> str:
    module, suffix = hf_name.rsplit(".", 1)
    if module.startswith("model.layers."):
        _, _, layer, rest = module.split(".", 3)
        return f"blk.{layer}.{_HF_TO_GGUF[rest]}.{suffix}"
    return f"{_HF_TO_GGUF[module]}.{suffix}"


@pytest.fixture(scope="module")
def tiny_llama():
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=1e-5, rope_theta=5e5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return config, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _write_gguf(path: Path, arch: str, config, tensors: dict[str, np.ndarray], types: dict[str, Q]) -> None:
    qtypes = {name: types.get(name.split(".")[-2], Q.F32) for name in tensors}
    write_gguf_data(path, arch, config, {name: (gguf.quants.quantize(array, qtypes[name]), qtypes[name])
                                         for name, array in tensors.items()})


def write_gguf_data(path: Path, arch: str, config, data: dict[str, tuple[np.ndarray, Q]]) -> None:
    """Write a GGUF file: ``arch``'s metadata from the HF ``config`` (Llama fields), then each tensor's
    stored data (quantized blocks as uint8 rows, or float32) with its quantization type."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    for name, (array, qtype) in data.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_gguf_tensors(config, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out = {}
    for hf_name, t in state.items():
        w = t.numpy().astype(np.float32)
        if ".q_proj." in hf_name:
            w = _llama_cpp_permute(w, config.num_attention_heads)
        elif ".k_proj." in hf_name:
            w = _llama_cpp_permute(w, config.num_key_value_heads)
        out[_gguf_name(hf_name)] = w
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> str:
    config, state = tiny_llama
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    _write_gguf(path, "llama", config, _tiny_gguf_tensors(config, state), _TINY_TYPES)
    return str(path)


# ---------------------------------------------------------------- config


_CONFIG_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_parameters",
                  "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                  "pad_token_id", "hidden_act", "attention_bias", "sliding_window", "use_sliding_window")


@pytest.mark.slow
@pytest.mark.parametrize("which, arch, tied", [("smollm2", "LlamaForCausalLM", True),
                                               ("qwen", "Qwen2ForCausalLM", False)])
def test_config_matches_hf(which, arch, tied, request, hf):
    path = request.getfixturevalue(f"{which}_path")
    ours = read_hf_config(ModelSource("gguf", path))
    ref = hf.config(path)
    assert type(ours) is type(ref)
    for field in _CONFIG_FIELDS:
        assert getattr(ours, field, None) == getattr(ref, field, None), field
    expected_head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert ours.head_dim == expected_head_dim
    assert ours.architectures == [arch]
    assert ours.tie_word_embeddings is tied


def test_config_tiny(tiny_gguf, tiny_llama):
    config, _ = tiny_llama
    ours = ember_gguf.gguf_hf_config(tiny_gguf)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings", "rope_parameters", "head_dim"):
        assert getattr(ours, field) == getattr(config, field), field
    assert ours.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    assert ours.tie_word_embeddings is False and ours.attention_bias is False


# ---------------------------------------------------------------- weights


def test_tiny_weights_round_trip(tiny_gguf, tiny_llama, hf):
    """Covers F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and the q/k un-permutation
    against the original HF weights, independent of transformers' GGUF code."""
    _, state = tiny_llama
    ours = dict(iter_weights(ModelSource("gguf", tiny_gguf), torch.float32))
    assert set(ours) == set(state)
    for name, w in state.items():
        assert ours[name].shape == w.shape and ours[name].dtype == torch.float32, name
        kind = _gguf_name(name).split(".")[-2]
        if _TINY_TYPES.get(kind, Q.F32) == Q.F32:
            torch.testing.assert_close(ours[name], w, rtol=0, atol=0, msg=name)
        else:  # quantization error is well under 1/4 of the largest weight; a wrong layout is not
            assert (ours[name] - w).abs().max() <= 0.25 * w.abs().max(), name
    ref = hf.tensors(tiny_gguf)
    assert set(ref) == set(ours)
    for name, w in ref.items():
        _assert_same(ours[name], w, name)


def test_dtype_cast(tiny_gguf):
    for name, w in iter_weights(ModelSource("gguf", tiny_gguf), torch.bfloat16):
        assert w.dtype == torch.bfloat16 and w.device.type == "cpu", name


@pytest.mark.slow
def test_smollm2_weights_match_hf(smollm2_path, hf):
    ref = hf.tensors(smollm2_path)
    ours = dict(iter_weights(ModelSource("gguf", smollm2_path), torch.float32))
    assert "lm_head.weight" not in ours  # tied embeddings
    assert set(ours) == set(ref) and len(ours) == 272
    for name, w in ref.items():
        _assert_same(ours[name], w, name)


@pytest.mark.slow
def test_qwen_weights_sample_match_hf(qwen_path, hf):
    """Every tensor's name and shape; values of layer 0, one Q4_K tensor and the final norm."""
    reader = hf.reader(qwen_path)
    config = hf.config(qwen_path)
    meta_model = _meta_model(config)
    gf = ember_gguf.read_gguf(qwen_path)
    plan = ember_gguf._weight_plan(gf, ember_gguf._build_config(gf))
    expected = {n: tuple(p.shape) for n, p in meta_model.state_dict().items()}
    assert {p.hf_name: p.shape for p in plan} == expected

    processor = TENSOR_PROCESSORS.get("qwen2", TensorProcessor)(config=config.to_dict())
    with hf.patched(qwen_path):
        hf_names = get_gguf_hf_weights_map(meta_model, processor)
    sample = {t.name: t for t in reader.tensors
              if t.name.startswith("blk.0.") or t.name in ("blk.2.ffn_down.weight", "output_norm.weight")}
    assert {t.tensor_type for t in sample.values()} == {Q.F32, Q.Q5_0, Q.Q8_0, Q.Q6_K, Q.Q4_K}
    for planned in plan:
        if planned.tensor.name not in sample:
            continue
        t = sample[planned.tensor.name]
        ref = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name).weights
        assert hf_names[t.name] == planned.hf_name
        ours = ember_gguf._load_tensor(gf, planned, torch.float32)
        _assert_same(ours, torch.from_numpy(np.array(ref)), t.name)


# ---------------------------------------------------------------- tokenizer


_TEXTS = [
    "Hello, world!",
    "héllo wörld — 你好, мир 🤗 naïve café",
    "def f(x):\n    return {'a': x ** 2}  # square\n\tpass\n",
    "<|im_start|>user\nhi<|im_end|>",
    "  leading spaces\n\n\n  and trailing   ",
]
_CHAT = [{"role": "user", "content": "Write a Python hello world."}]


@pytest.fixture(scope="module")
def tokenizer_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("ember-cache")
        mp.setenv("EMBER_CACHE_DIR", str(cache))
        yield cache


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_tokenizer_matches_hf_and_caches(which, request, hf, tokenizer_cache, monkeypatch):
    path = request.getfixturevalue(f"{which}_path")
    ref = hf.tokenizer(path)
    with hf.patched(path):
        first = load_tokenizer(ModelSource("gguf", path))  # converts and fills the cache
    key = ember_gguf._tokenizer_cache_key(path)
    assert (tokenizer_cache / "tokenizers" / key / "tokenizer.json").is_file()
    assert not [p for p in (tokenizer_cache / "tokenizers").iterdir() if p.name.startswith(".")]  # no temp dirs

    def no_conversion(_path):
        raise AssertionError("cache miss")

    monkeypatch.setattr(ember_gguf, "_convert_gguf_tokenizer", no_conversion)
    second = load_tokenizer(ModelSource("gguf", path))
    meta = ember_gguf.read_gguf(path).metadata
    for tok in (first, second):
        for text in _TEXTS:
            ids = tok.encode(text)
            assert ids == ref.encode(text), text
            assert tok.decode(ids) == text
        assert tok.chat_template == meta["tokenizer.chat_template"]
        prompt = tok.apply_chat_template(_CHAT, tokenize=False, add_generation_prompt=True)
        assert prompt == ref.apply_chat_template(_CHAT, tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n") and _CHAT[0]["content"] in prompt
        assert tok.eos_token_id == meta["tokenizer.ggml.eos_token_id"]
        assert tok.bos_token_id == meta["tokenizer.ggml.bos_token_id"]
        assert len(tok) == len(meta["tokenizer.ggml.tokens"])


def test_tokenizer_cache_key_changes_with_file(tiny_gguf, tmp_path):
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(tiny_gguf, copy)
    key = ember_gguf._tokenizer_cache_key(str(copy))
    assert len(key) == 16 and key != ember_gguf._tokenizer_cache_key(tiny_gguf)
    os.utime(copy, ns=(1, 1))
    assert ember_gguf._tokenizer_cache_key(str(copy)) != key


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelLoadError, match="nope.gguf"):
        resolve_model_source(str(missing))


def test_random_bytes_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelLoadError, match=r"x\.gguf.*not a GGUF file"):
        resolve_model_source(str(bad))
    with pytest.raises(ModelLoadError, match="x.gguf"):
        ember_gguf.gguf_hf_config(str(bad))


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty.gguf"):
        resolve_model_source(str(empty))
    with pytest.raises(ModelLoadError, match="empty.gguf"):
        ember_gguf.read_gguf(str(empty))


def test_truncated_header(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        cut.write_bytes(f.read(1 << 20))  # ends inside the tokenizer metadata
    source = resolve_model_source(str(cut))  # the magic is fine
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        read_hf_config(source)
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        next(iter_weights(source, torch.float32))


def test_truncated_data(tiny_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = Path(tiny_gguf).read_bytes()
    cut.write_bytes(data[:-1000])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf is truncated"):
        read_hf_config(resolve_model_source(str(cut)))


def test_unsupported_architecture(tiny_llama, tmp_path):
    config, _ = tiny_llama
    path = tmp_path / "mamba.gguf"
    _write_gguf(path, "mamba", config, {"token_embd.weight": np.zeros((96, 64), np.float32)}, {})
    source = resolve_model_source(str(path))
    with pytest.raises(UnsupportedArchitectureError, match=r"'mamba'.*\['llama', 'qwen2'\]"):
        read_hf_config(source)
    with pytest.raises(UnsupportedArchitectureError, match="mamba"):
        next(iter_weights(source, torch.float32))


def test_unknown_tensor_name(tiny_llama, tmp_path):
    config, state = tiny_llama
    tensors = _tiny_gguf_tensors(config, state)
    tensors["blk.0.mystery.weight"] = np.zeros((4, 64), np.float32)
    path = tmp_path / "odd.gguf"
    _write_gguf(path, "llama", config, tensors, {})
    with pytest.raises(ModelLoadError, match=r"odd\.gguf.*blk\.0\.mystery\.weight"):
        next(iter_weights(ModelSource("gguf", str(path)), torch.float32))


def test_skips_rope_freqs(tiny_llama, tmp_path):
    config, state = tiny_llama
    tensors = _tiny_gguf_tensors(config, state)
    tensors["rope_freqs.weight"] = np.ones(8, np.float32)
    path = tmp_path / "llama3ish.gguf"
    _write_gguf(path, "llama", config, tensors, {})
    names = [n for n, _ in iter_weights(ModelSource("gguf", str(path)), torch.float32)]
    assert sorted(names) == sorted(state)


def test_hf_tensor_name():
    assert ember_gguf.hf_tensor_name("blk.12.attn_k.bias") == "model.layers.12.self_attn.k_proj.bias"
    assert ember_gguf.hf_tensor_name("output.weight") == "lm_head.weight"
    assert ember_gguf.hf_tensor_name("rope_freqs.weight") is None
    for bad in ("blk.x.attn_q.weight", "token_embd", "blk.0.attn_q.scale"):
        with pytest.raises(ModelLoadError, match=bad.replace(".", r"\.")):
            ember_gguf.hf_tensor_name(bad)
