"""Grammar compilation and per-request grammar matchers in the engine core.

:class:`StructuredOutputManager` builds xgrammar's ``TokenizerInfo`` once (from
the model's tokenizer, on first use) and compiles each constraint on a small
thread pool, off the step loop: compiled grammars are cached by their spec
(:func:`~ember.structured_output.grammar.grammar_key`), and concurrent requests
with the same spec share one compilation. A request waits for its grammar
outside the scheduler (see ``EngineCore``), so other requests keep running.

:class:`StructuredOutputRequest` is one sequence's matcher (``n > 1`` gives each
sibling its own): it advances with the sequence's accepted tokens and fills
the packed bitmask of tokens allowed at its next position (the layout of
:mod:`ember.sample.logits_processor`). With a reasoning parser the constraint
starts after the end of the model's reasoning (see :class:`ReasoningMode`).
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ember.logger import init_logger
from ember.reasoning.think import THINK_END, THINK_START
from ember.sample.logits_processor import bitmask_words
from ember.sampling_params import SamplingParams
from ember.structured_output.grammar import GrammarKey, build_grammar, grammar_key

logger = init_logger(__name__)


# Constrained rows from which one step's masks are filled on xgrammar's threads.
BATCH_FILL_MIN = 4


class ReasoningMode(enum.Enum):
    """Where a reasoning model's output leaves room for the constraint.

    NONE: constrained from the first token. REQUIRED: the output starts inside
    a reasoning block (DeepSeek-R1) unless the prompt closed one already; the
    constraint starts after the reasoning end token. OPTIONAL: the output may
    open a reasoning block with the start token as its first token (Qwen3);
    otherwise it is constrained from the first token.
    """

    NONE = "none"
    REQUIRED = "required"
    OPTIONAL = "optional"


class StructuredOutputRequest:
    """One sequence's grammar state.

    Args:
        grammar: the compiled grammar, once compiled (see :attr:`ready`).
        stop_token_ids: the tokens that end the sequence when the grammar
            allows it to end (the model's EOS ids).
        reasoning: see :class:`ReasoningMode`; takes effect in :meth:`start`.
    """

    def __init__(self, grammar: Future, stop_token_ids: list[int],
                 reasoning: ReasoningMode = ReasoningMode.NONE) -> None:
        self.grammar = grammar
        self.stop_token_ids = stop_token_ids
        self.reasoning = reasoning
        self.think_start_id: int | None = None
        self.think_end_id: int | None = None
        self.matcher: Any = None
        self.terminated = False
        # in_reasoning: tokens go unconstrained until the end tag.
        # may_open: the next token may be the start tag (OPTIONAL, first token).
        self.in_reasoning = False
        self.may_open = False

    def start(self, prompt_token_ids: list[int], think_start_id: int | None, think_end_id: int | None) -> None:
        """Set the reasoning state before the first token.

        Args:
            prompt_token_ids: read to see whether the prompt left reasoning
                open or closed (a chat template may pre-fill either).
            think_start_id / think_end_id: the reasoning tags' token ids (None
                when the vocabulary has no single token for one; without an
                end token the constraint applies from the first token).
        """
        self.think_start_id, self.think_end_id = think_start_id, think_end_id
        if self.reasoning is ReasoningMode.NONE or think_end_id is None:
            return
        state = _prompt_reasoning_state(prompt_token_ids, think_start_id, think_end_id)
        if state == "open" or (state is None and self.reasoning is ReasoningMode.REQUIRED):
            self.in_reasoning = True
        elif state is None and think_start_id is not None:
            self.may_open = True

    @property
    def ready(self) -> bool:
        """The grammar is compiled (or failed to; see :meth:`error`)."""
        return self.grammar.done()

    def error(self) -> BaseException | None:
        """Why compilation failed (once :attr:`ready`), or None."""
        return self.grammar.exception()

    @property
    def constraining(self) -> bool:
        """The next token is constrained (not reasoning, not terminated)."""
        return not (self.in_reasoning or self.terminated)

    def _matcher(self) -> Any:
        if self.matcher is None:
            import xgrammar as xgr

            self.matcher = xgr.GrammarMatcher(self.grammar.result(), override_stop_tokens=self.stop_token_ids or None)
        return self.matcher

    def accept_tokens(self, tokens: list[int]) -> bool:
        """Advance over the sequence's new tokens.

        Returns:
            False when the sequence must end: the grammar terminated (it
            accepted a stop token) or rejected a token (which a correctly
            masked step never samples).
        """
        for token in tokens:
            if self.terminated:
                return False
            if self.may_open:
                self.may_open = False
                if token == self.think_start_id:
                    self.in_reasoning = True
                    continue
            if self.in_reasoning:
                if token == self.think_end_id:
                    self.in_reasoning = False
                continue
            matcher = self._matcher()
            if not matcher.accept_token(token):
                logger.error("grammar rejected token %d; ending the sequence", token)
                self.terminated = True
                return False
            if matcher.is_terminated():
                self.terminated = True
        return not self.terminated

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into ``bitmask[row]`` ([rows, words]
        int32 CPU); a row of all ones (every token) while reasoning or after
        termination (that token is never used)."""
        if not self.constraining:
            bitmask[row].fill_(-1)
            return
        self._matcher().fill_next_token_bitmask(bitmask, row)
        self._allow_opening(bitmask, row)

    def _allow_opening(self, bitmask: torch.Tensor, row: int) -> None:
        if self.may_open:
            t = self.think_start_id
            bitmask[row, t >> 5] |= _bit(t & 31)


