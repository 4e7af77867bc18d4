"""Bad checkpoints, whatever the quantization method: the error names the
tensor and the scheme, and a failed start-up leaves nothing running.

- a parameter missing from the checkpoint is named with the scheme of the
  layer that owns it (``model.layers.0.mlp.down_proj.weight (int8_weight_only)``);
- a quantized tensor in a checkpoint whose ``quantization_config`` is missing
  is named, with the scheme its name belongs to;
- ``quantization`` that contradicts the checkpoint's scheme, and a scheme no
  method runs, are refused before anything loads;
- a load that fails in the engine's process, in worker processes or in an
  engine-core process leaves no process and no model behind.

Checkpoints: a tiny random Llama saved by HF transformers, edited with
safetensors (tensors dropped or added, ``config.json`` changed).
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from ember import LLM
from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.engine.core_client import EngineDeadError
from ember.engine.llm_engine import LLMEngine
from ember.executor.base import WorkerDeadError
from ember.layers.quantization.checkpoint_errors import quantized_tensor_schemes
from tests.distributed.test_worker_death import wait_gone
from tests.models.tiny import BLOCK_SIZE, KV_CACHE_BYTES, save_tiny

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False))
    return save_tiny(hf, tmp_path_factory.mktemp("bad_ckpt") / "llama")


def _variant(base: str, dst: Path, drop: tuple[str, ...] = (), add: dict[str, torch.Tensor] | None = None,
             quantization_config: dict | None = None) -> str:
    """A copy of checkpoint ``base`` without the tensors ``drop``, with the
    tensors ``add``, and with ``quantization_config`` in its config.json."""
    shutil.copytree(base, dst)
    tensors = load_file(dst / "model.safetensors")
    for name in drop:
        del tensors[name]
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if quantization_config is not None:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(config))
    return str(dst)


def _args(path: str, **kwargs) -> dict:
    return dict(model=path, dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=KV_CACHE_BYTES) | kwargs


def _live_model_runners() -> int:
    from ember.worker.model_runner import ModelRunner

    return sum(type(o) is ModelRunner for o in gc.get_objects())


def _new_children(before: set[int]) -> list[int]:
    """This process's children not in ``before``, less multiprocessing's
    resource tracker (started once by the first spawn, it lives as long as
    this process)."""
    new = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline()):
                new.append(p.pid)
    return new


def test_missing_weights_name_tensor_and_scheme(tiny_path, tmp_path) -> None:
    bad = _variant(tiny_path, tmp_path / "missing", drop=(f"{DOWN}.weight", "model.norm.weight"))
    runners = _live_model_runners()
    with pytest.raises(ValueError) as e:
        LLM(**_args(bad, quantization="int8_weight_only"))
    assert f"lacks weights for: {DOWN}.weight (int8_weight_only), model.norm.weight (unquantized)" in str(e.value)
    # The half-loaded model is not kept anywhere once the error is handled.
    del e
    gc.collect()
    assert _live_model_runners() <= runners

    with pytest.raises(ValueError, match=rf"lacks weights for: {DOWN}\.weight \(unquantized\), model\.norm"):
        LLM(**_args(bad))


@pytest.mark.parametrize(("suffix", "dtype", "schemes"), [
    ("qweight", torch.int32, "'awq' or 'gptq'"),
    ("qzeros", torch.int32, "'awq' or 'gptq'"),
    ("g_idx", torch.int32, "'gptq'"),
    ("weight_scale", torch.float32, "'fp8' or 'compressed-tensors' or 'w8a8_int8'"),
    ("input_scale", torch.float32, "'fp8' or 'compressed-tensors'"),
    ("weight_packed", torch.int32, "'compressed-tensors'"),
])
def test_quantized_tensor_without_quantization_config(tiny_path, tmp_path, suffix, dtype, schemes) -> None:
    name = f"{DOWN}.{suffix}"
    bad = _variant(tiny_path, tmp_path / suffix, add={name: torch.ones(4, dtype=dtype)})
    with pytest.raises(ValueError) as e:
        LLM(**_args(bad))
    msg = str(e.value)
    assert f"checkpoint weight {name!r} has no matching parameter" in msg
    assert f"of a {schemes} quantized checkpoint, but the model is loaded unquantized" in msg
    assert f"needs the quantization_config it was saved with (quant_method {schemes})" in msg


def test_quantized_tensor_for_another_method(tiny_path, tmp_path) -> None:
    bad = _variant(tiny_path, tmp_path / "awq_tensor", add={f"{DOWN}.qweight": torch.ones(4, dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"'awq' or 'gptq' quantized checkpoint, but the model is built with another"):
        LLM(**_args(bad, quantization="int8_weight_only"))


def test_quantized_tensor_schemes_by_name_and_dtype() -> None:
    assert quantized_tensor_schemes(f"{DOWN}.weight") is None
    assert quantized_tensor_schemes(f"{DOWN}.weight", torch.zeros(2)) is None
    assert quantized_tensor_schemes("model.norm.weight", torch.zeros(2, dtype=torch.float16)) is None
    assert quantized_tensor_schemes(f"{DOWN}.weight", torch.zeros(2, dtype=torch.float8_e4m3fn))[0] == ("fp8",)
    assert quantized_tensor_schemes(f"{DOWN}.weight", torch.zeros(2, dtype=torch.int8))[0] == (
        "w8a8_int8", "compressed-tensors")
    assert quantized_tensor_schemes(f"{DOWN}.weight_scale_inv")[0] == ("fp8",)
    assert quantized_tensor_schemes("model.layers.0.self_attn.k_scale")[0] == ()


def test_quantization_contradicting_the_checkpoint_is_refused(tiny_path, tmp_path) -> None:
    awq = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    path = _variant(tiny_path, tmp_path / "awq_config", quantization_config=awq)
    with pytest.raises(ConfigError, match="quantization: --quantization 'int8_weight_only' does not match the "
                                          "checkpoint's quantization_config.quant_method 'awq'"):
        LLM(**_args(path, quantization="int8_weight_only"))


def test_unsupported_scheme_is_refused_before_loading(tiny_path, tmp_path) -> None:
    path = _variant(tiny_path, tmp_path / "bnb", quantization_config={"quant_method": "bitsandbytes",
                                                                      "load_in_4bit": True})
    with pytest.raises(ConfigError, match=r"quantization: the checkpoint's quantization_config.quant_method "
                                          r"'bitsandbytes' is not supported \(quantization methods: \["):
        EngineArgs(**_args(path)).create_engine_config()


@pytest.mark.slow
def test_failed_load_in_worker_processes_leaves_nothing(tiny_path, tmp_path) -> None:
    bad = _variant(tiny_path, tmp_path / "missing_tp", drop=(f"{DOWN}.weight",))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(WorkerDeadError, match=rf"lacks weights for: {DOWN}\.weight \(int8_weight_only\)"):
        LLM(**_args(bad, quantization="int8_weight_only", tensor_parallel_size=2,
                    distributed_executor_backend="mp"))
    wait_gone(_new_children(before))


@pytest.mark.slow
def test_failed_load_in_engine_core_process_leaves_nothing(tiny_path, tmp_path) -> None:
    bad = _variant(tiny_path, tmp_path / "missing_core", drop=(f"{DOWN}.weight",))
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(EngineDeadError, match=rf"ValueError: .*lacks weights for: {DOWN}\.weight \(int8_weight_only\)"):
        LLMEngine.from_engine_args(EngineArgs(**_args(bad, quantization="int8_weight_only")), multiprocess=True)
    wait_gone(_new_children(before))


def test_engine_core_stops_its_executor_when_start_up_fails(tiny_path, monkeypatch) -> None:
    """Past the model load (e.g. the KV cache does not fit), the started
    workers are shut down before the error propagates."""
    import ember.engine.core as core_module

    class FailingExecutor:
        shut_down = False

        def determine_num_blocks(self) -> int:
            raise ConfigError("kv_cache_memory: too small")

        def shutdown(self) -> None:
            FailingExecutor.shut_down = True

    monkeypatch.setattr(core_module, "create_executor", lambda config: FailingExecutor())
    with pytest.raises(ConfigError, match="too small"):
        core_module.EngineCore(EngineArgs(**_args(tiny_path)).create_engine_config())
    assert FailingExecutor.shut_down
