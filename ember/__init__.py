"""Ember: an LLM inference and serving engine."""

__version__ = "0.1.0"

from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "RequestOutput",
           "CompletionOutput", "__version__"]


def __getattr__(name: str):
    # Lazy: importing ember should not pull in the whole engine.
    if name == "LLM":
        from ember.engine.llm import LLM

        return LLM
    if name in ("BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"):
        import ember.beam_search

        return getattr(ember.beam_search, name)
    raise AttributeError(name)
