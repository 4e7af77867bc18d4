"""Run a script that compiles Triton kernels for a GPU target without a GPU
(``triton.compile`` with a ``GPUTarget``; ptxas and cuobjdump ship with
Triton's wheel), in a subprocess without ``TRITON_INTERPRET``: the interpreter
that the other kernel tests use accepts code the compiler refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_compile_script(script: str, timeout: float = 600) -> Any:
    """Run ``script`` (Python source that prints one JSON value on its last
    line) with the repository on the path; returns that value. Skips the test
    when this Triton has no CUDA backend; fails it with the script's stderr
    when the script fails."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
