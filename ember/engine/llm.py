"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ember.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams
from ember.engine.arg_utils import EngineArgs
from ember.core.stats import SchedulerStats
from ember.engine.llm_engine import LLMEngine, check_priority_and_salt, pooling_sampling_params
from ember.outputs import RequestOutput
from ember.pooling_params import PoolingParams
from ember.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Generate text from a model in this process.

    Args:
        model: a ``.gguf`` file, an HF directory or a bundled model name
            (default: SmolLM2-135M-Instruct).
        **engine_kwargs: any :class:`EngineArgs` field (``max_model_len``,
            ``kv_cache_memory``, ``max_num_batched_tokens``, ``device``, ...).

    Raises:
        ModelLoadError, ConfigError: unusable model or settings.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs(model=model, **engine_kwargs))

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def generate(self, prompts: str | list[str] | list[list[int]], sampling_params: SamplingParams | list[SamplingParams]
                 | None = None, use_tqdm: bool = True, priority: int | list[int] | None = None,
                 cache_salt: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in prompt order.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists.
            sampling_params: one for all prompts, or one per prompt (default:
                ``SamplingParams()``).
            priority: one for all prompts or one per prompt (default 0); lower
                runs first under ``scheduling_policy="priority"``.
            cache_salt: one for all prompts or one per prompt (default None);
                only requests with equal salts share prefix-cache blocks.
        Raises:
            ValueError: an invalid prompt, or a per-prompt list of the wrong
                length (nothing is run then).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self.llm_engine.input_processor.tokenize(p) for p in prompts]
        return self._run([p if isinstance(p, str) else None for p in prompts], token_lists, sampling_params, use_tqdm,
                         priority, cache_salt)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, priority: int | list[int] | None = None,
             cache_salt: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and complete it.

        Args:
            messages: one conversation (``[{"role", "content"}, ...]``) or a list of them.
            priority, cache_salt: as in :meth:`generate`.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.llm_engine.input_processor.apply_chat_template(c) for c in conversations]
        return self._run([None] * len(token_lists), token_lists, sampling_params, use_tqdm, priority, cache_salt)

    def beam_search(self, prompts: str | list[int] | dict[str, Any] | list[str | list[int] | dict[str, Any]],
                    params: BeamSearchParams, use_tqdm: bool = False,
                    cache_salt: str | None = None) -> list[BeamSearchOutput]:
        """Beam search from each prompt (see :mod:`ember.beam_search`); the
        searches of all prompts step together, their beams batched in one engine
        step.

        Args:
            prompts: a string, a list of token ids, or a list of prompts, each a
                string, a list of token ids, ``{"prompt": str}`` or
                ``{"prompt_token_ids": list[int]}`` (vLLM's prompt dicts).
            params: width, length, stop and scoring settings (shared by all prompts).
            cache_salt: as in :meth:`generate`.
        Returns:
            Per prompt, in order, its ``beam_width`` sequences, best score first.
        Raises:
            ValueError: an invalid prompt, one that fills the context window, a
                ``stop_token_ids`` entry outside the vocabulary, or an invalid
                ``cache_salt`` (nothing is run then).
        """
        engine = self.llm_engine
        ip = engine.input_processor
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        check_priority_and_salt(0, cache_salt)
        prompts = [_prompt_of(p) for p in prompts]
        token_lists = [ip.tokenize(p) for p in prompts]
        step_params = params.step_sampling_params()
        searches = []
        for ids in token_lists:
            ip.check(ids, step_params)
            searches.append(BeamSearch(ids, params, ip.eos_token_ids, engine.model_config.max_model_len))
        bar = tqdm(total=len(searches), desc="Beam search", disable=not use_tqdm)
        while live := [s for s in searches if not s.done]:
            step_ids = []
            for search in live:
                ids = []
                for prompt in search.step_prompts():
                    ids.append(engine.next_request_id())
                    engine.add_request(ids[-1], prompt, step_params, prompt_token_ids=prompt, cache_salt=cache_salt)
                step_ids.append(ids)
            finished: dict[str, RequestOutput] = {}
            while engine.has_unfinished_requests():
                finished.update((out.request_id, out) for out in engine.step() if out.finished)
            for search, ids in zip(live, step_ids):
                search.advance([finished[r].outputs[0].logprobs[0] for r in ids])
                bar.update(int(search.done))
        bar.close()
        tokenizer = self.get_tokenizer()
        return [BeamSearchOutput(p if isinstance(p, str) else None, s.prompt_token_ids, s.result(tokenizer))
                for p, s in zip(prompts, searches)]
    def embed(self, prompts: str | list[str] | list[list[int]], pooling_params: PoolingParams | None = None,
              use_tqdm: bool = True) -> list[RequestOutput]:
        """The pooled final hidden states of each prompt (see
        :mod:`ember.pooling_params`), in each output's ``pooled_output``
        ([hidden_size] floats); outputs come back in prompt order.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists.
            pooling_params: how to pool (default: ``LAST``, normalized).
        Raises:
            ValueError: an invalid prompt, or one that does not fit the context
                (nothing is run then).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        engine = self.llm_engine
        pooling_params = pooling_params or PoolingParams()
        token_lists = [engine.input_processor.tokenize(p) for p in prompts]
        for ids in token_lists:
            engine.input_processor.check(ids, pooling_sampling_params())
        ids_in_order = []
        for prompt, ids in zip(prompts, token_lists):
            req_id = engine.next_request_id()
            engine.add_request(req_id, prompt, None, prompt_token_ids=ids,  # type: ignore[arg-type]
                               pooling_params=pooling_params)
            ids_in_order.append(req_id)
        return self._collect(ids_in_order, use_tqdm)

    def get_stats(self) -> SchedulerStats:
        """Engine counters: prefix-cache queries/hits, preemptions, swaps, ..."""
        return self.llm_engine.get_stats()

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None, use_tqdm: bool,
             priority: int | list[int] | None = None,
             cache_salt: str | list[str | None] | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        if sampling_params is None:
            sampling_params = SamplingParams()
        n = len(token_lists)
        params = _per_prompt(sampling_params, n, "sampling_params")
        priorities = _per_prompt(0 if priority is None else priority, n, "priority")
        salts = _per_prompt(cache_salt, n, "cache_salt")
        token_lists = [engine.input_processor.truncate(ids, p.truncate_prompt_tokens, p.max_tokens)
                       for ids, p in zip(token_lists, params)]
        for p, ids, prio, salt in zip(params, token_lists, priorities, salts):
            engine.input_processor.check(ids, p)
            check_priority_and_salt(prio, salt)
        ids_in_order = []
        for text, ids, p, prio, salt in zip(texts, token_lists, params, priorities, salts):
            p = _final_only(p)
            req_id = engine.next_request_id()
            engine.add_request(req_id, text if text is not None else ids, p, prompt_token_ids=ids, priority=prio,
                               cache_salt=salt)
            ids_in_order.append(req_id)
        return self._collect(ids_in_order, use_tqdm)

    def _collect(self, ids_in_order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        """Step the engine until every request has finished; their outputs in ``ids_in_order``."""
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids_in_order), desc="Processed prompts", disable=not use_tqdm)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[r] for r in ids_in_order]


def _prompt_of(prompt: Any) -> Any:
    """The text or token ids of a prompt given as vLLM's ``{"prompt": ...}`` or
    ``{"prompt_token_ids": ...}`` dict; any other prompt as is.

    Raises:
        ValueError: a dict with neither key, or other keys.
    """
    if not isinstance(prompt, dict):
        return prompt
    if len(prompt) == 1 and ("prompt" in prompt or "prompt_token_ids" in prompt):
        return next(iter(prompt.values()))
    raise ValueError(f"prompt dict must have one key, 'prompt' or 'prompt_token_ids'; got keys {sorted(prompt)}")


def _per_prompt(value: Any, n: int, name: str) -> list[Any]:
    """``value`` for each of ``n`` prompts: a list as is (checked), anything else repeated."""
    if not isinstance(value, list):
        return [value] * n
    if len(value) != n:
        raise ValueError(f"got {len(value)} {name} for {n} prompts")
    return value


def _final_only(p: SamplingParams) -> SamplingParams:
    if p.output_kind == RequestOutputKind.FINAL_ONLY:
        return p
    import dataclasses

    return dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
