"""Discrete-event simulation of serving under a closed-loop client, on CPU.

It drives Ember's real :class:`~ember.core.scheduler.Scheduler` (and KV cache
manager) through the same launch/collect order as
:class:`~ember.engine.core.EngineCore` (asynchronous scheduling: the next step
is planned and queued on the device before the previous one is collected), with
the device replaced by a step-time model, and clients that each send their next
request as soon as the last one finished (``ember bench serve
--max-concurrency C``). It predicts TTFT, TPOT and ITL for a token budget and
scheduler settings in seconds of CPU, so that GPU time is spent only on
confirming the settings that the model says are worth it.

Step-time model (ms), fitted to the H100 serving figures (BENCHMARKS.md: batch-4
decode step 5.99 ms; a lone 1000-token prefill 24-25 ms, GEMMs 19.2 ms of it):
``decode_ms + prefill_ms_per_token * prefill_tokens``; the host issues a step in
``launch_ms + launch_ms_per_token * prefill_tokens`` (piecewise CUDA graphs:
6-10 ms for a 1000-token step) and the device cannot finish a step before the
host has issued it. ``api_in_ms`` is HTTP + tokenization before the request
reaches the core, ``api_out_ms`` the way back to the client.

Usage: python benchmarks/sim_serving.py --budgets 2048 1100 --concurrency 4
       (H200 fit: --decode-ms 4.4 --prefill-ms-per-token 0.021 --api-in-ms 8.5 --api-out-ms 3.2)
"""

from __future__ import annotations

import argparse
import heapq
import statistics
from dataclasses import dataclass, field
from typing import Any

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.scheduler import Scheduler
from ember.core.sched_output import ModelRunnerOutput, SchedulerOutput
from ember.request import Request
from ember.sampling_params import SamplingParams


@dataclass
class StepModel:
    """Device and host costs of a step, in ms (see the module docstring)."""

    decode_ms: float = 5.9
    prefill_ms_per_token: float = 0.0196
    launch_ms: float = 0.3
    launch_ms_per_token: float = 0.006
    host_ms: float = 0.4  # collect + update + send, per step
    api_in_ms: float = 8.0
    api_out_ms: float = 3.0

    def device_ms(self, sched: SchedulerOutput) -> float:
        return self.decode_ms + self.prefill_ms_per_token * _prefill_tokens(sched)

    def issue_ms(self, sched: SchedulerOutput) -> float:
        return self.launch_ms + self.launch_ms_per_token * _prefill_tokens(sched)


def _prefill_tokens(sched: SchedulerOutput) -> int:
    """Tokens of the step's requests that compute more than one (prompt chunks)."""
    return sum(n for n in sched.num_scheduled_tokens.values() if n > 1)


@dataclass
class RequestTimes:
    sent: float
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)


def simulate(budget: int, concurrency: int, num_requests: int, input_len: int, output_len: int,
             model: StepModel, async_scheduling: bool = True, warmup: int = 16,
             max_num_seqs: int = 256) -> dict[str, Any]:
    """Run the closed loop; returns median/P99 TTFT, median TPOT and P99 ITL (ms)
    over the requests after the first ``warmup``, and every such request's TTFT
    (``ttft_ms``, in sending order)."""
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=8192,
                             async_scheduling=async_scheduling)
    now = 0.0
    scheduler = Scheduler(config, KVCacheManager(100_000, 16, False), clock=lambda: now)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
    arrivals: list[tuple[float, int]] = []  # (time the core sees it, index)
    times: dict[str, RequestTimes] = {}
    sent = 0

    def send(t: float) -> None:
        nonlocal sent
        if sent < num_requests:
            times[str(sent)] = RequestTimes(t)
            heapq.heappush(arrivals, (t + model.api_in_ms, sent))
            sent += 1

    for _ in range(concurrency):
        send(0.0)
    device_free = 0.0
    # A launched step: its schedule, when the device finishes it, and its fake
    # sampled tokens (one for each request whose scheduled tokens reach the end of
    # its known tokens, decided when it is scheduled, as the runner does).
    in_flight: tuple[SchedulerOutput, float, dict[str, list[int]]] | None = None

    def launch(sched: SchedulerOutput, t: float) -> tuple[SchedulerOutput, float, dict[str, list[int]]]:
        nonlocal device_free
        end = max(max(device_free, t) + model.device_ms(sched), t + model.issue_ms(sched))
        device_free = end
        sampled = {rid: [7] for rid in sched.num_scheduled_tokens
                   if (r := scheduler.requests.get(rid)) is not None and r.num_computed_tokens >= r.num_tokens}
        return sched, end, sampled

    while arrivals or scheduler.has_unfinished_requests() or in_flight:
        while arrivals and arrivals[0][0] <= now:
            _, i = heapq.heappop(arrivals)
            scheduler.add_request(Request(str(i), [1] * input_len, params, 8192, arrival_time=now))
        if in_flight is None:
            if not scheduler.has_unfinished_requests():
                now = arrivals[0][0]
                continue
            pending = launch(scheduler.schedule(), now)
        else:
            pending = in_flight
        in_flight = None
        # The engine core's order: the next step is scheduled and launched before
        # this one's tokens are read, unless a penalty needs them.
        if async_scheduling and scheduler.has_unfinished_requests() and scheduler.can_schedule_ahead():
            ahead = scheduler.schedule()
            if ahead.is_empty and not ahead.blocks_to_swap_out:
                scheduler.unschedule_empty(ahead)
            else:
                in_flight = launch(ahead, now)
        now = max(now, pending[1]) + model.host_ms
        sampled = pending[2]
        for out in scheduler.update_from_output(pending[0], ModelRunnerOutput(sampled)):
            rt = times[out.request_id]
            seen = now + model.api_out_ms
            rt.token_times.append(seen)
            if rt.first_token is None:
                rt.first_token = seen
            if out.finish_reason is not None:
                send(seen)
    done = [times[str(i)] for i in range(warmup, num_requests)]
    ttft = [r.first_token - r.sent for r in done]
    tpot = [(r.token_times[-1] - r.first_token) / (len(r.token_times) - 1) for r in done]
    itl = sorted(b - a for r in done for a, b in zip(r.token_times, r.token_times[1:]))
    return {"median_ttft_ms": statistics.median(ttft), "p99_ttft_ms": sorted(ttft)[int(0.99 * len(ttft))],
            "median_tpot_ms": statistics.median(tpot), "p99_itl_ms": itl[int(0.99 * len(itl))],
            "ttft_ms": ttft}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[2048, 1100, 1024, 512])
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--num-requests", type=int, default=216)
    p.add_argument("--input-len", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=200)
    p.add_argument("--no-async-scheduling", action="store_true")
    for name, value in vars(StepModel()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=value)
    args = p.parse_args()
    model = StepModel(**{k: getattr(args, k) for k in vars(StepModel())})
    print(f"{'budget':>7} {'TTFT med':>9} {'TTFT p99':>9} {'TPOT med':>9} {'ITL p99':>8}  (ms)")
    for budget in args.budgets:
        r = simulate(budget, args.concurrency, args.num_requests, args.input_len, args.output_len, model,
                     not args.no_async_scheduling)
        print(f"{budget:>7} {r['median_ttft_ms']:>9.1f} {r['p99_ttft_ms']:>9.1f} {r['median_tpot_ms']:>9.2f} "
              f"{r['p99_itl_ms']:>8.1f}")


if __name__ == "__main__":
    main()
