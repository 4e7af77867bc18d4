"""Start ``ember serve`` in a subprocess for tests (the real server on the
bundled SmolLM2-135M-Instruct) and stop it with SIGTERM."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest

MODEL = "SmolLM2-135M-Instruct"
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    """A running server: its base URL (``http://127.0.0.1:PORT``), process and log."""

    url: str
    proc: subprocess.Popen
    log: tempfile._TemporaryFileWrapper

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-chars:]

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM, then wait; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


@contextlib.contextmanager
def launch_server(*args: str, env: dict[str, str] | None = None, check_exit: bool = True,
                  startup_timeout: float = STARTUP_TIMEOUT_S,
                  preexec_fn: Callable[[], None] | None = None) -> Iterator[ServerProcess]:
    """Run ``ember serve --port <free> *args`` until healthy; yield it; stop it.

    Args:
        args: extra CLI flags, e.g. ``("--max-model-len", "256")``.
        env: the subprocess environment (None: inherit).
        check_exit: assert that SIGTERM makes it exit with 0.
        startup_timeout: seconds to wait for ``/health`` to answer 200.
        preexec_fn: run in the child before ``ember serve`` starts (e.g. to set rlimits).
    """
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", prefix="ember-serve-", suffix=".log")
    cmd = [sys.executable, "-m", "ember.entrypoints.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec_fn)
    server = ServerProcess(f"http://127.0.0.1:{port}", proc, log)
    rc: int | None = 0
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ember serve exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ember serve not healthy after {startup_timeout} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        rc = server.stop()
        tail = server.log_tail()
        log.close()
    if check_exit:
        assert rc == 0, f"ember serve did not shut down cleanly (exit {rc}):\n{tail}"
