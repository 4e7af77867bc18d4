"""SamplingParams validation at the edges of what the engine core can carry:
integers within int64 (the msgpack wire format and torch's int64 tensors) and
stop strings that are Unicode text. Checked against msgspec's own encoding of
the values (the transport between the front end and the core process) and a
plain-Python two's-complement reference for the n > 1 seed wrap."""

from __future__ import annotations

import dataclasses

import msgspec
import pytest
import torch

from ember.engine.output_processor import child_requests
from ember.sample.sampler import _mix
from ember.sampling_params import SamplingParams
from ember.utils import INT64_MAX, INT64_MIN, check_text, is_int, wrap_int64

BEYOND = (INT64_MAX + 1, 2 ** 64, 10 ** 30, INT64_MIN - 1, -(10 ** 30))


def test_int64_constants_match_torch() -> None:
    info = torch.iinfo(torch.int64)
    assert (INT64_MIN, INT64_MAX) == (info.min, info.max)
    assert is_int(INT64_MAX) and is_int(INT64_MIN) and not is_int(INT64_MAX + 1) and not is_int(INT64_MIN - 1)
    assert not is_int(True) and not is_int(1.0) and not is_int("1")


@pytest.mark.parametrize("name, make", [
    ("seed", lambda v: {"seed": v}),
    ("top_k", lambda v: {"top_k": v}),
    ("max_tokens", lambda v: {"max_tokens": v}),
    ("stop_token_ids", lambda v: {"stop_token_ids": [1, v]}),
    ("n", lambda v: {"n": v}),
    ("logprobs", lambda v: {"logprobs": v}),
])
def test_integers_beyond_int64_raise_value_error_naming_the_field(name, make) -> None:
    for value in BEYOND:
        with pytest.raises(ValueError, match=f"^{name} "):
            SamplingParams(**make(value))
    with pytest.raises(ValueError, match=f"^{name} "):
        SamplingParams(**make(True))  # a bool is not an integer here


def test_int64_edges_are_accepted_and_cross_the_wire() -> None:
    for fields in ({"seed": INT64_MIN}, {"seed": INT64_MAX}, {"top_k": INT64_MAX}, {"top_k": -1},
                   {"max_tokens": INT64_MAX}, {"stop_token_ids": [0, INT64_MAX]}):
        params = SamplingParams(**fields)
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams)
        assert back == params, fields
    # Every accepted top_k fits the sampler's int64 tensor; one more would fail in
    # the middle of an engine step (msgpack alone would carry it, as a uint64).
    assert torch.tensor([INT64_MAX], dtype=torch.int64).item() == INT64_MAX
    with pytest.raises((OverflowError, RuntimeError, ValueError), match="(?i)overflow"):
        torch.tensor([INT64_MAX + 1], dtype=torch.int64)


def test_msgpack_refuses_what_validation_now_catches() -> None:
    # The crash the validation prevents: msgspec cannot encode ints outside [-2**63, 2**64).
    for value in (2 ** 64, 10 ** 30, INT64_MIN - 1):
        with pytest.raises(OverflowError):
            msgspec.msgpack.encode(value)
        with pytest.raises(ValueError, match="^seed "):
            SamplingParams(seed=value)


def test_stop_strings_must_be_unicode_text() -> None:
    for stop in ("\ud800", ["ok", "a\udfffb"], ["\udc00\ud800"]):
        with pytest.raises(ValueError, match="^stop .*surrogate"):
            SamplingParams(stop=stop)
    assert SamplingParams(stop=["\U0001F600", "é"]).stop == ["\U0001F600", "é"]
    with pytest.raises(UnicodeEncodeError):  # the reference: not UTF-8-encodable, so not text
        "a\udfffb".encode()


def test_check_text_reports_the_first_surrogate() -> None:
    assert check_text("plain \U0001F600 text", "x") == "plain \U0001F600 text"
    with pytest.raises(ValueError, match=r"^field .*U\+DC01 at index 3"):
        check_text("abc\udc01\ud800", "field")


def test_n_seeds_wrap_within_int64_without_changing_the_noise() -> None:
    for seed in (INT64_MAX - 1, INT64_MIN, 5):
        params = SamplingParams(seed=seed, n=4)
        seeds = [p.seed for _, p in child_requests("r", params)]
        # Reference: two's complement by hand.
        expected = [s - 2 ** 64 if s > INT64_MAX else s for s in (seed + i for i in range(4))]
        assert seeds == expected == [wrap_int64(seed + i) for i in range(4)]
        assert all(is_int(s) for s in seeds)
        # The sampler mixes seeds modulo 2**64: the wrapped seed draws the same noise.
        for i, s in enumerate(seeds):
            assert [_mix(s, pos) for pos in range(3)] == [_mix(seed + i, pos) for pos in range(3)]
    assert [p.seed for _, p in child_requests("r", dataclasses.replace(SamplingParams(), n=2))] == [None, None]
