"""The offline API: ``LLM(model).generate(prompts, SamplingParams(...))``."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from ember.engine.arg_utils import EngineArgs
from ember.engine.llm_engine import LLMEngine
from ember.outputs import RequestOutput
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
                 | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete each prompt; outputs come back in prompt order.

        Args:
            prompts: a string, a list of strings, or a list of token-id lists.
            sampling_params: one for all prompts, or one per prompt (default:
                ``SamplingParams()``).
        Raises:
            ValueError: an invalid prompt (nothing is run then).
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self.llm_engine.input_processor.tokenize(p) for p in prompts]
        return self._run([p if isinstance(p, str) else None for p in prompts], token_lists, sampling_params, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and complete it.

        Args:
            messages: one conversation (``[{"role", "content"}, ...]``) or a list of them.
        """
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [self.llm_engine.input_processor.apply_chat_template(c) for c in conversations]
        return self._run([None] * len(token_lists), token_lists, sampling_params, use_tqdm)

    def _run(self, texts: list[str | None], token_lists: list[list[int]],
             sampling_params: SamplingParams | list[SamplingParams] | None, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(token_lists)
        if len(params) != len(token_lists):
            raise ValueError(f"got {len(params)} sampling_params for {len(token_lists)} prompts")
        for p, ids in zip(params, token_lists):
            engine.input_processor.check(ids, p)
        ids_in_order = []
        for text, ids, p in zip(texts, token_lists, params):
            p = _final_only(p)
            req_id = engine.next_request_id()
            engine.add_request(req_id, text if text is not None else ids, p, prompt_token_ids=ids)
            ids_in_order.append(req_id)
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids_in_order), desc="Processed prompts", disable=not use_tqdm)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [finished[r] for r in ids_in_order]


def _final_only(p: SamplingParams) -> SamplingParams:
    if p.output_kind == RequestOutputKind.FINAL_ONLY:
        return p
    import dataclasses

    return dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
