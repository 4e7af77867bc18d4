"""The executor boundary: what crosses it is plain data. A wrapper executor
round-trips every SchedulerOutput and ModelRunnerOutput through pickle and
checks that they hold only plain Python values (as a multiprocess executor
will need); the engine's outputs are unchanged, synchronous or asynchronous.
Step observers see one record per step."""

from __future__ import annotations

import dataclasses
import pickle
import enum

import pytest

from ember.core.sched_output import ModelRunnerOutput, SchedulerOutput
from ember.engine.step_stats import StepRecord, StepTimes, StepTrace
from ember.executor.base import Executor
from ember.executor.uniproc import UniProcExecutor
from tests.engine.test_async_scheduling import PROMPTS, final, make_engine, run

PLAIN = (int, float, str, bytes, bool, type(None))


def assert_plain(value: object, where: str = "") -> None:
    """``value`` is built of plain values, containers and dataclasses only."""
    if isinstance(value, PLAIN) or isinstance(value, enum.Enum):
        return
    if isinstance(value, (list, tuple, set, frozenset)):
        for i, v in enumerate(value):
            assert_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            assert_plain(k, f"{where} key")
            assert_plain(v, f"{where}[{k!r}]")
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            assert_plain(getattr(value, f.name), f"{where}.{f.name}")
    else:
        raise AssertionError(f"{where}: {type(value).__name__} crosses the executor boundary")


class PicklingExecutor(Executor):
    """Passes every call to ``inner`` through pickle, as a process boundary would."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner
        self.num_launched = 0

    def determine_num_blocks(self) -> int:
        return self.inner.determine_num_blocks()

    def kv_cache_bytes_per_block(self) -> int:
        return self.inner.kv_cache_bytes_per_block()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self.inner.initialize_kv_cache(num_blocks)

    def initialize_host_kv_cache(self, num_blocks: int) -> None:
        self.inner.initialize_host_kv_cache(num_blocks)

    def rank_reports(self, num_tokens: int) -> list[dict]:
        return pickle.loads(pickle.dumps(self.inner.rank_reports(num_tokens)))

    def launch(self, sched: SchedulerOutput) -> None:
        assert_plain(sched, "SchedulerOutput")
        self.num_launched += 1
        self.inner.launch(pickle.loads(pickle.dumps(sched)))

    def collect(self) -> ModelRunnerOutput:
        out = self.inner.collect()
        assert_plain(out, "ModelRunnerOutput")
        return pickle.loads(pickle.dumps(out))

    @property
    def num_in_flight(self) -> int:
        return self.inner.num_in_flight


def test_uniproc_executor_is_an_executor() -> None:
    assert issubclass(UniProcExecutor, Executor)
    assert not getattr(UniProcExecutor, "__abstractmethods__", None)


def test_assert_plain_rejects_a_tensor() -> None:
    import torch

    with pytest.raises(AssertionError, match="Tensor crosses"):
        assert_plain(ModelRunnerOutput({"a": [torch.tensor(1)]}))


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_outputs_unchanged_through_a_pickling_boundary(async_scheduling: bool) -> None:
    params = [final(temperature=0, max_tokens=9, ignore_eos=True, logprobs=2),
              final(temperature=0.8, seed=5, max_tokens=7, prompt_logprobs=1)] * 4
    params = params[: len(PROMPTS)]
    plain = make_engine(async_scheduling)
    want = run(plain, params)
    plain.shutdown()
    engine = make_engine(async_scheduling)
    core = engine.engine_core
    core.executor = wrapper = PicklingExecutor(core.executor)
    records: list[StepRecord] = []
    trace, times = StepTrace(), StepTimes()
    for observer in (records.append, trace, times):
        core.add_step_observer(observer)
    assert run(engine, params) == want
    while core.has_unfinished_requests():  # a step launched ahead may be left: it has nothing to say
        assert core.step() == []
    assert wrapper.num_launched == len(records) == len(trace.steps) == times.num_steps > 0
    assert (times.num_steps_ahead > 0) == async_scheduling
    assert sum(r.sched.total_num_scheduled_tokens for r in records) == sum(s[2] + s[3] for s in trace.steps)
    assert wrapper.num_in_flight == 0
    engine.shutdown()
