"""Per-step records for benchmarks and profiling: the engine core calls its
step observers (``EngineCore.add_step_observer``) with one :class:`StepRecord`
per collected step, and does no timing at all when none is registered."""

from __future__ import annotations

from dataclasses import dataclass

from ember.core.sched_output import SchedulerOutput


@dataclass(slots=True)
class StepRecord:
    """One collected engine step.

    Attributes:
        sched: the step's schedule.
        collect_time: when its sampled ids were read (``time.perf_counter`` s).
        schedule_s: host time scheduling it, plus scheduling the step launched
            ahead of its collection (s).
        execute_s: time launching it (or the step ahead) and waiting for its
            sampled ids (s): includes the device time the host waited on.
        update_s: host time applying its results (s).
        launched_ahead: it was launched before the previous step's tokens were
            read (asynchronous scheduling).
        mask_s: host time filling grammar token bitmasks during this call
            (s; 0 without constrained requests): the masks of this step, or,
            for a step scheduled ahead, of that one. It overlaps the device's
            forward pass and is part of ``execute_s`` / ``update_s``.
    """

    sched: SchedulerOutput
    collect_time: float
    schedule_s: float
    execute_s: float
    update_s: float
    launched_ahead: bool
    mask_s: float = 0.0


@dataclass
class StepTimes:
    """A step observer: cumulative wall time of engine steps (seconds) and
    their count.

    ``schedule_s`` + ``update_s`` + the runner's ``prepare_s`` is the host work
    of a step that the device may wait on; ``execute_s`` includes the device
    work and the wait for the sampled ids.
    """

    num_steps: int = 0
    num_steps_ahead: int = 0  # launched before the previous step's tokens were read
    schedule_s: float = 0.0
    execute_s: float = 0.0
    update_s: float = 0.0
    mask_s: float = 0.0  # grammar token bitmasks (see StepRecord.mask_s)

    def __call__(self, r: StepRecord) -> None:
        self.num_steps += 1
        self.num_steps_ahead += r.launched_ahead
        self.schedule_s += r.schedule_s
        self.execute_s += r.execute_s
        self.update_s += r.update_s
        self.mask_s += r.mask_s


class StepTrace:
    """A step observer: one tuple per step, ``(collect time (perf_counter s),
    requests, decode tokens (requests computing one token), other (prefill)
    tokens, preemptions, grammar mask time (s, see StepRecord.mask_s))``, in
    :attr:`steps`."""

    FIELDS = ("collect_s", "num_reqs", "num_decode", "num_prefill_tokens", "num_preemptions", "mask_s")

    def __init__(self) -> None:
        self.steps: list[tuple[float, int, int, int, int, float]] = []

    def __call__(self, r: StepRecord) -> None:
        n = r.sched.num_scheduled_tokens
        num_decode = sum(1 for v in n.values() if v == 1)
        self.steps.append((r.collect_time, len(n), num_decode, r.sched.total_num_scheduled_tokens - num_decode,
                           r.sched.num_preemptions, r.mask_s))
