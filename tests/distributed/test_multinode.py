"""Two "nodes" on one machine: node 0 is the engine (``LLM`` with
``nnodes=2``, its rank 0 in this process's workers) and node 1 is an
``ember worker`` process holding rank 1; the two join over 127.0.0.1 (the
process groups on ``master_port``, the control connections on the next
port) and give the same greedy tokens as the single-process engine. When
the engine shuts down, node 1's workers leave and ``ember worker`` exits 0;
when node 1 dies, the engine fails with an error naming it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from ember import LLM
from ember.config import ConfigError
from ember.executor.base import WorkerDeadError
from tests.distributed.test_parallel_engine import _llama, assert_same, generate
from tests.models.tiny import one_thread, save_tiny

pytestmark = pytest.mark.slow

SECRET = "test-secret"


def _free_port_pair() -> int:
    """A port p with p and p + 1 free."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65534:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no pair of free ports")


def _start_node1(port: int) -> subprocess.Popen:
    env = dict(os.environ, EMBER_DIST_SECRET=SECRET, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "ember.entrypoints.cli", "worker", "--master-addr", "127.0.0.1",
                             "--master-port", str(port), "--nnodes", "2", "--node-rank", "1",
                             "--log-level", "warning"], env=env)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory) -> str:
    return save_tiny(_llama(), tmp_path_factory.mktemp("multinode") / "llama")


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("EMBER_DIST_SECRET", SECRET)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_two_nodes_equal_one_process(llama_path: str, secret) -> None:
    with one_thread():
        ref = generate(llama_path)
    port = _free_port_pair()
    node1 = _start_node1(port)
    try:
        ours = generate(llama_path, tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1", master_port=port)
        assert node1.wait(timeout=30) == 0  # the engine's shutdown let node 1 go
    finally:
        if node1.poll() is None:
            node1.kill()
    assert_same(ours, ref)


def test_node_death_fails_the_engine(llama_path: str, secret) -> None:
    port = _free_port_pair()
    node1 = _start_node1(port)
    llm = LLM(llama_path, dtype="float32", tensor_parallel_size=2, nnodes=2, master_addr="127.0.0.1",
              master_port=port, kv_cache_memory=1 << 20)
    executor = llm.llm_engine.engine_core.executor
    local_pids = [p.pid for p in executor.processes if p is not None]
    try:
        remote = [c for c in psutil.Process(node1.pid).children()
                  if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(remote) == 1, remote
        remote[0].send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 10
        with pytest.raises(WorkerDeadError, match="worker 1 \\(node 1\\)"):
            while time.monotonic() < deadline:
                executor.check_health()
                time.sleep(0.1)
        assert node1.wait(timeout=10) == 1
        for pid in local_pids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if node1.poll() is None:
            node1.kill()
        llm.llm_engine.shutdown()


def test_settings_are_checked(llama_path: str) -> None:
    with pytest.raises(ConfigError, match="master_port"):
        LLM(llama_path, tensor_parallel_size=2, nnodes=2)
    with pytest.raises(ConfigError, match="nnodes"):
        LLM(llama_path, tensor_parallel_size=2, nnodes=3, master_port=29500)
    out = subprocess.run([sys.executable, "-m", "ember.entrypoints.cli", "worker", "--master-addr", "127.0.0.1",
                          "--master-port", "1", "--nnodes", "2", "--node-rank", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--node-rank 2" in out.stderr