def _bit(i: int) -> int:
    """Bit ``i`` of an int32 word, as a signed Python int."""
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


def _prompt_reasoning_state(prompt: list[int], start_id: int | None, end_id: int) -> str | None:
    """``"open"`` if the prompt's last reasoning tag is a start tag, ``"closed"``
    if it is an end tag, None if it has neither (only the prompt's last 64
    tokens are read: a template pre-fills tags at its very end)."""
    for token in reversed(prompt[-64:]):
        if token == end_id:
            return "closed"
        if token == start_id:
            return "open"
    return None


class StructuredOutputManager:
    """Compiles and caches grammars for one model's engine core.

    Args:
        model: the model (its tokenizer builds xgrammar's token tables).
        tokenizer: a tokenizer path overriding the model's, or None.
        vocab_size: the model's vocabulary (the logits' width; tokens past the
            tokenizer's are never allowed).
        max_workers: compile threads.
        cache_size: compiled grammars kept (least recently used dropped).
        tokenizer_obj: an already loaded Hugging Face tokenizer, or None to
            load it on first use.
    """

    def __init__(self, model: str, tokenizer: str | None, vocab_size: int, max_workers: int = 2,
                 cache_size: int = 256, tokenizer_obj: Any = None) -> None:
        self._model, self._tokenizer_path, self.vocab_size = model, tokenizer, vocab_size
        self._tokenizer = tokenizer_obj
        self._compiler: Any = None
        self._init_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._max_workers = max_workers
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._cache_size = cache_size
        self._think_ids: tuple[int | None, int | None] | None = None
        self._batch_matcher: Any = None
        # Counters, cumulative; compile times (seconds) since the last drain.
        self.num_requests = 0
        self.num_cache_hits = 0
        self._compile_times: list[float] = []
        self._times_lock = threading.Lock()

    @property
    def num_words(self) -> int:
        """Int32 words of one bitmask row."""
        return bitmask_words(self.vocab_size)

    def _get_compiler(self) -> Any:
        with self._init_lock:
            if self._compiler is None:
                import xgrammar as xgr

                from ember.loader import load_tokenizer_for

                start = time.perf_counter()
                if self._tokenizer is None:
                    self._tokenizer = load_tokenizer_for(self._model, self._tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size)
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
                logger.info(f"structured output: token tables built in {time.perf_counter() - start:.2f} s")
            return self._compiler

    def _compile(self, key: GrammarKey) -> Any:
        compiler = self._get_compiler()
        start = time.perf_counter()
        compiled = compiler.compile_grammar(build_grammar(key))
        with self._times_lock:
            self._compile_times.append(time.perf_counter() - start)
        return compiled

    def compiled_grammar(self, key: GrammarKey) -> Future:
        """The compilation of ``key``: a cached one, or one just submitted."""
        future = self._cache.get(key)
        if future is not None and not (future.done() and future.exception() is not None):
            self._cache.move_to_end(key)
            self.num_cache_hits += 1
            return future
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="ember-grammar")
        future = self._pool.submit(self._compile, key)
        self._cache[key] = future
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return future

    def new_request(self, params: SamplingParams) -> StructuredOutputRequest:
        """The grammar state of a new sequence with ``params.structured_outputs``
        (its grammar starts compiling unless cached); call :meth:`start` once
        it is :attr:`~StructuredOutputRequest.ready`.

        Raises:
            ValueError: the constraint is malformed (see :func:`grammar_key`).
        """
        so = params.structured_outputs
        assert so is not None
        self.num_requests += 1
        future = self.compiled_grammar(grammar_key(so))
        mode = ReasoningMode(so.reasoning) if so.reasoning else ReasoningMode.NONE
        return StructuredOutputRequest(future, sorted(params._eos_token_ids), mode)

    def start(self, state: StructuredOutputRequest, prompt_token_ids: list[int]) -> None:
        """Set a sequence's reasoning state (its grammar is compiled, so the
        tokenizer is loaded: this does not wait)."""
        if state.reasoning is not ReasoningMode.NONE and self._think_ids is None:
            vocab = self._get_compiler() and self._tokenizer.get_vocab()
            self._think_ids = (vocab.get(THINK_START), vocab.get(THINK_END))
        start_id, end_id = self._think_ids or (None, None)
        state.start(prompt_token_ids, start_id, end_id)

    def fill_bitmasks(self, states: list[StructuredOutputRequest | None], bitmask: torch.Tensor) -> None:
        """Fill ``bitmask`` ([len(states), words] int32 CPU, all ones on entry)
        with each sequence's allowed next tokens; a None state's row stays all
        ones. From :data:`BATCH_FILL_MIN` constrained rows on, xgrammar fills
        them on its own threads (``BatchGrammarMatcher``)."""
        constrained = [(i, st) for i, st in enumerate(states) if st is not None and st.constraining]
        if len(constrained) < BATCH_FILL_MIN:
            for i, st in constrained:
                st.fill_bitmask(bitmask, i)
            return
        if self._batch_matcher is None:
            import xgrammar as xgr

            self._batch_matcher = xgr.BatchGrammarMatcher("auto")
        self._batch_matcher.batch_fill_next_token_bitmask([st._matcher() for _, st in constrained], bitmask,
                                                          [i for i, _ in constrained])
        for i, st in constrained:
            st._allow_opening(bitmask, i)

    def drain_compile_times(self) -> list[float]:
        """Compile times (seconds) since the last call."""
        with self._times_lock:
            times, self._compile_times = self._compile_times, []
        return times

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
