"""Stop-string matching against a brute-force reference (every stop string
searched after every piece of new text), and its cost per character."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.engine.stop_strings import FIND_MAX_STRINGS, StopMatch, StopStringMatcher

ALPHABET = "abc€"  # few characters, so that stop strings do occur (and overlap)


def brute_force(stops: list[str], pieces: list[str]) -> tuple[int, StopMatch | None]:
    """(index of the piece that completed a stop string, the match): after each
    piece, the earliest occurrence of any stop string that was not all there
    before; ties go to the string listed first."""
    text = ""
    for k, piece in enumerate(pieces):
        before, text = text, text + piece
        best = None
        for s in stops:
            for i in range(len(text) - len(s) + 1):
                if text.startswith(s, i) and i + len(s) > len(before):
                    if best is None or i < best.start:
                        best = StopMatch(i, s)
                    break
        if best is not None:
            return k, best
    return len(pieces), None


def matched(stops: list[str], pieces: list[str]) -> tuple[int, StopMatch | None]:
    state = StopStringMatcher(stops).new_state()
    text = ""
    for k, piece in enumerate(pieces):
        start, text = len(text), text + piece
        match = state.feed(text, start)
        if match is not None:
            return k, match
    return len(pieces), None


stop_lists = st.lists(st.text(ALPHABET, min_size=1, max_size=6), min_size=1, max_size=3 * FIND_MAX_STRINGS)
piece_lists = st.lists(st.text(ALPHABET, max_size=5), max_size=30)


@settings(max_examples=400, deadline=None)
@given(stop_lists, piece_lists)
def test_matches_the_brute_force_reference(stops: list[str], pieces: list[str]) -> None:
    assert matched(stops, pieces) == brute_force(stops, pieces)


@settings(max_examples=200, deadline=None)
@given(stop_lists, piece_lists, st.integers(0, 30))
def test_both_matching_methods_agree(stops: list[str], pieces: list[str], pad: int) -> None:
    # The same strings, searched by str.find (few) and by the automaton (padded with
    # strings that never occur, so that the answer must not change).
    few = stops[:FIND_MAX_STRINGS]
    many = few + ["z" * (i + 1) for i in range(pad + FIND_MAX_STRINGS)]
    assert not StopStringMatcher(few).use_automaton and StopStringMatcher(many).use_automaton
    assert matched(many, pieces) == matched(few, pieces) == brute_force(few, pieces)


def test_ties_and_overlaps() -> None:
    many = ["zz"] * FIND_MAX_STRINGS  # forces the automaton
    for extra in ([], many):
        # Same start: the string listed first wins, even if it is longer.
        assert matched(["abc", "ab", *extra], ["abc"]) == (0, StopMatch(0, "abc"))
        assert matched(["ab", "abc", *extra], ["abc"]) == (0, StopMatch(0, "ab"))
        # An earlier start wins over an earlier end.
        assert matched(["bc", "abcd", *extra], ["xabcd"]) == (0, StopMatch(1, "abcd"))
        # A stop string spanning pieces; found when its last character arrives.
        assert matched(["abc", *extra], ["xa", "b", "cy"]) == (2, StopMatch(1, "abc"))
        # Failure links: "aab" inside "aaab".
        assert matched(["aab", *extra], ["aaa", "b"]) == (1, StopMatch(1, "aab"))


@pytest.mark.serial  # a timing comparison: run alone, not beside another test
def test_cost_per_character_does_not_grow_with_the_number_of_stop_strings() -> None:
    text = "the quick brown fox jumps over the lazy dog " * 50

    def seconds(stops: list[str]) -> float:
        state = StopStringMatcher(stops).new_state()
        start = time.perf_counter()
        for end in range(4, len(text), 4):  # 4 new characters a step, as a token
            assert state.feed(text[:end], end - 4) is None
        return time.perf_counter() - start

    few = [f"#{i}#" for i in range(FIND_MAX_STRINGS + 1)]  # the automaton, smallest
    many = [f"#{i:05d}#{'x' * (i % 100)}" for i in range(5_000)]
    seconds(few)  # warm up
    assert seconds(many) < 3 * seconds(few) + 0.01


@settings(max_examples=200, deadline=None)
@given(stop_lists, piece_lists, st.integers(0, 6), st.integers(0, 30))
def test_text_skipped_by_the_caller_still_counts_toward_later_matches(stops: list[str], pieces: list[str], skip: int,
                                                                      pad: int) -> None:
    """As min_tokens does: the first ``skip`` pieces are never searched, yet a stop
    string may start in them and end later; both methods agree with brute force."""
    stops = stops + ["~" * (k + 1) for k in range(pad)]  # past FIND_MAX_STRINGS: the automaton
    skip = min(skip, len(pieces))
    text = "".join(pieces[:skip])
    rest = pieces[skip:]
    k_ref, ref = brute_force(stops, [text] + rest)
    if ref is not None and k_ref == 0:
        return  # completed inside the skipped text: not this property
    state = StopStringMatcher(stops).new_state()
    got = None
    for piece in rest:
        start, text = len(text), text + piece
        got = state.feed(text, start)
        if got is not None:
            break
    assert got == ref
