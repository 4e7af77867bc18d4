"""A worker process of the multiprocess executor that dies takes the engine
down cleanly: the in-flight step fails with :class:`WorkerDeadError`, an idle
engine core process notices within seconds and reports itself dead (the
server's ``/health`` then answers 503), and no worker process is left behind.
Also: a worker that raises reports its traceback to the engine core."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ember import LLM, SamplingParams
from ember.engine.arg_utils import EngineArgs
from ember.engine.core_client import EngineDeadError
from ember.engine.llm_engine import LLMEngine
from ember.executor.base import WorkerDeadError
from tests.models.tiny import BLOCK_SIZE, KV_CACHE_BYTES, save_tiny

pytestmark = [pytest.mark.slow, pytest.mark.serial]
# The engine core's idle check runs every half second; the server's health
# check must see a dead worker well within 5 s.
DEATH_NOTICED_S = 5.0


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      initializer_range=0.2))
    return save_tiny(hf, tmp_path_factory.mktemp("death") / "llama")


def _args(path: str) -> dict:
    return dict(model=path, dtype="float32", block_size=BLOCK_SIZE, kv_cache_memory=KV_CACHE_BYTES,
                tensor_parallel_size=2)


def wait_gone(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait until every process of ``pids`` has exited (a zombie counts as gone)."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, f"process {pid} is still running"
            time.sleep(0.1)


def test_killed_worker_fails_the_step_and_stops_the_others(tiny_path: str) -> None:
    llm = LLM(**_args(tiny_path))
    executor = llm.llm_engine.engine_core.executor
    pids = [p.pid for p in executor.processes]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerDeadError, match="worker 1"):
        llm.generate([[1, 2, 3]], params, use_tqdm=False)
    wait_gone(pids)
    with pytest.raises(WorkerDeadError):  # and it stays dead
        executor.check_health()
    llm.llm_engine.shutdown()


def test_engine_core_process_reports_a_dead_worker_and_leaves_nothing(tiny_path: str) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(**_args(tiny_path)), multiprocess=True)
    try:
        core = psutil.Process(engine.core_client.process.pid)
        workers = core.children()
        assert len(workers) == 2, workers
        # A request in flight when the worker dies ends with the engine's error.
        engine.add_request("r0", [1, 2, 3], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
        engine.step()
        workers[0].kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker 0"):
            while True:
                assert time.monotonic() - start < DEATH_NOTICED_S, "the dead worker went unnoticed"
                engine.step()
        wait_gone([core.pid] + [w.pid for w in workers])
    finally:
        engine.shutdown()


def test_idle_engine_core_notices_a_dead_worker(tiny_path: str) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(**_args(tiny_path)), multiprocess=True)
    try:
        core = psutil.Process(engine.core_client.process.pid)
        workers = core.children()
        workers[1].kill()
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="worker 1"):
            engine.core_client.get_output(timeout_s=DEATH_NOTICED_S)
        assert time.monotonic() - start < DEATH_NOTICED_S
        wait_gone([core.pid] + [w.pid for w in workers])
    finally:
        engine.shutdown()


def test_worker_error_reaches_the_engine_with_its_traceback(tiny_path: str) -> None:
    # A KV cache too small for max_model_len fails on every worker at start-up.
    with pytest.raises(WorkerDeadError, match="fewer than max_model_len"):
        LLM(**(_args(tiny_path) | dict(kv_cache_memory=1024)))


def test_workers_die_with_a_killed_engine_core(tiny_path: str) -> None:
    engine = LLMEngine.from_engine_args(EngineArgs(**_args(tiny_path)), multiprocess=True)
    try:
        core = psutil.Process(engine.core_client.process.pid)
        workers = core.children()
        assert len(workers) == 2, workers
        core.kill()
        wait_gone([w.pid for w in workers])
    finally:
        engine.shutdown()
