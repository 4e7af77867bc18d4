"""Turn user prompts into validated token ids (tokenization, chat templates).

Chat messages are tokenized so that their text stays text: a special token's
string inside a message (``<|im_end|>`` in a user's content) is encoded as the
characters it spells, never as the control token, so that no message can close
its own turn and open another role's (role spoofing). Only the special tokens
the chat template itself writes become control tokens. How: each special-token
string in the messages is replaced by a random placeholder before rendering;
the rendered text is cut at the template's special tokens, and each piece between
them is tokenized with the placeholders restored and special-token matching off
(a copy of the tokenizer with ``encode_special_tokens``). A conversation without
special-token strings takes the plain path (render, then encode), which gives the
same ids as this one would.
"""

from __future__ import annotations

import re
import threading
import uuid
from typing import Any

from ember.config import ModelConfig
from ember.sampling_params import SamplingParams
from ember.structured_output.grammar import validate_structured_outputs
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
        # The special tokens' strings (longest first, so that a regex alternation
        # prefers the longest match), and the matcher of any of them.
        specials = sorted({t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                           if getattr(t, "special", False) and t.content}, key=len, reverse=True)
        self._special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
        self._special_re = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._text_tokenizer: Any = None  # built on first use (see _encode_as_text)
        self._text_tokenizer_lock = threading.Lock()
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
                            tools: list[dict[str, Any]] | None = None,
                            special_tokens_in_content: bool = False,
                            continue_final_message: bool = False, chat_template: str | None = None,
                            chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Render ``messages`` with a chat template and tokenize.

        Args:
            messages: ``[{"role": str, "content": str, ...}, ...]`` in Hugging Face's
                conversation format: roles ``system`` (or ``developer``, OpenAI's
                newer name for it), ``user``, ``assistant``, ``tool``; other keys (``name``, ``tool_call_id``, ``tool_calls``)
                are passed to the template as given.
            add_generation_prompt: end with the opening of an assistant turn.
            continue_final_message: leave the last message (an assistant's) open,
                for the model to continue it.
            chat_template: a Jinja template to use instead of :attr:`chat_template`
                (the server's ``--chat-template``) or the tokenizer's.
            chat_template_kwargs: extra template variables (e.g. ``enable_thinking``).
            tools: function definitions in OpenAI's shape
                (``{"type": "function", "function": {...}}``), given to the
                template as ``tools`` (templates that know no tools ignore them).
            special_tokens_in_content: let special-token strings in the messages
                become control tokens (for trusted clients that write them on
                purpose); by default they stay text (see the module docstring).

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
        # OpenAI's newer name for the system role, which chat templates do not know.
        messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
        if chat_template is not None:
            check_template_syntax(chat_template, "chat_template")
        # Only what differs from the defaults is passed on (any tokenizer-like object serves).
        options: dict[str, Any] = dict(chat_template_kwargs or {})
        if template is not None:
            options["chat_template"] = template
        if continue_final_message:
            options["continue_final_message"] = True
        if (not special_tokens_in_content and self._special_re is not None
                and (_has_match(self._special_re, messages) or (tools and _has_match(self._special_re, tools)))):
            return self._apply_chat_template_as_text(messages, add_generation_prompt, tools, options)
        text = self._render(messages, add_generation_prompt, tools, options)
        # The template already contains the special tokens (BOS, role markers).
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None, options: dict[str, Any]) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tokenize=False, **extra, **options)
        except Exception as e:  # jinja errors: the template rejected the conversation
            raise ChatTemplateError(f"chat template failed: {e}", "messages") from e

    def _apply_chat_template_as_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                                     tools: list[dict[str, Any]] | None,
                                     options: dict[str, Any] | None = None) -> list[int]:
        """The messages' token ids with every special-token string in them encoded
        as text (see the module docstring)."""
        assert self._special_re is not None
        nonce = f"x{uuid.uuid4().hex}"  # letters and digits: templates and JSON keep it as is
        found: dict[str, int] = {}

        def hide(match: re.Match[str]) -> str:
            return f"{nonce}{found.setdefault(match.group(), len(found))}_"

        rendered = self._render(_map_strings(messages, lambda v: self._special_re.sub(hide, v)),
                                add_generation_prompt,
                                _map_strings(tools, lambda v: self._special_re.sub(hide, v)) if tools else None,
                                options or {})
        strings = list(found)
        placeholder = re.compile(rf"{nonce}(\d+)_")
        ids: list[int] = []
        end = 0
        for match in [*self._special_re.finditer(rendered), None]:  # the template's own special tokens
            piece = rendered[end:match.start() if match is not None else len(rendered)]
            if piece:
                ids.extend(self._encode_as_text(placeholder.sub(lambda m: strings[int(m.group(1))], piece)))
            if match is not None:
                ids.append(self._special_ids[match.group()])
                end = match.end()
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        """Token ids of ``text`` with special-token strings in it encoded as the
        characters they spell (no BOS/EOS added)."""
        with self._text_tokenizer_lock:
            if self._text_tokenizer is None:
                from tokenizers import Tokenizer

                # NOTE: a copy: encode_special_tokens is a setting of the tokenizer
                # object, and the shared one is used from other threads meanwhile.
                backend = self.tokenizer.backend_tokenizer
                copy = Tokenizer.from_str(backend.to_str())
                copy.encode_special_tokens = True
                self._text_tokenizer = copy
        return self._text_tokenizer.encode(text, add_special_tokens=False).ids

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


def _map_strings(value: Any, fn: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, strings, numbers) with ``fn`` applied
    to every string in it, dict keys included."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def _has_match(pattern: re.Pattern[str], value: Any) -> bool:
    """Whether ``pattern`` occurs in any string in ``value`` (JSON-like), dict keys included."""
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, dict):
        return any(_has_match(pattern, k) or _has_match(pattern, v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_has_match(pattern, v) for v in value)
    return False
