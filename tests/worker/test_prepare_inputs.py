"""ModelRunner._prepare_host_inputs against a plain-Python packing of the same
schedule: decodes first, positions, slot mapping through the block table,
which rows sample, and (asynchronous scheduling) which input tokens are still
in flight and where the device finds them."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from ember.worker.model_runner import ModelRunner

BLOCK = 16


def _reference(requests: dict, num_scheduled: dict) -> dict:
    order = [r for r in num_scheduled if num_scheduled[r] == 1] + [r for r in num_scheduled if num_scheduled[r] > 1]
    ids, pos, slots, qsl, lens, rows, sample, in_flight = [], [], [], [0], [], [], [], []
    width = max(len(requests[r].block_ids) for r in order)
    for r in order:
        s, n = requests[r], num_scheduled[r]
        for p in range(s.num_computed_tokens, s.num_computed_tokens + n):
            if p < len(s.token_ids):
                ids.append(s.token_ids[p])
            else:  # the token in flight: a 0, filled in on the device from the previous step's row
                in_flight.append((len(ids), s.last_row))
                ids.append(0)
            pos.append(p)
            slots.append(s.block_ids[p // BLOCK] * BLOCK + p % BLOCK)
        qsl.append(qsl[-1] + n)
        lens.append(s.num_computed_tokens + n)
        rows.append(s.block_ids + [0] * (width - len(s.block_ids)))
        if s.num_computed_tokens + n == len(s.token_ids) + s.num_in_flight:
            sample.append((r, qsl[-1] - 1))
    return dict(input_ids=ids, positions=pos, slot_mapping=slots, query_start_loc=qsl, seq_lens=lens,
                block_table=rows, sample=sample, in_flight=in_flight, num_decodes=sum(num_scheduled[r] == 1 for r in order),
                max_query_len=max(num_scheduled.values()))


@pytest.mark.parametrize("async_steps", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_packing_matches_reference(seed: int, async_steps: bool) -> None:
    rng = random.Random(seed)
    requests, num_scheduled = {}, {}
    for i in range(rng.randint(1, 40)):
        total = rng.randint(1, 300)
        n = 1 if rng.random() < 0.6 or (async_steps and i == 0) else rng.randint(1, total)
        computed = total - n if rng.random() < 0.7 or (async_steps and i == 0) else rng.randint(0, total - n)
        num_blocks = -(-(computed + n) // BLOCK) + rng.randint(0, 1)
        # A decode continuing a step in flight: its last token is not known yet.
        # (A chunk may stop mid-prompt; with async_steps, r0 is such a decode.)
        in_flight = async_steps and n == 1 and computed == total - 1 and (i == 0 or rng.random() < 0.5)
        requests[f"r{i}"] = SimpleNamespace(req_id=f"r{i}", num_computed_tokens=computed,
                                            token_ids=[rng.randrange(50_000) for _ in range(total - in_flight)],
                                            num_in_flight=int(in_flight), last_row=None,
                                            block_ids=rng.sample(range(10_000), num_blocks))
        num_scheduled[f"r{i}"] = n
    # The previous step sampled the requests in flight (in a shuffled order) and others.
    last_sample_req_ids = [r for r, s in requests.items() if s.num_in_flight] + ["gone1", "gone2"]
    rng.shuffle(last_sample_req_ids)
    for row, r in enumerate(last_sample_req_ids):
        if r in requests:
            requests[r].last_row = row
    last_sampled = object()  # the previous step's sampled ids on the device (only passed along)
    runner = SimpleNamespace(requests=requests, block_size=BLOCK, _last_sample_req_ids=last_sample_req_ids,
                             _last_sampled=last_sampled, dp_attention=None)
    host = ModelRunner._prepare_host_inputs(runner, SimpleNamespace(num_scheduled_tokens=num_scheduled))
    ref = _reference(requests, num_scheduled)
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "block_table"):
        assert getattr(host, name).tolist() == ref[name], name
    assert host.input_ids.dtype == np.int64 and host.slot_mapping.dtype == np.int64
    assert host.query_start_loc.dtype == np.int32 and host.block_table.dtype == np.int32
    assert list(zip(host.sample_req_ids, host.sample_rows)) == ref["sample"]
    assert host.num_decodes == ref["num_decodes"] and host.max_query_len == ref["max_query_len"]
    assert list(zip(host.in_flight_dst, host.in_flight_src)) == ref["in_flight"]
    assert bool(ref["in_flight"]) == async_steps
    assert host.in_flight_source is (last_sampled if async_steps else None)
