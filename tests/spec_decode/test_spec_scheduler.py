"""Scheduler side of speculative decoding: drafts scheduled after the last
token, rejected ones rolled back by ``num_computed_tokens`` alone, and the
prefix cache never hashes a block holding a rejected draft."""

from __future__ import annotations

from ember.config import SchedulerConfig
from ember.core.kv_cache_manager import KVCacheManager
from ember.core.kv_cache_utils import hash_block_tokens, block_extra_keys
from ember.core.sched_output import ModelRunnerOutput
from ember.core.scheduler import Scheduler
from ember.request import Request
from ember.sampling_params import SamplingParams
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.proposer import DraftScheduler

BLOCK = 4


def _setup(prompt: list[int], max_tokens: int = 16) -> tuple[Scheduler, Request]:
    cfg = SchedulerConfig(max_num_batched_tokens=32, max_num_seqs=4, max_model_len=64)
    sched = Scheduler(cfg, KVCacheManager(20, BLOCK, enable_caching=True))
    r = Request("a", prompt, SamplingParams(max_tokens=max_tokens), max_model_len=64)
    sched.add_request(r)
    return sched, r


def test_rejected_drafts_roll_back_and_are_never_hashed():
    sched, r = _setup([5, 6, 7, 8, 9, 10])  # 6 prompt tokens
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({"a": [11]}))  # 7 tokens, 6 computed
    r.spec_token_ids = [90, 91, 92]  # positions 7..9: the second block fills up with drafts
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {"a": [90, 91, 92]} and out.num_scheduled_tokens == {"a": 4}
    assert r.num_computed_tokens == 10
    # Only the first draft is accepted (90), then the target's own token 12.
    sched.update_from_output(out, ModelRunnerOutput({"a": [90, 12]}))
    assert r.all_token_ids == [5, 6, 7, 8, 9, 10, 11, 90, 12]
    assert r.num_computed_tokens == 8  # 91, 92 rejected: positions 8, 9 are computed again
    kv = sched.kv_cache_manager
    pool = kv.block_pool
    # Block 1 (positions 4..7) holds known tokens only once 90 is known; the
    # draft-filled version of positions 8.. is never registered.
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1}
    h0 = hash_block_tokens(None, [5, 6, 7, 8], block_extra_keys(r, 0))
    h1 = hash_block_tokens(h0, [9, 10, 11, 90], block_extra_keys(r, 1))
    assert set(pool.cached_block_hash_to_block) == {h0, h1}
    assert r.block_hashes == [h0, h1]
    bad = hash_block_tokens(h1, [91, 92, 0, 0], block_extra_keys(r, 2))
    assert bad not in pool.cached_block_hash_to_block
    assert sched.counters.spec_num_draft_tokens == 3 and sched.counters.spec_num_accepted_tokens == 1
    assert sched.counters.spec_accepted_per_pos == [1, 0, 0]


def test_drafts_capped_by_max_tokens_and_stop_inside_run():
    sched, r = _setup([1, 2, 3], max_tokens=3)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({"a": [4]}))
    r.spec_token_ids = [7, 7, 7, 7]
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens == {"a": [7]}  # 2 tokens left: 1 draft + 1
    outs = sched.update_from_output(out, ModelRunnerOutput({"a": [7, 8]}))
    assert outs[0].new_token_ids == [7, 8] and outs[0].finish_reason == "length"
    # A stop token in the middle of an accepted run truncates it.
    sched, r = _setup([1, 2, 3])
    r.sampling_params.stop_token_ids = [50]
    r.stop_token_ids = {50}
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({"a": [4]}))
    r.spec_token_ids = [50, 6, 7]
    out = sched.schedule()
    outs = sched.update_from_output(out, ModelRunnerOutput({"a": [50, 6, 7, 8]}))
    assert outs[0].new_token_ids == [50] and outs[0].finish_reason == "stop"
    assert not sched.requests


def test_drafter_respects_batch_size_threshold_and_decode_state():
    cfg = SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=2,
                            disable_by_batch_size=1)
    drafter = DraftScheduler(cfg)
    a = Request("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=8), max_model_len=64)
    b = Request("b", [4, 5, 4], SamplingParams(max_tokens=8), max_model_len=64)
    a.num_computed_tokens, b.num_computed_tokens = 4, 2
    drafter.propose([a, b])
    assert not drafter.active and a.spec_token_ids == [] and b.spec_token_ids == []
    drafter.propose([a])
    assert drafter.active and a.spec_token_ids == [3, 1]
    b.num_computed_tokens = 1  # still prefilling: no drafts
    drafter.propose([b])
    assert b.spec_token_ids == []
    # Turning off clears drafts left unscheduled.
    drafter.propose([a, b])
    assert not drafter.active and a.spec_token_ids == []


def test_no_drafts_while_a_grammar_constrained_request_runs():
    from ember.sampling_params import StructuredOutputsParams

    drafter = DraftScheduler(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1, prompt_lookup_max=2))
    a = Request("a", [1, 2, 3, 1, 2], SamplingParams(max_tokens=8), max_model_len=64)
    c = Request("c", [7, 8, 7], SamplingParams(max_tokens=8, structured_outputs=StructuredOutputsParams(regex="a+")),
                max_model_len=64)
    a.num_computed_tokens, c.num_computed_tokens = 4, 2
    drafter.propose([a])
    assert drafter.active and a.spec_token_ids == [3, 1]
    # The verifier samples a step with drafts without grammar masks: none while c runs.
    drafter.propose([a, c])
    assert not drafter.active and a.spec_token_ids == [] and c.spec_token_ids == []
    drafter.propose([a])
    assert drafter.active and a.spec_token_ids == [3, 1]
