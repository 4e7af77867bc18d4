"""Turn user prompts into validated token ids (tokenization, chat templates)."""

from __future__ import annotations

from typing import Any

from ember.config import ModelConfig
from ember.sampling_params import SamplingParams
from ember.structured_output.grammar import validate_structured_outputs
from ember.utils import check_text


class InputProcessor:
    """Tokenizes and validates prompts against the model's limits.

    Args:
        model_config: gives ``max_model_len`` and the vocabulary size.
        tokenizer: a ``transformers`` tokenizer (fast), or None to accept token
            ids only.
    """

    def __init__(self, model_config: ModelConfig, tokenizer: Any) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        eos = set()
        for source in (getattr(model_config.hf_config, "eos_token_id", None),
                       tokenizer.eos_token_id if tokenizer is not None else None):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, (list, tuple)):
                eos.update(source)
        self.eos_token_ids = frozenset(eos)

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt (with the tokenizer's special tokens) or a
        pre-tokenized prompt, checked.

        Raises:
            ValueError: empty prompt, wrong type, text that is not Unicode (a lone
                surrogate), or a token id outside the vocabulary ``[0, vocab_size)``;
                the message starts with ``prompt``.
        """
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text, but this engine runs without a tokenizer (skip_tokenizer_init): "
                                 "give token ids")
            ids = self.tokenizer.encode(check_text(prompt, "prompt"))
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        else:
            raise ValueError("prompt must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt must not be empty" if not prompt else
                             "prompt tokenizes to no tokens (the tokenizer drops all of its characters)")
        return ids

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Render ``messages`` with the model's chat template and tokenize.

        Args:
            messages: ``[{"role": str, "content": str, ...}, ...]`` in Hugging Face's
                conversation format: roles ``system``, ``user``, ``assistant``,
                ``tool``; other keys (``name``, ``tool_call_id``, ``tool_calls``)
                are passed to the template as given.
            tools: function definitions in OpenAI's shape
                (``{"type": "function", "function": {...}}``), given to the
                template as ``tools`` (templates that know no tools ignore them).

        Raises:
            ValueError: no chat template, malformed messages (not dicts, no
                string role / content, or a string that is not Unicode text), or
                a conversation the template cannot render (the message says why).
        """
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template; use a completion prompt instead")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must have a string 'role' and a string 'content'")
            for key, value in m.items():
                if isinstance(value, str):
                    check_text(value, f"messages[{i}].{key}")
        try:
            extra = {"tools": tools} if tools else {}
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **extra)
        except Exception as e:  # jinja errors: the template rejected the conversation
            raise ValueError(f"chat template failed: {e}") from e
        # The template already contains the special tokens (BOS, role markers).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def truncate(self, prompt_token_ids: list[int], truncate_prompt_tokens: int | None,
                 max_tokens: int | None) -> list[int]:
        """The prompt as ``truncate_prompt_tokens`` cuts it
        (``SamplingParams.truncate_prompt_tokens``): its last k tokens (all of
        them when it is shorter), or with -1 its last ``max_model_len -
        max_tokens`` (``max_tokens`` None counting as 1); None keeps it whole.

        Raises:
            ValueError: k is greater than ``max_model_len`` (the message starts
                with ``truncate_prompt_tokens``).
        """
        k = truncate_prompt_tokens
        if k is None:
            return prompt_token_ids
        max_len = self.model_config.max_model_len
        if k == -1:
            k = max(1, max_len - (max_tokens or 1))
        elif k > max_len:
            raise ValueError(f"truncate_prompt_tokens ({k}) is greater than the context window of {max_len} "
                             "tokens (max_model_len); select a smaller truncation size")
        return prompt_token_ids[-k:] if len(prompt_token_ids) > k else prompt_token_ids

    def bad_words_token_ids(self, bad_words: list[str]) -> list[list[int]]:
        """The token sequences ``bad_words`` bans: each word tokenized as is
        (less leading spaces) and after one space (a word inside text), the
        two kept when they differ; no special tokens added.

        Raises:
            ValueError: no tokenizer, or a word that tokenizes to nothing or
                to ids outside the vocabulary (the message starts with
                ``bad_words``).
        """
        if self.tokenizer is None:
            raise ValueError("bad_words needs a tokenizer (this engine runs without one: skip_tokenizer_init)")
        vocab = self.model_config.vocab_size
        sequences: list[list[int]] = []
        for word in bad_words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"bad_words: {word!r} tokenizes to no tokens")
                if any(not 0 <= t < vocab for t in ids):
                    raise ValueError(f"bad_words: {word!r} tokenizes to ids outside the vocabulary [0, {vocab})")
                if ids not in sequences:
                    sequences.append(ids)
        return sequences

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Validate length limits and attach the model's EOS ids (and the
        token sequences of ``bad_words``) to ``params``.

        Raises:
            ValueError: the prompt leaves no room for output in the context
                window, an ``allowed_token_ids``, ``logit_bias`` or
                ``stop_token_ids`` entry is outside the vocabulary, or a bad
                word cannot be tokenized (the message then starts with the
                field's name), or ``structured_outputs`` is invalid (an
                invalid schema, regex or grammar, an unsupported schema
                keyword; the message starts with ``structured_outputs.<field>``)
                or used without a tokenizer.
        """
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        if params.structured_outputs is not None:
            if self.tokenizer is None:
                raise ValueError("structured_outputs needs the model's tokenizer (this engine runs with "
                                 "skip_tokenizer_init)")
            validate_structured_outputs(params.structured_outputs)
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.bad_words:
            params._bad_words_token_ids = self.bad_words_token_ids(params.bad_words)
        max_len = self.model_config.max_model_len
        n = len(prompt_token_ids)
        if n >= max_len:
            raise ValueError(
                f"prompt is {n} tokens long, which leaves no room for output in the context window "
                f"of {max_len} tokens (max_model_len)"
            )
        params._eos_token_ids = self.eos_token_ids
        return params
