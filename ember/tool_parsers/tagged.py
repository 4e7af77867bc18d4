"""Parsers for formats that put each call between a start and an end tag."""

from __future__ import annotations

from abc import abstractmethod

from ember.tool_parsers.base import ContentBuilder, ParsedToolCall, ToolParse, ToolParser, partial_suffix_len


class TaggedToolParser(ToolParser):
    """Each call is ``start_tag BODY end_tag``; :meth:`parse_body` reads BODY.

    Everything else is content. The :attr:`markers` (tags around a group of
    calls) are dropped from the text first. At the end of the output, a call
    whose end tag is missing still counts if its body parses (a model that
    stops right after the call's JSON).
    """

    start_tag: str = ""
    end_tag: str = ""
    markers: tuple[str, ...] = ()

    @abstractmethod
    def parse_body(self, body: str) -> ParsedToolCall | None:
        """The call written between the tags, or None if ``body`` is not one."""

    def split(self, text: str, final: bool) -> ToolParse:
        for marker in self.markers:
            text = text.replace(marker, "")
        content = ContentBuilder()
        calls: list[ParsedToolCall] = []
        piece_start = search = 0
        while (start := text.find(self.start_tag, search)) >= 0:
            body_start = start + len(self.start_tag)
            end = text.find(self.end_tag, body_start)
            if end < 0 and not final:  # an unfinished call: withheld, as is what leads to it
                content.add(text[piece_start:start], before_call=True)
                return ToolParse(content.text(), tuple(calls))
            body_end, search = (len(text), len(text)) if end < 0 else (end, end + len(self.end_tag))
            call = self.parse_body(text[body_start:body_end])
            if call is not None:
                content.add(text[piece_start:start], before_call=True)
                calls.append(call)
                piece_start = search
        tail = text[piece_start:]
        if not final:  # a partial tag may follow, then a call
            tail = tail[:len(tail) - partial_suffix_len(tail, (self.start_tag, *self.markers))].rstrip()
        content.add(tail, before_call=False)
        return ToolParse(content.text(), tuple(calls))
