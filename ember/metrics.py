"""Prometheus metrics of a serving engine, named as vLLM names them (with the
``ember:`` prefix instead of ``vllm:``) so existing dashboards translate.

The front end calls :meth:`PrometheusMetrics.record` after every step with
the scheduler's cumulative counters and the step's outputs, and observes
inter-token latencies and queue times as they happen; ``/metrics`` renders the
registry with ``prometheus_client``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.core.stats import SchedulerStats
from ember.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                    40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                 0.75, 1.0, 2.5)


class PrometheusMetrics:
    """Gauges, counters and histograms of one served model.

    Args:
        model_name: the ``model_name`` label (the served model name).
        registry: where to register (a private one by default, so several
            engines in one process do not collide).
    """

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_requests_running = gauge("ember:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("ember:num_requests_waiting", "Requests waiting (incl. preempted).")
        self.kv_cache_usage = gauge("ember:kv_cache_usage_perc", "Fraction of KV-cache blocks in use, 0..1.")
        self.prompt_tokens = counter("ember:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("ember:generation_tokens", "Generated tokens.")
        self.preemptions = counter("ember:num_preemptions", "Preemptions (recompute and swap).")
        self.prefix_cache_queries = counter("ember:prefix_cache_queries", "Prefix-cache lookups, in tokens.")
        self.prefix_cache_hits = counter("ember:prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.request_success = Counter("ember:request_success", "Finished requests by finish reason.",
                                       ["model_name", "finished_reason"], registry=r)
        self.ttft = histogram("ember:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("ember:time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TPOT_BUCKETS)
        self.e2e = histogram("ember:e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.itl = histogram("ember:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             _TPOT_BUCKETS)
        self.queue_time = histogram("ember:request_queue_time_seconds", "Arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.spec_num_drafts = counter("ember:spec_decode_num_drafts",
                                       "Request-steps that verified draft tokens (speculative decoding).")
        self.spec_num_draft_tokens = counter("ember:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_num_accepted_tokens = counter("ember:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = Counter("ember:spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted at each draft position (0-based).",
                                             ["model_name", "position"], registry=r)
        self.spec_acceptance_rate = gauge("ember:spec_decode_acceptance_rate",
                                          "Accepted / verified draft tokens since start-up, 0..1.")
        self.spec_mean_accepted_length = gauge("ember:spec_decode_mean_accepted_length",
                                               "Tokens per request-step with drafts (accepted + 1) since start-up.")
        self._model_name = model_name
        self._last = (SchedulerStats(), 0, 0)

    def record(self, stats: SchedulerStats, prompt_tokens_total: int, generation_tokens_total: int,
               outputs: list[RequestOutput]) -> None:
        """After one engine step: ``stats`` and the token totals are cumulative
        since start-up; ``outputs`` are the step's RequestOutputs."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        last, last_prompt, last_gen = self._last
        self.prompt_tokens.inc(prompt_tokens_total - last_prompt)
        self.generation_tokens.inc(generation_tokens_total - last_gen)
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        self.prefix_cache_queries.inc(max(0, stats.prefix_cache.queries - last.prefix_cache.queries))
        self.prefix_cache_hits.inc(max(0, stats.prefix_cache.hits - last.prefix_cache.hits))
        if stats.spec_num_drafts != last.spec_num_drafts:
            self._record_spec_decode(stats, last)
        self._last = (stats, prompt_tokens_total, generation_tokens_total)
        for out in outputs:
            if out.finished:
                self._record_finished(out)

    def _record_spec_decode(self, stats: SchedulerStats, last: SchedulerStats) -> None:
        self.spec_num_drafts.inc(max(0, stats.spec_num_drafts - last.spec_num_drafts))
        self.spec_num_draft_tokens.inc(max(0, stats.spec_num_draft_tokens - last.spec_num_draft_tokens))
        self.spec_num_accepted_tokens.inc(max(0, stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens))
        before = last.spec_accepted_per_pos
        for j, n in enumerate(stats.spec_accepted_per_pos):
            delta = n - (before[j] if j < len(before) else 0)
            if delta > 0:
                self.spec_accepted_per_pos.labels(self._model_name, str(j)).inc(delta)
        self.spec_acceptance_rate.set(stats.spec_acceptance_rate)
        self.spec_mean_accepted_length.set(stats.spec_mean_accepted_length)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def observe_queue_time(self, seconds: float) -> None:
        self.queue_time.observe(seconds)

    def _record_finished(self, out: RequestOutput) -> None:
        m = out.metrics
        reason = out.outputs[0].finish_reason or "abort"
        self.request_success.labels(self._model_name, reason).inc()
        if "finished_time" in m:
            self.e2e.observe(m["finished_time"] - m["arrival_time"])
        if "first_token_time" in m:
            self.ttft.observe(m["first_token_time"] - m["arrival_time"])
            # n > 1: the longest completion's tokens arrived one per step.
            n = m.get("max_completion_tokens", m.get("num_generation_tokens", 0))
            if n > 1 and "finished_time" in m:
                self.tpot.observe((m["finished_time"] - m["first_token_time"]) / (n - 1))

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
