"""Finding a request's stop strings in its growing output text.

A :class:`StopStringMatcher` is built once per request from ``SamplingParams.stop``
and shared by the request's n completions; each completion keeps its own
:class:`StopStringState` and feeds it only the text each step adds. The answer
is the same as searching the text for every stop string after every step: of the
occurrences that end in the new text, the one that starts first, and among those
starting at the same character the stop string listed first.

The cost per character of new text does not grow with the number of stop
strings: up to :data:`FIND_MAX_STRINGS` strings are searched with ``str.find``
over the new text plus the ``len(longest) - 1`` characters before it (a constant
bound); more strings go through one Aho-Corasick automaton (Aho and Corasick,
"Efficient string matching: an aid to bibliographic search", CACM 18(6), 1975),
whose amortized cost is O(1) per character.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# From this many stop strings on, matching uses the automaton; below, str.find
# (C code over a few hundred characters) is cheaper than a Python loop per character.
FIND_MAX_STRINGS = 8


@dataclass(slots=True)
class StopMatch:
    """A stop string found in the text: ``start`` is its first character's offset
    in the whole text fed so far; ``stop`` is the string."""

    start: int
    stop: str


class StopStringMatcher:
    """The stop strings of one request, prepared for matching.

    Args:
        stops: the non-empty stop strings, in the request's order.

    Raises:
        ValueError: an empty stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        self.stops = list(stops)
        self.max_len = max((len(s) for s in self.stops), default=0)
        self.use_automaton = len(self.stops) > FIND_MAX_STRINGS
        if self.use_automaton:
            self._build()

    def _build(self) -> None:
        # Trie: goto[node] maps a character to a child; own[node] is the index of the
        # first stop string spelled by the path to node (-1: none); depth[node] its length.
        goto: list[dict[str, int]] = [{}]
        own = [-1]
        depth = [0]
        for index, s in enumerate(self.stops):
            node = 0
            for ch in s:
                child = goto[node].get(ch)
                if child is None:
                    child = goto[node][ch] = len(goto)
                    goto.append({})
                    own.append(-1)
                    depth.append(depth[node] + 1)
                node = child
            if own[node] == -1:
                own[node] = index
        # Failure links (longest proper suffix that is a trie node), breadth first, and
        # each node's longest stop string that is a suffix of its path: (length, index).
        fail = [0] * len(goto)
        out_len = [depth[i] if own[i] != -1 else 0 for i in range(len(goto))]
        out_index = list(own)
        queue = deque(goto[0].values())
        while queue:
            node = queue.popleft()
            if own[node] == -1:
                out_len[node], out_index[node] = out_len[fail[node]], out_index[fail[node]]
            for ch, child in goto[node].items():
                f = fail[node]
                while f and ch not in goto[f]:
                    f = fail[f]
                target = goto[f].get(ch, 0)
                fail[child] = target if target != child else 0
                queue.append(child)
        self._goto, self._fail, self._out_len, self._out_index = goto, fail, out_len, out_index

    def new_state(self) -> StopStringState:
        """Matching state for one completion's text (empty so far)."""
        return StopStringState(self)


class StopStringState:
    """One completion's progress through its request's stop strings."""

    __slots__ = ("_matcher", "_node", "_fed")

    def __init__(self, matcher: StopStringMatcher) -> None:
        self._matcher = matcher
        self._node = 0  # automaton state after the text fed so far
        self._fed = 0  # characters of the text the automaton has read

    def feed(self, text: str, new_start: int) -> StopMatch | None:
        """Look for a stop string ending in ``text[new_start:]``: the characters
        added since the last call, or fewer when the caller skips some (``text``
        is the whole output so far and only grows between calls).

        NOTE: after a match the completion ends: this state must not be fed again.

        Returns:
            The match that starts first (ties: the string listed first), or None.
        """
        m = self._matcher
        if not m.use_automaton:
            best: StopMatch | None = None
            for s in m.stops:
                # An occurrence ending in the new text starts at most len(s) - 1 characters before it.
                i = text.find(s, max(0, new_start - len(s) + 1))
                if i != -1 and (best is None or i < best.start):
                    best = StopMatch(i, s)
            return best
        goto, fail, out_len, out_index = m._goto, m._fail, m._out_len, m._out_index
        node = self._node
        best_start, best_index = -1, -1
        # NOTE: the automaton reads every character once, from where the last call
        # stopped, also text that was not searched (a caller may skip text, as
        # min_tokens does); only occurrences ending at or after new_start count.
        for pos in range(self._fed, len(text)):
            if best_start != -1 and pos - m.max_len + 1 > best_start:
                break  # no later match can start earlier
            ch = text[pos]
            while True:
                nxt = goto[node].get(ch)
                if nxt is not None:
                    node = nxt
                    break
                if node == 0:
                    break
                node = fail[node]
            length = out_len[node]
            if length and pos >= new_start:
                start = pos - length + 1
                if best_start == -1 or start < best_start or (start == best_start and out_index[node] < best_index):
                    best_start, best_index = start, out_index[node]
        self._node, self._fed = node, len(text)
        return None if best_start == -1 else StopMatch(best_start, m.stops[best_index])
