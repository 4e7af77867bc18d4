"""The engine core in its own process (ZMQ + msgpack) on the bundled SmolLM2:
the same tokens as the in-process core, aborts free the KV blocks, a dead core
is detected (in-flight requests fail, new ones are refused), and an orphaned
core exits."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import msgspec
import pytest

from ember import SamplingParams
from ember.core.sched_output import EngineCoreOutput
from ember.core.stats import SchedulerStats
from ember.engine.arg_utils import EngineArgs
from ember.engine.async_llm import AsyncLLM
from ember.engine.core_client import EngineDeadError, EngineOverloadedError
from ember.engine.llm_engine import LLMEngine
from ember.engine.messages import EngineCoreOutputs, EngineCoreRequest
from ember.outputs import RequestOutput
from ember.sampling_params import RequestOutputKind
from tests.models.prompts import RAW_PROMPTS

pytestmark = [pytest.mark.slow, pytest.mark.serial]

NUM_NEW = 24


def _args(path: str) -> EngineArgs:
    return EngineArgs(model=path, max_model_len=512, kv_cache_memory=64 << 20, max_num_batched_tokens=64)


def _run(engine: LLMEngine, prompts: list[str]) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    results, pending, step = {}, list(enumerate(prompts)), 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:  # staggered arrivals
            i, p = pending.pop(0)
            engine.add_request(f"p{i}", p, params)
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        step += 1
    return results


def test_messages_round_trip_msgpack() -> None:
    params = SamplingParams(temperature=0.5, top_k=3, stop=["x"], seed=7, output_kind=RequestOutputKind.DELTA)
    params._eos_token_ids = frozenset({2})
    req = EngineCoreRequest("r", [1, 2, 3], params, 12.5, priority=-1, cache_salt="s")
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(req), type=EngineCoreRequest)
    assert back == req and back.sampling_params._eos_token_ids == frozenset({2})
    outs = EngineCoreOutputs([EngineCoreOutput("r", [5], "stop", 5)], SchedulerStats(num_running=3), {"r": 1.0},
                             {"q": "bad"})
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(outs), type=EngineCoreOutputs) == outs


def test_core_process_matches_in_process(smollm2_path: str) -> None:
    prompts = list(RAW_PROMPTS[:4])
    inproc = LLMEngine.from_engine_args(_args(smollm2_path))
    expected = _run(inproc, prompts)
    inproc.shutdown()
    # The core process schedules asynchronously: the tokens must not change.
    args = dataclasses.replace(_args(smollm2_path), async_scheduling=True)
    engine = LLMEngine.from_engine_args(args, multiprocess=True)
    try:
        pid = engine.core_client.process.pid
        assert pid != os.getpid()
        assert _run(engine, prompts) == expected
        with pytest.raises(AttributeError, match="another process"):
            _ = engine.engine_core
    finally:
        engine.shutdown()
    assert not engine.core_client.process.is_alive()


@pytest.fixture(scope="module")
def async_engine(smollm2_path: str):
    engine = AsyncLLM.from_engine_args(_args(smollm2_path))
    yield engine
    engine.shutdown()


async def _wait_for(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_async_abort_frees_blocks(async_engine: AsyncLLM) -> None:
    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        streams = [async_engine.generate(p, params, f"a{i}") for i, p in enumerate(RAW_PROMPTS[:3])]
        for s in streams:
            await anext(s)  # running, with KV blocks
        await _wait_for(lambda: async_engine.get_stats().kv_cache_usage > 0)
        for s in streams:
            await s.aclose()  # what a client disconnect does
        await _wait_for(lambda: async_engine.get_stats().num_running == 0
                        and async_engine.get_stats().kv_cache_usage == 0)
        # The engine keeps serving.
        short = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        outs = [o async for o in async_engine.generate("Hello", short, "after")]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4

    asyncio.run(main())


def test_burst_past_max_waiting_requests_is_refused(async_engine: AsyncLLM) -> None:
    # A burst submitted in one event-loop turn (as HTTP handlers may be): the
    # check and the submit are atomic, so the limit holds within the burst too.
    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        await _wait_for(lambda: async_engine.get_stats().num_running == 0)
        async_engine.max_waiting_requests = 2
        try:
            streams = [async_engine.generate("Count: one, two,", params, f"burst{i}") for i in range(6)]
            firsts = await asyncio.gather(*(anext(s) for s in streams), return_exceptions=True)
        finally:
            async_engine.max_waiting_requests = None
        refused = [f for f in firsts if isinstance(f, EngineOverloadedError)]
        admitted = [s for s, f in zip(streams, firsts) if isinstance(f, RequestOutput)]
        assert len(refused) + len(admitted) == 6, firsts
        # None were running at the burst, so the first two submitted wait and the rest are refused.
        assert len(admitted) == 2, firsts
        for s in admitted:
            async for _ in s:
                pass
        await _wait_for(lambda: async_engine.num_waiting_requests() == 0)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_dead_core_is_detected(async_engine: AsyncLLM) -> None:
    # NOTE: kills the module's engine, so it runs after the other tests using it.
    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        stream = async_engine.generate("Once upon a time", params, "victim")
        await anext(stream)
        dead = asyncio.ensure_future(async_engine.wait_until_dead())
        process = async_engine.core_client.process
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)  # gone, and this event loop has not looked yet
        # A request sent to the dead core before anyone noticed: the send must not
        # block the event loop (a PUSH socket without a peer would block forever).
        start = time.monotonic()
        late = async_engine.generate("Hi", params, "late")
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            await asyncio.wait_for(anext(late), 5)
        assert time.monotonic() - start < 1.0
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            async for _ in stream:
                pass
        assert async_engine.errored
        assert await asyncio.wait_for(dead, 1) is async_engine.dead_error
        with pytest.raises(EngineDeadError, match="SIGKILL"):
            await anext(async_engine.generate("Hi", params, "refused"))

    asyncio.run(asyncio.wait_for(main(), 60))


def test_orphaned_core_exits(smollm2_path: str, tmp_path) -> None:
    # A front end that dies without shutting down (as SIGKILL would) must not leave its
    # core behind, also while the core is busy generating (it then never idles, and
    # its sends to the gone front end would block).
    script = tmp_path / "front.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from ember import SamplingParams
        from ember.engine.arg_utils import EngineArgs
        from ember.engine.llm_engine import LLMEngine
        if __name__ == "__main__":
            engine = LLMEngine.from_engine_args(EngineArgs(model={smollm2_path!r}, max_model_len=256,
                                                           kv_cache_memory=16 << 20), multiprocess=True)
            engine.add_request("busy", "Once upon a time", SamplingParams(max_tokens=240, ignore_eos=True))
            while not any(out.outputs[0].token_ids for out in engine.step()):
                pass
            print(engine.core_client.process.pid, flush=True)
            os._exit(0)
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    core_pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while _alive(core_pid):
        assert time.monotonic() < deadline, "the orphaned engine core is still running"
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it).
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
