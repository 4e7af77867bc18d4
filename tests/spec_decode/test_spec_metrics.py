"""Speculative decoding counters: Prometheus exposition and bench fields; the
stats survive the msgpack boundary between the engine core and the front end."""

from __future__ import annotations

import msgspec

from ember.core.stats import SchedulerStats
from ember.entrypoints.bench.offline import spec_decode_fields
from ember.metrics import PrometheusMetrics


def _stats(drafts, draft_tokens, accepted, per_pos, drafts_pos) -> SchedulerStats:
    return SchedulerStats(spec_num_drafts=drafts, spec_num_draft_tokens=draft_tokens,
                          spec_num_accepted_tokens=accepted, spec_accepted_per_pos=per_pos,
                          spec_drafts_per_pos=drafts_pos)


def test_prometheus_spec_decode_metrics():
    m = PrometheusMetrics("m")
    m.record(_stats(2, 6, 3, [2, 1, 0], [2, 2, 2]), 0, 0, [])
    m.record(_stats(4, 12, 9, [4, 3, 2], [4, 4, 4]), 0, 0, [])
    text = m.render().decode()
    assert 'ember:spec_decode_num_drafts_total{engine="0",model_name="m"} 4.0' in text
    assert 'ember:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 12.0' in text
    assert 'ember:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 9.0' in text
    assert 'ember:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="2"} 2.0' in text
    assert 'ember:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="m",position="0"} 4.0' in text
    assert 'ember:spec_decode_acceptance_rate{engine="0",model_name="m"} 0.75' in text
    assert 'ember:spec_decode_mean_accepted_length{engine="0",model_name="m"} 3.25' in text


def test_bench_fields_and_msgpack_round_trip():
    s = _stats(4, 12, 9, [4, 3, 2], [4, 4, 4])
    f = spec_decode_fields(s)
    assert f["spec_acceptance_rate"] == 0.75 and f["spec_mean_accepted_length"] == 3.25
    assert [f[f"spec_acceptance_rate_pos{j}"] for j in range(3)] == [1.0, 0.75, 0.5]
    assert spec_decode_fields(SchedulerStats()) == {}
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(s), type=SchedulerStats)
    assert back.spec_accepted_per_pos == [4, 3, 2] and back.spec_acceptance_rate == 0.75
