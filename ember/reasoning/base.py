"""The reasoning parser interface.

A parser defines one pure function, :meth:`ReasoningParser.split`: the
``(reasoning, content)`` a text commits to. While streaming, a suffix that may
still turn into a tag (``"</th"``) is withheld until the next delta decides
it. Both public calls derive from ``split``, so the concatenated streaming
deltas always equal the non-streaming result, however the text is cut.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class ReasoningParser(ABC):
    """Separates reasoning from content in generated text.

    Subclasses set :attr:`name` and implement :meth:`split`.
    """

    name: str = ""
    # Where the model's output may hold its reasoning, for constrained output
    # (StructuredOutputsParams.reasoning): "required" or "optional".
    structured_output_reasoning: str = "required"

    @abstractmethod
    def split(self, text: str, final: bool) -> tuple[str, str]:
        """``(reasoning, content)`` of ``text``, tags removed.

        Args:
            text: all text generated so far.
            final: the generation has ended; when False, a suffix that is the
                start of a tag is left out of both parts.
        Returns:
            Two strings; as ``text`` grows, each only grows at its end.
        """

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """Split a finished output: ``(reasoning, content)``, None for an empty part."""
        reasoning, content = self.split(text, final=True)
        return reasoning or None, content or None

    def extract_reasoning_streaming(self, previous_text: str, delta_text: str, final: bool = False
                                    ) -> tuple[str | None, str | None]:
        """The new reasoning and content that ``delta_text`` adds after ``previous_text``.

        Args:
            previous_text: everything streamed before this delta.
            delta_text: the new text.
            final: this is the last delta (releases any withheld partial tag).
        Returns:
            ``(reasoning_delta, content_delta)``, None for an empty part. Costs
            O(len(previous_text + delta_text)) per call (stateless).
        """
        old_reasoning, old_content = self.split(previous_text, final=False)
        reasoning, content = self.split(previous_text + delta_text, final=final)
        return reasoning[len(old_reasoning):] or None, content[len(old_content):] or None
