"""Counters the engine core keeps for metrics (the Prometheus endpoint and
``ember bench`` read them). Plain dataclasses, cumulative since start-up."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups, counted in tokens, once per request admission
    (a request recomputed after preemption counts again).

    Attributes:
        requests: admissions that looked the cache up.
        queries: tokens looked up (the request's known tokens at admission).
        hits: of those, tokens found cached (not recomputed).
    """

    requests: int = 0
    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        """hits / queries, in [0, 1] (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class SchedulerStats:
    """A snapshot of the scheduler and KV cache (see ``EngineCore.get_stats``).

    Attributes:
        num_running / num_waiting: requests now running / waiting (the waiting
            count includes preempted and swapped ones).
        kv_cache_usage: fraction of device KV blocks held by requests, [0, 1].
        prefix_cache: cumulative prefix-cache lookups.
        num_evicted_blocks: cached blocks whose hash was dropped for reuse.
        num_preemptions: all preemptions (recompute + swap).
        num_swap_outs / num_swap_ins: preemptions by swap, and resumptions.
        num_blocks_swapped_out / num_blocks_swapped_in: blocks copied to / from
            host memory (a swap-in skips blocks found in the prefix cache).
        num_priority_promotions: requests the fairness guard promoted.
        num_structured_output_requests: sequences with a grammar constraint
            (cumulative; ``n > 1`` counts each).
        num_grammar_cache_hits: of those, ones whose grammar was compiled
            already (or was compiling).
        grammar_compile_times: grammar compile times (s) since the previous
            step's snapshot (not cumulative).
        spec_num_drafts: request-steps that verified draft tokens.
        spec_num_draft_tokens / spec_num_accepted_tokens: draft tokens
            verified / accepted.
        spec_accepted_per_pos: per draft position j (0-based), drafts
            accepted there (position j is reached only when 0..j-1 were).
        spec_drafts_per_pos: per draft position j, drafts verified there.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    num_evicted_blocks: int = 0
    num_preemptions: int = 0
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_priority_promotions: int = 0
    num_structured_output_requests: int = 0
    num_grammar_cache_hits: int = 0
    grammar_compile_times: list[float] = field(default_factory=list)
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: list[int] = field(default_factory=list)
    spec_drafts_per_pos: list[int] = field(default_factory=list)

    @property
    def spec_acceptance_rate(self) -> float:
        """Accepted / verified draft tokens, in [0, 1] (0 before any draft)."""
        return self.spec_num_accepted_tokens / self.spec_num_draft_tokens if self.spec_num_draft_tokens else 0.0

    @property
    def spec_mean_accepted_length(self) -> float:
        """Tokens emitted per request-step with drafts: accepted drafts + 1
        (1 before any draft)."""
        return 1 + self.spec_num_accepted_tokens / self.spec_num_drafts if self.spec_num_drafts else 1.0
