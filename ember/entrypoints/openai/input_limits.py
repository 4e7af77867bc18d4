"""Cheap bounds on request inputs, checked before the expensive work, and where
that work runs.

* :func:`check_prompt_chars`: a prompt text longer than ``max_model_len x``
  :data:`MAX_CHARS_PER_TOKEN` characters is refused (HTTP 400) before it is
  tokenized: tokenizing a few megabytes costs seconds of CPU for a prompt that
  cannot fit the context window anyway.
* :func:`check_stop_strings`: at most ``--max-stop-strings`` stop strings of at
  most ``--max-stop-string-chars`` characters each (HTTP 400 naming ``stop``):
  each is held and matched for every completion of the request.
* :func:`run_input_work`: tokenizing, chat-template rendering and detokenizing
  a large input run in a worker thread (``asyncio.to_thread``), so that the
  event loop keeps streaming the other clients' tokens meanwhile; small inputs
  stay on the loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from ember.entrypoints.openai.protocol import APIError

T = TypeVar("T")

# Characters of prompt text per token of context that the server accepts before
# tokenizing. English averages about 4 characters per token, code 3 to 5, CJK text
# 1 to 2; only long runs of one repeated character (indentation, "=====" rules)
# reach tens of characters per token (the longest tokens of the bundled
# vocabularies are 81 to 128 characters). A text averaging over 32 would have to
# be made almost only of such runs.
MAX_CHARS_PER_TOKEN = 32

# From this many characters (text) or token ids (lists) on, input work leaves the
# event loop. A Rust tokenizer takes about 0.5 us per character (4096 characters:
# ~2 ms on a loaded CPU), a thread hop about 0.1 ms: below this size the hop would
# be a measurable share of the work, above it the work would stall other streams.
OFFLOAD_MIN_CHARS = 4096
OFFLOAD_MIN_TOKENS = 2048

# Defaults of ``--max-stop-strings`` and ``--max-stop-string-chars``. OpenAI's API
# takes up to 4 stop sequences; 64 leaves room for clients that list every
# end-of-turn marker of several templates, and 256 characters for multi-line markers.
DEFAULT_MAX_STOP_STRINGS = 64
DEFAULT_MAX_STOP_STRING_CHARS = 256


def max_prompt_chars(max_model_len: int) -> int:
    """The most characters of prompt text tokenized for a context of
    ``max_model_len`` tokens."""
    return max_model_len * MAX_CHARS_PER_TOKEN


def messages_chars(messages: list[dict]) -> int:
    """Characters of text in chat messages as the template gets them (their
    ``content`` strings): what :func:`check_prompt_chars` bounds for a chat."""
    return sum(len(m["content"]) for m in messages)


def check_prompt_chars(num_chars: int, max_model_len: int, location: str) -> None:
    """Refuse a prompt text of ``num_chars`` characters that is too long to fit
    ``max_model_len`` tokens, without tokenizing it.

    Args:
        location: where the text is in the request (``prompt``, ``prompt[2]``,
            ``messages``): named in the message; ``param`` is its field.

    Raises:
        APIError: 400, code ``context_length_exceeded``, when ``num_chars`` is over
            :func:`max_prompt_chars`.
    """
    limit = max_prompt_chars(max_model_len)
    if num_chars > limit:
        raise APIError(
            f"{location} is {num_chars} characters long, too long for this model's context window of "
            f"{max_model_len} tokens: the server refuses texts over {limit} characters "
            f"({MAX_CHARS_PER_TOKEN} per token of context) without tokenizing them",
            param=location.split("[", 1)[0], code="context_length_exceeded")


def check_stop_strings(stop: list[str] | None, max_strings: int, max_chars: int) -> None:
    """Refuse more than ``max_strings`` stop strings, or one longer than
    ``max_chars`` characters.

    Raises:
        APIError: 400 with ``param`` ``stop``.
    """
    if not stop:
        return
    if len(stop) > max_strings:
        raise APIError(f"stop holds {len(stop)} strings; this server takes at most {max_strings} "
                       "(--max-stop-strings)", param="stop")
    longest = max(range(len(stop)), key=lambda i: len(stop[i]))
    if len(stop[longest]) > max_chars:
        raise APIError(f"stop[{longest}] is {len(stop[longest])} characters long; this server takes stop strings "
                       f"of at most {max_chars} characters (--max-stop-string-chars)", param="stop")


async def run_input_work(fn: Callable[[], T], num_chars: int = 0, num_tokens: int = 0) -> T:
    """``fn()`` (tokenizing, rendering or detokenizing one input), in a worker
    thread when the input has at least :data:`OFFLOAD_MIN_CHARS` characters or
    :data:`OFFLOAD_MIN_TOKENS` token ids, else right here on the event loop.

    NOTE: a worker thread runs to its end even if the client goes meanwhile; the
    request body limit and :func:`check_prompt_chars` bound how long that is.
    """
    if num_chars < OFFLOAD_MIN_CHARS and num_tokens < OFFLOAD_MIN_TOKENS:
        return fn()
    return await asyncio.to_thread(fn)
