"""Prometheus metrics of a serving engine: vLLM's metric set (vLLM's v1 engine,
``vllm/v1/metrics/loggers.py``), named as vLLM names them with the ``ember:``
prefix instead of ``vllm:``, with vLLM's label names (``model_name`` and
``engine``, the engine core's index, always ``"0"`` here; ``finished_reason`` on
``request_success``) and buckets, so that a vLLM
dashboard works after replacing ``vllm:`` by ``ember:`` (see
``examples/grafana/ember-dashboard.json``).

What is counted when:

* after every engine step (:meth:`PrometheusMetrics.record`): the scheduler
  gauges (``num_requests_running``, ``num_requests_waiting``,
  ``kv_cache_usage_perc`` and its older name ``gpu_cache_usage_perc``), the
  counters ``prompt_tokens`` (each of a request's n completions counts its
  prompt, as in vLLM), ``generation_tokens``, ``num_preemptions``,
  ``prefix_cache_queries`` / ``prefix_cache_hits`` (and their older
  ``gpu_``-prefixed names), and ``iteration_tokens_total``: the tokens the step
  computed (prompt chunks and decode tokens of every request);
* once per request when it finishes, whatever its ``n``
  (:meth:`PrometheusMetrics.record_request`): ``request_success``,
  ``e2e_request_latency_seconds``, ``time_to_first_token_seconds``,
  ``request_queue_time_seconds`` (arrival to first scheduled),
  ``request_prefill_time_seconds`` (first scheduled to first token),
  ``request_decode_time_seconds`` (first token to finish),
  ``request_inference_time_seconds`` (first scheduled to finish),
  ``time_per_output_token_seconds`` and ``request_time_per_output_token_seconds``
  (decode time over the longest completion's tokens after its first),
  ``time_per_prefill_token_request_seconds``, ``request_prompt_tokens``,
  ``request_generation_tokens`` (summed over the n completions),
  ``request_max_num_generation_tokens`` (the longest completion),
  ``request_params_n`` and ``request_params_max_tokens``;
* per generated token: ``inter_token_latency_seconds``;
* once at start-up: ``cache_config_info``, an info gauge (value 1) whose labels
  are the KV cache settings (``block_size``, ``cache_dtype``,
  ``enable_prefix_caching``, ..., and ``num_gpu_blocks`` once known).

vLLM's LoRA (``lora_requests_info``) and speculative-decoding metrics are not
exported: Ember serves neither LoRA adapters nor draft tokens.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ember.core.stats import SchedulerStats
from ember.outputs import RequestOutput

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0)
_PREFILL_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                            240.0, 480.0, 960.0, 1920.0, 7680.0)
_ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
# The ``engine`` label: vLLM numbers its engine cores (data parallelism); Ember runs one.
ENGINE_INDEX = "0"


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10

_COMPILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrometheusMetrics:
    """Gauges, counters and histograms of one served model (see the module docstring).

    Args:
        model_name: the ``model_name`` label (the served model name).
        max_model_len: the context window in tokens (the token-count buckets end there).
        cache_config_info: ``cache_config_info``'s labels (setting -> value); None: not exported.
        registry: where to register (a private one by default, so several
            engines in one process do not collide).
    """

    def __init__(self, model_name: str, max_model_len: int = 2048, cache_config_info: dict[str, Any] | None = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, labels, values = self.registry, ["model_name", "engine"], (model_name, ENGINE_INDEX)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(*values)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        tokens = buckets_1_2_5(max_model_len)
        self.num_requests_running = gauge("ember:num_requests_running", "Requests in the running batch.")
        self.num_requests_waiting = gauge("ember:num_requests_waiting", "Requests waiting (incl. preempted).")
        self.kv_cache_usage = gauge("ember:kv_cache_usage_perc", "KV-cache usage: 1 means 100 percent.")
        self.gpu_cache_usage = gauge("ember:gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).")
        self.prompt_tokens = counter("ember:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("ember:generation_tokens", "Generated tokens.")
        self.preemptions = counter("ember:num_preemptions", "Preemptions (recompute and swap).")
        self.prefix_cache_queries = counter("ember:prefix_cache_queries", "Prefix-cache lookups, in tokens.")
        self.prefix_cache_hits = counter("ember:prefix_cache_hits", "Prefix-cache hits, in tokens.")
        self.gpu_prefix_cache_queries = counter("ember:gpu_prefix_cache_queries",
                                                "Prefix-cache lookups, in tokens (vLLM's older name).")
        self.gpu_prefix_cache_hits = counter("ember:gpu_prefix_cache_hits",
                                             "Prefix-cache hits, in tokens (vLLM's older name).")
        self.request_success = Counter("ember:request_success", "Finished requests by finish reason.",
                                       ["model_name", "engine", "finished_reason"], registry=r)
        self.iteration_tokens = histogram("ember:iteration_tokens_total", "Tokens computed per engine step.",
                                          _ITERATION_TOKENS_BUCKETS)
        self.request_prompt_tokens = histogram("ember:request_prompt_tokens", "Prompt tokens per request.", tokens)
        self.request_generation_tokens = histogram("ember:request_generation_tokens",
                                                   "Generated tokens per request (all n completions).", tokens)
        self.request_max_num_generation_tokens = histogram(
            "ember:request_max_num_generation_tokens", "Tokens of a request's longest completion.", tokens)
        self.request_params_n = histogram("ember:request_params_n", "The n request parameter.", _N_BUCKETS)
        self.request_params_max_tokens = histogram("ember:request_params_max_tokens",
                                                   "The max_tokens request parameter (the context's room if unset).",
                                                   tokens)
        self.ttft = histogram("ember:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.tpot = histogram("ember:time_per_output_token_seconds", "Mean time per output token after the first.",
                              _TPOT_BUCKETS)
        self.request_tpot = histogram("ember:request_time_per_output_token_seconds",
                                      "Mean time per output token after the first, per request.", _TPOT_BUCKETS)
        self.itl = histogram("ember:inter_token_latency_seconds", "Time between consecutive tokens of a request.",
                             _TPOT_BUCKETS)
        self.prefill_time_per_token = histogram("ember:time_per_prefill_token_request_seconds",
                                                "Prefill time over prompt tokens, per request.",
                                                _PREFILL_TOKEN_BUCKETS)
        self.e2e = histogram("ember:e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("ember:request_queue_time_seconds", "Arrival to first scheduled.",
                                    _REQUEST_LATENCY_BUCKETS)
        self.structured_output_requests = counter(
            "ember:structured_output_requests", "Sequences with a grammar constraint (JSON schema, regex, ...).")
        self.grammar_compile_time = histogram("ember:grammar_compile_time_seconds",
                                              "Time compiling one grammar (cache misses only).", _COMPILE_BUCKETS)
        self.spec_num_drafts = counter("ember:spec_decode_num_drafts",
                                       "Request-steps that verified draft tokens (speculative decoding).")
        self.spec_num_draft_tokens = counter("ember:spec_decode_num_draft_tokens", "Draft tokens verified.")
        self.spec_num_accepted_tokens = counter("ember:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_accepted_per_pos = Counter("ember:spec_decode_num_accepted_tokens_per_pos",
                                             "Draft tokens accepted at each draft position (0-based).",
                                             [*labels, "position"], registry=r)
        self.spec_acceptance_rate = gauge("ember:spec_decode_acceptance_rate",
                                          "Accepted / verified draft tokens since start-up, 0..1.")
        self.spec_mean_accepted_length = gauge("ember:spec_decode_mean_accepted_length",
                                               "Tokens per request-step with drafts (accepted + 1) since start-up.")
        self.inference_time = histogram("ember:request_inference_time_seconds", "First scheduled to finish.",
                                        _REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("ember:request_prefill_time_seconds", "First scheduled to first token.",
                                      _REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("ember:request_decode_time_seconds", "First token to finish.",
                                     _REQUEST_LATENCY_BUCKETS)
        self._cache_info_labels = None if cache_config_info is None else {k: str(v) for k, v in
                                                                            cache_config_info.items()}
        self._cache_info: Gauge | None = None
        if self._cache_info_labels is not None:
            self._cache_info_labels["engine"] = ENGINE_INDEX
            self._cache_info = Gauge("ember:cache_config_info", "The KV cache's settings (labels); value 1.",
                                     [*self._cache_info_labels, "num_gpu_blocks"], registry=r)
            self._cache_info.labels(**self._cache_info_labels, num_gpu_blocks="").set(1)
        self._model_name = model_name
        self._last = (SchedulerStats(), 0, 0)

    def set_num_gpu_blocks(self, num_gpu_blocks: int) -> None:
        """Fill ``cache_config_info``'s ``num_gpu_blocks`` label once the KV cache is sized."""
        if self._cache_info is None or self._cache_info_labels is None:
            return
        self._cache_info.clear()
        self._cache_info.labels(**self._cache_info_labels, num_gpu_blocks=str(num_gpu_blocks)).set(1)

    def record(self, stats: SchedulerStats, prompt_tokens_total: int, generation_tokens_total: int,
               outputs: list[RequestOutput] | None = None, num_batched_tokens: int = 0) -> None:
        """After one engine step: ``stats`` and the token totals are cumulative
        since start-up; ``num_batched_tokens``: the tokens the step computed
        (0: no step ran). ``outputs`` are not read (requests are counted by
        :meth:`record_request`)."""
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        self.gpu_cache_usage.set(stats.kv_cache_usage)
        last, last_prompt, last_gen = self._last
        self.prompt_tokens.inc(prompt_tokens_total - last_prompt)
        self.generation_tokens.inc(generation_tokens_total - last_gen)
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        queries = max(0, stats.prefix_cache.queries - last.prefix_cache.queries)
        hits = max(0, stats.prefix_cache.hits - last.prefix_cache.hits)
        for counter, value in ((self.prefix_cache_queries, queries), (self.gpu_prefix_cache_queries, queries),
                               (self.prefix_cache_hits, hits), (self.gpu_prefix_cache_hits, hits)):
            counter.inc(value)
        self.structured_output_requests.inc(
            max(0, stats.num_structured_output_requests - last.num_structured_output_requests))
        if stats is not last:  # the compile times are the step's, not cumulative
            for seconds in stats.grammar_compile_times:
                self.grammar_compile_time.observe(seconds)
        if stats.spec_num_drafts != last.spec_num_drafts:
            self._record_spec_decode(stats, last)
        self._last = (stats, prompt_tokens_total, generation_tokens_total)
        if num_batched_tokens > 0:
            self.iteration_tokens.observe(num_batched_tokens)

    def _record_spec_decode(self, stats: SchedulerStats, last: SchedulerStats) -> None:
        self.spec_num_drafts.inc(max(0, stats.spec_num_drafts - last.spec_num_drafts))
        self.spec_num_draft_tokens.inc(max(0, stats.spec_num_draft_tokens - last.spec_num_draft_tokens))
        self.spec_num_accepted_tokens.inc(max(0, stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens))
        before = last.spec_accepted_per_pos
        for j, n in enumerate(stats.spec_accepted_per_pos):
            delta = n - (before[j] if j < len(before) else 0)
            if delta > 0:
                self.spec_accepted_per_pos.labels(self._model_name, ENGINE_INDEX, str(j)).inc(delta)
        self.spec_acceptance_rate.set(stats.spec_acceptance_rate)
        self.spec_mean_accepted_length.set(stats.spec_mean_accepted_length)

    def observe_inter_token_latency(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def record_request(self, out: RequestOutput, first_scheduled: float | None, num_prompt_tokens: int, n: int,
                       max_tokens: int) -> None:
        """Count one finished user request (all its n completions), once.

        Args:
            out: its final output (``metrics``: ``arrival_time``,
                ``first_token_time``, ``finished_time``, token counts; seconds on
                the ``time.monotonic`` clock).
            first_scheduled: when its first completion was first scheduled (None: never).
            num_prompt_tokens, n, max_tokens: its prompt length and parameters
                (``max_tokens``: the context's room when the request set none).
        """
        m = out.metrics
        reason = next((c.finish_reason for c in out.outputs if c.finish_reason), None) or "abort"
        self.request_success.labels(self._model_name, ENGINE_INDEX, reason).inc()
        self.request_prompt_tokens.observe(num_prompt_tokens)
        self.request_generation_tokens.observe(m.get("num_generation_tokens", 0))
        longest = m.get("max_completion_tokens", 0)
        self.request_max_num_generation_tokens.observe(longest)
        self.request_params_n.observe(n)
        self.request_params_max_tokens.observe(max_tokens)
        arrival, first_token, finished = m.get("arrival_time"), m.get("first_token_time"), m.get("finished_time")
        if arrival is None or finished is None:
            return
        self.e2e.observe(finished - arrival)
        if first_scheduled is not None:
            self.queue_time.observe(first_scheduled - arrival)
            self.inference_time.observe(finished - first_scheduled)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        self.decode_time.observe(finished - first_token)
        if first_scheduled is not None:
            self.prefill_time.observe(first_token - first_scheduled)
            if num_prompt_tokens:
                self.prefill_time_per_token.observe((first_token - first_scheduled) / num_prompt_tokens)
        if longest > 1:  # n > 1: the longest completion's tokens arrived one per step
            tpot = (finished - first_token) / (longest - 1)
            self.tpot.observe(tpot)
            self.request_tpot.observe(tpot)

    def render(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)
