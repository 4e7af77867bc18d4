"""vLLM-compatible request and response details of the OpenAI server, driven with the
official ``openai`` client in-process (its HTTP client is the app's TestClient).

The chat templates are the bundled models' own (SmolLM2-135M-Instruct's and
Qwen2.5-Coder-0.5B-Instruct's); the engine is a scripted fake (no model) that
answers every request with the same tokens, decoded by the real tokenizer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient

from ember.config import ModelConfig
from ember.engine.input_processor import InputProcessor
from ember.entrypoints.openai.api_server import build_app
from ember.entrypoints.openai.protocol import ChatCompletionRequest
from ember.loader.source import load_tokenizer_for
from ember.outputs import CompletionOutput, RequestOutput, SampleLogprob
from ember.sampling_params import RequestOutputKind, SamplingParams

MODEL = "scripted"
MAX_MODEL_LEN = 512


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path: str) -> Any:
    return load_tokenizer_for(smollm2_path)


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_path: str) -> Any:
    return load_tokenizer_for(qwen_path)


def model_config(tokenizer: Any, path: str = "/models/scripted") -> ModelConfig:
    hf_config = SimpleNamespace(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, num_hidden_layers=1)
    return ModelConfig(model=path, hf_config=hf_config, architecture="Fake", dtype=torch.float32,
                       max_model_len=MAX_MODEL_LEN, served_model_name=MODEL)


def template_ids(tokenizer: Any, messages: list[dict[str, Any]]) -> list[int]:
    """Prompt token ids of a chat request's ``messages``, as the server renders them."""
    request = ChatCompletionRequest.model_validate({"messages": messages})
    return InputProcessor(model_config(tokenizer), tokenizer).apply_chat_template(request.message_dicts())


class ScriptedEngine:
    """AsyncLLM's interface: every request generates ``script`` (choice i stops i
    tokens early), one token per step, its text decoded by the real tokenizer
    (``skip_special_tokens`` as asked); logprob of output token k is ``-(k + 1) / 4``."""

    def __init__(self, tokenizer: Any, script: list[int]) -> None:
        self.model_config = model_config(tokenizer)
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(self.model_config, tokenizer)
        self.errored = False
        self.script = script

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str,
                       **_: Any) -> AsyncIterator[RequestOutput]:
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, params)
        tokens = [self.script[:len(self.script) - i] for i in range(params.n)]

        def output(i: int, start: int, end: int) -> CompletionOutput:
            new = tokens[i][start:end]
            text = self.tokenizer.decode(new, skip_special_tokens=params.skip_special_tokens)
            logprobs = [SampleLogprob(t, -(start + k + 1) / 4, 1) for k, t in enumerate(new)]
            return CompletionOutput(i, text, new, "length" if end == len(tokens[i]) else None, None,
                                    logprobs if params.logprobs is not None else None)

        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [SampleLogprob(t, -1.0, 1) for t in ids[1:]]
        steps = len(tokens[0])
        for step in range(1, steps + 1):
            if params.output_kind == RequestOutputKind.DELTA:
                outputs = [output(i, step - 1, step) for i in range(params.n) if step <= len(tokens[i])]
            elif step == steps:
                outputs = [output(i, 0, len(tokens[i])) for i in range(params.n)]
            else:
                continue
            yield RequestOutput(request_id, None, ids, outputs, step == steps, prompt_logprobs=prompt_logprobs)

    def shutdown(self) -> None:
        pass


def openai_client(engine: ScriptedEngine) -> openai.OpenAI:
    http = TestClient(build_app(engine), raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


def error_of(exc: pytest.ExceptionInfo[openai.APIStatusError]) -> dict[str, Any]:
    assert exc.value.status_code == 400
    return exc.value.response.json()["error"]


# ---------------------------------------------------------------- chat roles and the templates


@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_developer_and_text_parts_render_as_system_and_plain_content(which: str, request) -> None:
    tokenizer = request.getfixturevalue(f"{which}_tokenizer")
    system = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi\nthere"}]
    expected = template_ids(tokenizer, system)
    assert "Answer briefly." in tokenizer.decode(expected)
    developer = [{"role": "developer", "content": "Answer briefly."}, system[1]]
    assert template_ids(tokenizer, developer) == expected
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Answer briefly."}]},
             {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}],
              "name": "ann"}]
    assert template_ids(tokenizer, parts) == expected  # parts joined with "\n"; these templates ignore name


