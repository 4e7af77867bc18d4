"""Figures of ``ember bench serve``: per-request records, percentiles, Poisson
arrival times, the aggregate metrics (vLLM ``benchmark_serving`` names) and the
stdout table. Pure Python, no I/O."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, interpolating linearly
    between closest ranks (Hyndman & Fan type 7, numpy's default method).

    Raises:
        ValueError: ``values`` empty or ``q`` outside [0, 100].
    """
    if not values:
        raise ValueError("values must not be empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_ms(name: str, values_s: Sequence[float]) -> dict[str, float | None]:
    """``mean_/median_/std_/p90_/p99_{name}_ms`` of durations given in seconds
    (population std); all None when there are no values."""
    keys = ("mean", "median", "std", "p90", "p99")
    if not values_s:
        return {f"{k}_{name}_ms": None for k in keys}
    ms = [v * 1e3 for v in values_s]
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
    stats = (mean, percentile(ms, 50), std, percentile(ms, 90), percentile(ms, 99))
    return {f"{k}_{name}_ms": v for k, v in zip(keys, stats)}


def poisson_arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests of a Poisson process.

    Inter-arrival gaps are exponential with mean ``1 / rate``; the first request
    goes at 0. ``rate = inf`` puts every request at 0.

    Raises:
        ValueError: ``n < 0`` or ``rate <= 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not rate > 0:
        raise ValueError(f"request_rate must be > 0 (or inf), got {rate}")
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


@dataclass(slots=True)
class RequestResult:
    """What one request measured; times in seconds from when it was sent."""

    success: bool = False
    error: str = ""
    prompt_len: int | None = None
    output_tokens: int = 0
    ttft: float | None = None
    e2el: float | None = None
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if not self.success or self.output_tokens < 2:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)


def compute_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Aggregate figures (vLLM's names); throughputs count completed requests only.

    Args:
        results: one per request.
        duration: wall time of the run in seconds.
    """
    ok = [r for r in results if r.success]
    num_in = sum(r.prompt_len or 0 for r in ok)
    num_out = sum(r.output_tokens for r in ok)
    metrics: dict[str, Any] = {
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": num_in, "total_output_tokens": num_out,
        "request_throughput": len(ok) / duration, "input_throughput": num_in / duration,
        "output_throughput": num_out / duration, "total_token_throughput": (num_in + num_out) / duration,
    }
    per_metric = {
        "ttft": [r.ttft for r in ok], "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [g for r in ok for g in r.itl], "e2el": [r.e2el for r in ok],
    }
    for name in METRICS:
        metrics.update(summarize_ms(name, per_metric[name]))
    return metrics


def format_report(result: dict[str, Any]) -> str:
    """The stdout table: counts and throughputs, then each latency metric, then errors."""
    cfg = result["config"]
    lines = [f"{'Serving benchmark':=^56}", f"{'model':<36}{cfg['model']}",
             f"{'endpoint':<36}{cfg['base_url']}{cfg['endpoint']}",
             f"{'request rate (req/s)':<36}{cfg['request_rate']}",
             f"{'max concurrency':<36}{cfg['max_concurrency']}"]
    rows = [("completed requests", "completed"), ("failed requests", "failed"), ("duration (s)", "duration"),
            ("total input tokens", "total_input_tokens"), ("total output tokens", "total_output_tokens"),
            ("request throughput (req/s)", "request_throughput"), ("input throughput (tok/s)", "input_throughput"),
            ("output throughput (tok/s)", "output_throughput"),
            ("total token throughput (tok/s)", "total_token_throughput")]
    lines += [f"{label:<36}{_fmt(result[key])}" for label, key in rows]
    for name, title in zip(METRICS, ("Time to first token", "Time per output token", "Inter-token latency",
                                      "End-to-end latency")):
        lines.append(f"{' ' + title + ' ':-^56}")
        lines += [f"{stat + ' ' + name.upper() + ' (ms)':<36}{_fmt(result[f'{stat}_{name}_ms'])}"
                  for stat in ("mean", "median", "p90", "p99")]
    errors: dict[str, int] = {}
    for r in result["requests"]:
        if not r["success"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    if errors:
        lines.append(f"{' Errors ':-^56}")
        lines += [f"{n} x {msg[:300]}" for msg, n in sorted(errors.items(), key=lambda kv: -kv[1])[:5]]
    lines.append("=" * 56)
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)
