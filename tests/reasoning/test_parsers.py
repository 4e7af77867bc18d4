"""Reasoning parsers: whole outputs, and streams cut at every position so that
``<think>`` / ``</think>`` arrive split across deltas."""

from __future__ import annotations

import itertools

import pytest

from ember.reasoning import get_reasoning_parser, reasoning_parser_names

R1_CASES = [
    # (output, reasoning, content)
    ("<think>\nLet me add.\n</think>\n\nThe answer is 4.", "\nLet me add.\n", "\n\nThe answer is 4."),
    ("Let me add.</think>The answer is 4.", "Let me add.", "The answer is 4."),  # <think> came with the prompt
    ("<think>I was cut off", "I was cut off", None),  # missing end tag
    ("no tags at all", "no tags at all", None),
    ("</think>only an answer", None, "only an answer"),
    ("<think></think>", None, None),
    ("ends in a partial tag </thi", "ends in a partial tag </thi", None),
    ("<thin", "<thin", None),
    ("a < b <think> c</think>x</think>y", "a < b <think> c", "x</think>y"),
]

QWEN3_CASES = [
    ("<think>\nHmm.\n</think>\n\nParis.", "\nHmm.\n", "\n\nParis."),
    ("Paris.", None, "Paris."),  # enable_thinking=False: no tags
    ("<think>cut off", "cut off", None),  # missing end tag
    ("a stray </think> is text", None, "a stray </think> is text"),
    ("before<think>r</think>after", "r", "beforeafter"),
    ("1 < 2 and <thinking", None, "1 < 2 and <thinking"),
    ("partial start <thi", None, "partial start <thi"),
    ("<think></think>\n\nParis.", None, "\n\nParis."),
]

CASES = [("deepseek_r1", *c) for c in R1_CASES] + [("qwen3", *c) for c in QWEN3_CASES]


def stream(parser, pieces: list[str]) -> tuple[str | None, str | None, list[tuple[str | None, str | None]]]:
    """Feed ``pieces`` as deltas; returns the joined reasoning and content and every delta."""
    previous, deltas = "", []
    for i, piece in enumerate(pieces):
        deltas.append(parser.extract_reasoning_streaming(previous, piece, final=i == len(pieces) - 1))
        previous += piece
    reasoning = "".join(r for r, _ in deltas if r) or None
    content = "".join(c for _, c in deltas if c) or None
    return reasoning, content, deltas


def cuts(text: str, max_cuts: int = 2):
    """Every way to cut ``text`` into at most ``max_cuts + 1`` non-empty pieces, and char by char."""
    yield [text]
    for k in range(1, max_cuts + 1):
        for points in itertools.combinations(range(1, len(text)), k):
            bounds = (0, *points, len(text))
            yield [text[a:b] for a, b in zip(bounds, bounds[1:])]
    yield list(text)


def test_registry():
    assert reasoning_parser_names() == ["deepseek_r1", "qwen3"]
    with pytest.raises(ValueError, match="deepseek_r1"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_whole_output(name, text, reasoning, content):
    assert get_reasoning_parser(name).extract_reasoning(text) == (reasoning, content)


@pytest.mark.parametrize("name,text,reasoning,content", CASES)
def test_every_split_streams_the_same(name, text, reasoning, content):
    parser = get_reasoning_parser(name)
    for pieces in cuts(text):
        got_reasoning, got_content, deltas = stream(parser, pieces)
        assert (got_reasoning, got_content) == (reasoning, content), pieces
        assert all(r != "" and c != "" for r, c in deltas), "empty parts must be None"


def test_tags_split_across_tokens_r1():
    parser = get_reasoning_parser("deepseek_r1")
    tokens = ["<", "th", "ink", ">", "Let", " me", " think", "</", "think", ">", "\n\n", "Four", "."]
    _, _, deltas = stream(parser, tokens)
    assert deltas == [(None, None), (None, None), (None, None), (None, None), ("Let", None), (" me", None),
                      (" think", None), (None, None), (None, None), (None, None), (None, "\n\n"), (None, "Four"),
                      (None, ".")]


def test_tags_split_across_tokens_qwen3():
    parser = get_reasoning_parser("qwen3")
    tokens = ["1 <", "3 ", "<thi", "nk>", "step", "</th", "ink>", "done", " <", "3"]
    _, _, deltas = stream(parser, tokens)
    # Before <think> a trailing "<" is held back; once reasoning has ended, nothing is.
    assert deltas == [(None, "1 "), (None, "<3 "), (None, None), (None, None), ("step", None), (None, None),
                      (None, None), (None, "done"), (None, " <"), (None, "3")]


def test_withheld_partial_tag_is_released_at_the_end():
    parser = get_reasoning_parser("deepseek_r1")
    assert parser.extract_reasoning_streaming("<think>abc", "</thi") == (None, None)
    assert parser.extract_reasoning_streaming("<think>abc", "</thi", final=True) == ("</thi", None)
    assert parser.extract_reasoning_streaming("<think>abc</thi", "s is not a tag") == ("</this is not a tag", None)


def test_end_and_content_in_one_delta():
    parser = get_reasoning_parser("deepseek_r1")
    assert parser.extract_reasoning_streaming("<think>ab", "c</think>d") == ("c", "d")