TOOL_CHAT = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "22C"}]},
]


def test_tool_calls_and_tool_results_reach_the_template(qwen_tokenizer, smollm2_tokenizer) -> None:
    text = qwen_tokenizer.decode(template_ids(qwen_tokenizer, TOOL_CHAT))
    # Qwen2.5's template: the call with its arguments as JSON, the result as a tool response.
    assert text.endswith(
        '<|im_start|>user\nWeather in Paris?<|im_end|>\n'
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        '<|im_end|>\n<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    # SmolLM2's template knows only role and content: the tool message is a "tool" turn.
    text = smollm2_tokenizer.decode(template_ids(smollm2_tokenizer, TOOL_CHAT))
    assert text.endswith("<|im_start|>assistant\n<|im_end|>\n<|im_start|>tool\n22C<|im_end|>\n"
                         "<|im_start|>assistant\n")


def test_chat_request_errors_name_the_problem(smollm2_tokenizer) -> None:
    engine = ScriptedEngine(smollm2_tokenizer, smollm2_tokenizer.encode(" ok"))
    client = openai_client(engine)
    user = {"role": "user", "content": "hi"}
    cases = [
        ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url",
                                                                        "image_url": {"url": "http://x/y.png"}}]}],
         "content[1] has type 'image_url'; only text parts"),
        ([{"role": "tool", "content": "22C"}], "a tool message needs tool_call_id"),
        ([user, {"role": "user", "content": "x", "tool_call_id": "c"}], "tool_call_id belongs to tool messages"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "tool_calls belongs to assistant messages"),
    ]
    for messages, match in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=messages)
        err = error_of(exc)
        assert match in err["message"] and err["param"] == "messages", err
    # A conversation the template itself rejects is a 400 with the template's reason, not a 500.
    engine.tokenizer.chat_template, saved = (
        "{% if messages[-1].role != 'user' %}{{ raise_exception('the last message must be from the user') }}"
        "{% endif %}{{ messages[-1].content }}", engine.tokenizer.chat_template)
    try:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=[user, {"role": "assistant", "content": "x"}])
        err = error_of(exc)
        assert "chat template failed: the last message must be from the user" in err["message"], err
        assert err["param"] == "messages"
    finally:
        engine.tokenizer.chat_template = saved


# ---------------------------------------------------------------- streaming usage, stop_token_ids, models


def test_stream_options_need_a_stream(smollm2_tokenizer) -> None:
    client = openai_client(ScriptedEngine(smollm2_tokenizer, smollm2_tokenizer.encode(" ok")))
    for create, body in ((client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]}),
                         (client.completions.create, {"prompt": "hi"})):
        with pytest.raises(openai.BadRequestError) as exc:
            create(model=MODEL, stream=False, stream_options={"include_usage": True}, **body)
        err = error_of(exc)
        assert err["param"] == "stream_options" and "stream_options can only be set when stream is true" in \
            err["message"], err


def test_continuous_usage_stats(smollm2_tokenizer) -> None:
    script = smollm2_tokenizer.encode(" one two three")
    assert len(script) == 3
    client = openai_client(ScriptedEngine(smollm2_tokenizer, script))
    options = {"include_usage": True, "continuous_usage_stats": True}
    messages = [{"role": "user", "content": "Count."}]
    num_prompt = len(template_ids(smollm2_tokenizer, messages))
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, n=2, stream=True,
                                                 stream_options=options))
    *choice_chunks, last = chunks
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (num_prompt, 3 + 2)
    seen = [0, 0]  # tokens of each choice so far, from the chunks' text
    for c in choice_chunks:
        (choice,) = c.choices
        if choice.delta.content:
            seen[choice.index] += 1  # one token per content chunk
        assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
            num_prompt, seen[choice.index], num_prompt + seen[choice.index]), c
    assert seen == [3, 2]
    # Completions: the echoed prompt comes first with no completion tokens.
    prompt = "Count:"
    num_prompt = len(smollm2_tokenizer.encode(prompt))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, max_tokens=3, stream=True,
                                            stream_options=options))
    assert [(c.choices[0].text if c.choices else None, c.usage.completion_tokens) for c in chunks] == [
        ("Count:", 0), (" one", 1), (" two", 2), (" three", 3), (None, 3)]
    assert all(c.usage.prompt_tokens == num_prompt for c in chunks)
    # Without continuous_usage_stats only the last chunk carries usage.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True}))
    assert [c.usage is not None for c in chunks] == [False, False, False, True]


