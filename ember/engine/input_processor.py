"""Turn user prompts into validated token ids (tokenization, chat templates)."""

from __future__ import annotations

from typing import Any

from ember.config import ModelConfig
from ember.sampling_params import SamplingParams
from ember.utils import check_text


class ChatTemplateError(ValueError):
    """A chat the template cannot render; ``param`` is the request field at fault
    (``messages`` or ``chat_template``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_template_syntax(template: str, name: str) -> None:
    """Parse a Jinja chat template.

    Raises:
        ChatTemplateError: it does not parse (``param`` is ``name``; the message
            gives the line and Jinja's reason).
    """
    import jinja2

    try:  # the environment Hugging Face renders templates in (its extensions and tags)
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # transformers without it: plain Jinja with loop controls
        def compile_template(text: str) -> object:
            return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    try:
        compile_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{name} is not a valid Jinja template: {e.message} (line {e.lineno})", name) from e


def load_chat_template(value: str) -> str:
    """The chat template ``--chat-template`` names: a file's contents, or
    ``value`` itself when it is a template (it holds ``{{`` or ``{%``).

    Raises:
        ValueError: neither a readable file nor a template, or a template that
            does not parse.
    """
    import os

    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            template = f.read()
    elif "{{" in value or "{%" in value:
        template = value
    else:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    check_template_syntax(template, "--chat-template")
    return template


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
        # The server's chat template (``--chat-template``); None: the tokenizer's.
        self.chat_template: str | None = None

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
                            continue_final_message: bool = False, chat_template: str | None = None,
                            chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Render ``messages`` with a chat template and tokenize.

        Args:
            messages: ``[{"role": str, "content": str, ...}, ...]`` in Hugging Face's
                conversation format: roles ``system``, ``user``, ``assistant``,
                ``tool``; other keys (``name``, ``tool_call_id``, ``tool_calls``)
                are passed to the template as given.
            add_generation_prompt: end with the opening of an assistant turn.
            continue_final_message: leave the last message (an assistant's) open,
                for the model to continue it.
            chat_template: a Jinja template to use instead of :attr:`chat_template`
                (the server's ``--chat-template``) or the tokenizer's.
            chat_template_kwargs: extra template variables (e.g. ``enable_thinking``).

        Raises:
            ChatTemplateError: no chat template, a template that does not parse
                (``param`` ``chat_template``), or a conversation the template cannot
                render (``param`` ``messages``; the message says why).
            ValueError: malformed messages (not dicts, no string role / content, or
                a string that is not Unicode text).
        """
        template = chat_template or self.chat_template
        if self.tokenizer is None or not (template or getattr(self.tokenizer, "chat_template", None)):
            raise ChatTemplateError("this model has no chat template; use a completion prompt instead or give "
                                    "chat_template", "messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] must have a string 'role' and a string 'content'")
            for key, value in m.items():
                if isinstance(value, str):
                    check_text(value, f"messages[{i}].{key}")
        if chat_template is not None:
            check_template_syntax(chat_template, "chat_template")
        # Only what differs from the defaults is passed on (any tokenizer-like object serves).
        options: dict[str, Any] = dict(chat_template_kwargs or {})
        if template is not None:
            options["chat_template"] = template
        if continue_final_message:
            options["continue_final_message"] = True
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **options)
        except Exception as e:  # jinja errors: the template rejected the conversation
            raise ChatTemplateError(f"chat template failed: {e}", "messages") from e
        # The template already contains the special tokens (BOS, role markers).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Validate length limits and attach the model's EOS ids to ``params``.

        Raises:
            ValueError: the prompt leaves no room for output in the context
                window, or an ``allowed_token_ids`` or ``stop_token_ids`` entry is
                outside the vocabulary (the message then starts with the field's name).
        """
        vocab = self.model_config.vocab_size
        params.check_vocab(vocab)
        bad = [t for t in params.stop_token_ids or () if t >= vocab]
        if bad:
            raise ValueError(f"stop_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        max_len = self.model_config.max_model_len
        n = len(prompt_token_ids)
        if n >= max_len:
            raise ValueError(
                f"prompt is {n} tokens long, which leaves no room for output in the context window "
                f"of {max_len} tokens (max_model_len)"
            )
        params._eos_token_ids = self.eos_token_ids
        return params
