"""Carry the bundled GGUF models to a GPU machine that takes at most 64 MiB of
files per call and reaches no package index.

Here (a machine with the models in the ``ember download`` cache)::

    python benchmarks/gpu/gguf_carry.py split [MODEL ...]

cuts each model's ``.gguf`` file into parts of at most 55 MiB under
``.carry/gguf/`` (git-ignored) with a ``.sha256`` file, and prints the parts:
carry one part per call to the same warm machine (ignored paths already there
stay between calls), e.g. ``carry=[".carry/gguf/SmolLM2-135M-Instruct.Q4_1.gguf.00"]``.
There::

    python3 benchmarks/gpu/gguf_carry.py join DIR

concatenates every complete set of parts into ``DIR/<file>.gguf``, checks its
SHA-256 against the pin, and prints the paths of the complete files (one a
line); incomplete sets are named on stderr. Only the standard library runs there.
With DIR = ``$EMBER_CACHE_DIR/models`` (default ``~/.cache/ember/models``), the
bundled models' names (``--model SmolLM2-135M-Instruct``, the tests' fixtures)
find the files there without their packages.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

CARRY = Path(__file__).resolve().parents[2] / ".carry" / "gguf"
PART_BYTES = 55 << 20
DEFAULT_MODELS = ["SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def split(models: list[str]) -> None:
    from ember.loader.download import BUNDLED_MODELS, ensure_bundled_model

    CARRY.mkdir(parents=True, exist_ok=True)
    for name in models:
        src = Path(ensure_bundled_model(name, progress=False))
        size = src.stat().st_size
        num_parts = -(-size // PART_BYTES)
        (CARRY / f"{src.name}.sha256").write_text(f"{BUNDLED_MODELS[name].sha256} {num_parts}\n")
        with open(src, "rb") as f:
            for i in range(num_parts):
                part = CARRY / f"{src.name}.{i:02d}"
                part.write_bytes(f.read(PART_BYTES))
                print(part.relative_to(CARRY.parents[1]))
    pins = ", ".join(str(p.relative_to(CARRY.parents[1])) for p in sorted(CARRY.glob("*.sha256")))
    print(f"also carry, with any part: {pins}")


def join(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for pin in sorted(CARRY.glob("*.sha256")):
        digest, num_parts = pin.read_text().split()
        name = pin.name[: -len(".sha256")]
        target = out_dir / name
        if target.is_file() and _sha256(target) == digest:
            print(target)
            continue
        parts = [CARRY / f"{name}.{i:02d}" for i in range(int(num_parts))]
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            print(f"{name}: parts missing: {missing}", file=sys.stderr)
            continue
        with open(target, "wb") as f:
            for p in parts:
                f.write(p.read_bytes())
        if _sha256(target) != digest:
            target.unlink()
            print(f"{name}: SHA-256 of the joined parts differs from the pin", file=sys.stderr)
            continue
        print(target)


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "split":
        split(sys.argv[2:] or DEFAULT_MODELS)
    elif len(sys.argv) == 3 and sys.argv[1] == "join":
        join(Path(sys.argv[2]))
    else:
        raise SystemExit(__doc__)