def test_stop_token_ids_outside_the_vocabulary(smollm2_tokenizer) -> None:
    vocab = len(smollm2_tokenizer)
    engine = ScriptedEngine(smollm2_tokenizer, smollm2_tokenizer.encode(" ok"))
    client = openai_client(engine)
    for create, body in ((client.chat.completions.create, {"messages": [{"role": "user", "content": "hi"}]}),
                         (client.completions.create, {"prompt": ["hi", "there"]})):
        with pytest.raises(openai.BadRequestError) as exc:
            create(model=MODEL, extra_body={"stop_token_ids": [2, vocab]}, **body)
        err = error_of(exc)
        assert err["param"] == "stop_token_ids", err
        assert err["message"] == f"stop_token_ids: token id {vocab} is outside the vocabulary [0, {vocab})"
        create(model=MODEL, extra_body={"stop_token_ids": [2, vocab - 1]}, **body)  # the last id is fine
    # The offline LLM checks its requests with the same InputProcessor.check.
    check = engine.input_processor.check
    assert check([1], SamplingParams(stop_token_ids=[vocab - 1])).stop_token_ids == [vocab - 1]
    with pytest.raises(ValueError, match=rf"^stop_token_ids: token id {vocab + 5} is outside the vocabulary"):
        check([1], SamplingParams(stop_token_ids=[0, vocab + 5]))


def test_model_card_root_and_parent(smollm2_tokenizer) -> None:
    client = openai_client(ScriptedEngine(smollm2_tokenizer, [1]))
    (card,) = client.models.list().data
    assert (card.id, card.root, card.parent, card.max_model_len) == (MODEL, "/models/scripted", None, MAX_MODEL_LEN)
    assert "parent" in card.model_dump()  # sent as null, not left out


# ---------------------------------------------------------------- text_offset and special tokens


def test_text_offset_skips_special_tokens_dropped_from_the_text(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    script = tok.encode(" yes<|im_end|> no")
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in script and tok.decode([end], skip_special_tokens=True) == ""
    client = openai_client(ScriptedEngine(tok, script))
    prompt = "Q<|im_end|>A"
    prompt_ids = tok.encode(prompt)
    assert end in prompt_ids
    resp = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0, max_tokens=len(script))
    (choice,) = resp.choices
    assert choice.text == prompt + " yes no"  # the echoed prompt keeps its special token, the output drops it
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in prompt_ids + script]
    # Each offset is where the token's text starts in choice.text; the dropped <|im_end|>
    # sits, empty, where the text goes on.
    expected, offset = [], 0
    for i, t in enumerate(prompt_ids + script):
        expected.append(offset)
        if not (i >= len(prompt_ids) and t == end):
            offset += len(tok.decode([t]))
    assert lp.text_offset == expected
    for token, start in zip(lp.tokens, lp.text_offset, strict=True):
        if token != "<|im_end|>" or start < len(prompt):
            assert choice.text[start:start + len(token)] == token
    assert offset == len(choice.text)
    # Streamed, the offsets are the same; with skip_special_tokens false the token is text and counts.
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=0,
                                            max_tokens=len(script), stream=True))
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == expected
    resp = client.completions.create(model=MODEL, prompt=prompt, logprobs=0, max_tokens=len(script),
                                     extra_body={"skip_special_tokens": False})
    (choice,) = resp.choices
    assert choice.text == " yes<|im_end|> no"
    starts = [0]
    for token in choice.logprobs.tokens[:-1]:
        starts.append(starts[-1] + len(token))
    assert choice.logprobs.text_offset == starts
