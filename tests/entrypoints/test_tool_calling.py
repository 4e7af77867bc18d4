"""Tool calling in chat completions, driven with the official ``openai`` client
in-process against a scripted engine (no model): Qwen2.5-Coder's real tokenizer
and chat template, outputs decoded token by token by the real tokenizer.

What the engine is asked (the rendered tools, the forcing grammar) is checked
here; that the engine honours the grammar is checked with the real model in
``test_server_tools.py``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from xgrammar.testing import _is_grammar_accept_string

from ember.engine.input_processor import InputProcessor
from ember.entrypoints.openai.api_server import build_app
from ember.loader.source import load_tokenizer_for
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind, SamplingParams
from tests.entrypoints.test_vllm_compat import MODEL, model_config

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                                  "required": ["a", "b"]}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "Weather in Paris, and 2 + 3?"}]
CALL_PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CALL_ADD = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_path: str) -> Any:
    return load_tokenizer_for(qwen_path)


class ToolScriptEngine:
    """AsyncLLM's interface: every choice generates ``script`` (token ids of a
    text), one token per step, and stops (``finish_reason`` ``finish``).
    ``prompts`` and ``params`` record what each request sent."""

    def __init__(self, tokenizer: Any, script: str, finish: str = "stop") -> None:
        self.model_config = model_config(tokenizer)
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(self.model_config, tokenizer)
        self.errored = False
        self.script = tokenizer.encode(script, add_special_tokens=False)
        self.finish = finish
        self.prompts: list[str] = []
        self.params: list[SamplingParams] = []

    async def generate(self, prompt: list[int], params: SamplingParams, request_id: str,
                       **_: Any) -> AsyncIterator[RequestOutput]:
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, params)
        self.prompts.append(self.tokenizer.decode(ids))
        self.params.append(params)
        steps = len(self.script)
        for step in range(1, steps + 1):
            last = step == steps
            if params.output_kind == RequestOutputKind.DELTA:
                new = self.script[step - 1:step]
            elif last:
                new = self.script
            else:
                continue
            text = self.tokenizer.decode(new, skip_special_tokens=params.skip_special_tokens)
            yield RequestOutput(request_id, None, ids, [CompletionOutput(
                i, text, new, self.finish if last else None) for i in range(params.n)], last)

    def shutdown(self) -> None:
        pass


def client_for(engine: Any, **app_kwargs: Any) -> openai.OpenAI:
    http = TestClient(build_app(engine, **app_kwargs), raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(model=MODEL, messages=kwargs.pop("messages", ASK), **kwargs)


def assembled(stream: Any) -> dict[int, dict[str, Any]]:
    """Per choice: the content, the tool calls and the finish reason a stream's chunks add up to."""
    choices: dict[int, dict[str, Any]] = {}
    for chunk in stream:
        for c in chunk.choices:
            got = choices.setdefault(c.index, {"content": "", "tool_calls": {}, "finish_reason": None})
            got["content"] += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.id is not None:  # a call's first chunk: id, type and name, arguments ""
                    assert tc.index not in got["tool_calls"] and tc.type == "function" and tc.function.name
                    assert tc.id.startswith("call_") and tc.function.arguments == ""
                    got["tool_calls"][tc.index] = {"name": tc.function.name, "arguments": ""}
                else:
                    assert tc.function.name is None
                    got["tool_calls"][tc.index]["arguments"] += tc.function.arguments
            if c.finish_reason is not None:
                got["finish_reason"] = c.finish_reason
    for got in choices.values():
        got["tool_calls"] = [got["tool_calls"][i] for i in range(len(got["tool_calls"]))]
    return choices


def message_calls(message: Any) -> list[dict[str, str]]:
    return [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def test_auto_reads_calls_and_keeps_the_text_around_them(qwen_tokenizer):
    script = "Let me check.\n" + CALL_PARIS + "\n" + CALL_ADD
    engine = ToolScriptEngine(qwen_tokenizer, script)
    client = client_for(engine)
    resp = chat(client, tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    assert message_calls(choice.message) == [{"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                             {"name": "add", "arguments": '{"a": 2, "b": 3}'}]
    ids = [c.id for c in choice.message.tool_calls]
    assert all(i.startswith("call_") and len(i) == 29 for i in ids) and len(set(ids)) == 2
    # The tools reached the chat template (Qwen's <tools> block); no grammar in auto mode.
    assert "<tools>\n" + json.dumps(WEATHER) in engine.prompts[0]
    assert engine.params[0].structured_outputs is None
    streamed = assembled(chat(client, tools=TOOLS, stream=True))
    assert streamed == {0: {"content": "Let me check.", "tool_calls": message_calls(choice.message),
                            "finish_reason": "tool_calls"}}


def test_stream_chunk_shapes(qwen_tokenizer):
    client = client_for(ToolScriptEngine(qwen_tokenizer, CALL_ADD))
    http = client._client
    resp = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS, "stream": True})
    events = [json.loads(line[6:]) for line in resp.text.split("\n\n") if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls[0][0]["id"]) == 29
    assert calls == [[{"index": 0, "id": calls[0][0]["id"], "type": "function",
                       "function": {"name": "add", "arguments": ""}}],
                     [{"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}]]
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "tool_calls"
    assert not any("<tool_call>" in d.get("content", "") for d in deltas)


def test_malformed_call_is_content(qwen_tokenizer):
    bad = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": }\n</tool_call>'
    client = client_for(ToolScriptEngine(qwen_tokenizer, bad))
    choice = chat(client, tools=TOOLS).choices[0]
    assert (choice.message.content, choice.message.tool_calls, choice.finish_reason) == (bad, None, "stop")
    assert assembled(chat(client, tools=TOOLS, stream=True)) == {
        0: {"content": bad, "tool_calls": [], "finish_reason": "stop"}}


def test_cut_by_max_tokens_keeps_length(qwen_tokenizer):
    client = client_for(ToolScriptEngine(qwen_tokenizer, CALL_ADD, finish="length"))
    choice = chat(client, tools=TOOLS).choices[0]
    assert choice.finish_reason == "length" and len(choice.message.tool_calls) == 1


def test_none_renders_no_tools_and_reads_no_calls(qwen_tokenizer):
    engine = ToolScriptEngine(qwen_tokenizer, CALL_ADD)
    choice = chat(client_for(engine), tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.content == CALL_ADD and choice.message.tool_calls is None
    assert "<tools>" not in engine.prompts[0]
    # Without tools nothing changes either: the text is content.
    assert chat(client_for(engine)).choices[0].message.content == CALL_ADD


@pytest.mark.parametrize("parallel", [None, True, False])
def test_required_forces_calls_of_the_offered_tools(qwen_tokenizer, parallel):
    engine = ToolScriptEngine(qwen_tokenizer, CALL_PARIS + "\n" + CALL_ADD)
    extra = {} if parallel is None else {"parallel_tool_calls": parallel}
    choice = chat(client_for(engine), tools=TOOLS, tool_choice="required", **extra).choices[0]
    grammar = engine.params[0].structured_outputs.grammar
    two_calls = CALL_PARIS + "\n" + CALL_ADD
    assert _is_grammar_accept_string(grammar, CALL_PARIS) and _is_grammar_accept_string(grammar, CALL_ADD)
    assert _is_grammar_accept_string(grammar, two_calls) == (parallel is not False)
    assert not _is_grammar_accept_string(grammar, CALL_PARIS.replace("Paris", "Paris\", \"x\": \"1"))
    assert not _is_grammar_accept_string(grammar, "Sure. " + CALL_PARIS)
    assert len(choice.message.tool_calls) == (1 if parallel is False else 2)


def test_named_function_forces_one_call_of_it(qwen_tokenizer):
    engine = ToolScriptEngine(qwen_tokenizer, CALL_ADD)
    choice = chat(client_for(engine), tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "add"}}).choices[0]
    grammar = engine.params[0].structured_outputs.grammar
    assert _is_grammar_accept_string(grammar, CALL_ADD)
    assert not _is_grammar_accept_string(grammar, CALL_PARIS)
    assert not _is_grammar_accept_string(grammar, CALL_ADD + "\n" + CALL_ADD)
    assert message_calls(choice.message) == [{"name": "add", "arguments": '{"a": 2, "b": 3}'}]
    assert "<tools>" in engine.prompts[0] and json.dumps(WEATHER) in engine.prompts[0]  # all tools are shown


def test_n_choices_are_parsed_each(qwen_tokenizer):
    client = client_for(ToolScriptEngine(qwen_tokenizer, CALL_ADD))
    resp = chat(client, tools=TOOLS, n=2)
    assert [message_calls(c.message) for c in resp.choices] == [[{"name": "add", "arguments": '{"a": 2, "b": 3}'}]] * 2
    streamed = assembled(chat(client, tools=TOOLS, n=2, stream=True))
    assert [streamed[i]["tool_calls"] for i in range(2)] == [message_calls(c.message) for c in resp.choices]


def test_parallel_false_in_auto_returns_the_first_call(qwen_tokenizer):
    client = client_for(ToolScriptEngine(qwen_tokenizer, CALL_PARIS + "\n" + CALL_ADD))
    choice = chat(client, tools=TOOLS, parallel_tool_calls=False).choices[0]
    assert [c["name"] for c in message_calls(choice.message)] == ["get_weather"]
    streamed = assembled(chat(client, tools=TOOLS, parallel_tool_calls=False, stream=True))
    assert streamed[0]["tool_calls"] == message_calls(choice.message) and streamed[0]["content"] == ""


def test_calls_are_read_from_the_answer_after_the_reasoning(qwen_tokenizer):
    script = "<think>I need the adder.</think>\n\n" + CALL_ADD
    client = client_for(ToolScriptEngine(qwen_tokenizer, script), reasoning_parser="qwen3")
    body = client._client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK, "tools": TOOLS}).json()
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "I need the adder." and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [{"name": "add", "arguments": '{"a": 2, "b": 3}'}]
    streamed = assembled(chat(client, tools=TOOLS, stream=True))
    assert streamed[0]["tool_calls"] == [c["function"] for c in message["tool_calls"]]


def test_history_with_calls_and_results_renders(qwen_tokenizer):
    engine = ToolScriptEngine(qwen_tokenizer, "It is 22 C in Paris.")
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 22}'}]
    choice = chat(client_for(engine), messages=history, tools=TOOLS).choices[0]
    assert choice.message.content == "It is 22 C in Paris." and choice.finish_reason == "stop"
    assert engine.prompts[0].endswith(
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp": 22}\n</tool_response><|im_end|>\n<|im_start|>assistant\n')


def bad_request(client: openai.OpenAI, **kwargs: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, **kwargs)
    return exc.value.response.json()["error"]


def test_bad_tool_requests_are_400_naming_the_problem(qwen_tokenizer):
    client = client_for(ToolScriptEngine(qwen_tokenizer, CALL_ADD))
    err = bad_request(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err["param"] == "tool_choice" and "'nope', which is not in tools" in err["message"]
    err = bad_request(client, tool_choice="required")
    assert err["param"] == "tool_choice" and "needs tools" in err["message"]
    err = bad_request(client, tool_choice={"type": "function", "function": {"name": "add"}})
    assert err["param"] == "tool_choice" and "needs tools" in err["message"]
    err = bad_request(client, tools=[])
    assert err["param"] == "tools"
    err = bad_request(client, tools=[ADD, ADD])
    assert err["param"] == "tools" and "repeats the function name 'add'" in err["message"]
    err = bad_request(client, tools=[{"type": "function", "function": {"name": "a b"}}])
    assert err["param"] == "tools" and "name must be 1 to 64 letters" in err["message"]
    err = bad_request(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}])
    assert err["param"] == "tools" and "type 'object'" in err["message"]
    err = bad_request(client, tools=[{"type": "retrieval"}])
    assert err["param"] == "tools"
    err = bad_request(client, tools=TOOLS, tool_choice="sometimes")
    assert err["param"] == "tool_choice"
    unsupported = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "frobnicate"}}}}}
    err = bad_request(client, tools=[unsupported], tool_choice="required")
    assert err["param"] == "tools" and "tool 'f' is not supported" in err["message"] and "frobnicate" in err["message"]
    # auto does not compile the schema: the template shows it, the model may call it.
    assert chat(client, tools=[unsupported]).choices[0].finish_reason == "tool_calls"


def test_server_without_a_tool_format(qwen_tokenizer, smollm2_path):
    # SmolLM2's template teaches no tool format: auto and forced calls are refused, none is fine.
    smol = load_tokenizer_for(smollm2_path)
    client = client_for(ToolScriptEngine(smol, "Hi"))
    err = bad_request(client, tools=TOOLS)
    assert err["param"] == "tool_choice" and "--tool-call-parser" in err["message"]
    assert chat(client, tools=TOOLS, tool_choice="none").choices[0].message.content == "Hi"
    # ... unless the server is told which format to read.
    client = client_for(ToolScriptEngine(smol, CALL_ADD), tool_call_parser="hermes")
    assert [c.function.name for c in chat(client, tools=TOOLS).choices[0].message.tool_calls] == ["add"]


def test_langchain_bind_tools_round_trip(qwen_tokenizer):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    engine = ToolScriptEngine(qwen_tokenizer, CALL_PARIS)
    http = TestClient(build_app(engine), raise_server_exceptions=False)
    llm = ChatOpenAI(base_url="http://testserver/v1", api_key="x", model=MODEL, http_client=http, max_retries=0)

    def get_weather(city: str, unit: str = "celsius") -> str:
        """Current weather in a city."""
        return "22"

    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke([HumanMessage("Weather in Paris?")])
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert engine.params[0].structured_outputs.grammar is not None
    engine.script = qwen_tokenizer.encode("It is 22 C.", add_special_tokens=False)
    answer = llm.bind_tools([get_weather]).invoke(
        [HumanMessage("Weather in Paris?"), ai, ToolMessage("22", tool_call_id=ai.tool_calls[0]["id"])])
    assert answer.content == "It is 22 C." and answer.tool_calls == []
    assert "<tool_response>\n22\n</tool_response>" in engine.prompts[-1]
    engine.script = qwen_tokenizer.encode(CALL_PARIS, add_special_tokens=False)
    chunks = list(llm.bind_tools([get_weather]).stream([HumanMessage("Weather in Paris?")]))
    streamed = chunks[0]
    for chunk in chunks[1:]:
        streamed = streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_deepseek_v3_reads_its_tokens_with_special_tokens_kept(qwen_tokenizer):
    call = ("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>add\n```json\n"
            '{"a": 2, "b": 3}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
    engine = ToolScriptEngine(qwen_tokenizer, call)
    choice = chat(client_for(engine, tool_call_parser="deepseek_v3"), tools=TOOLS, tool_choice="required").choices[0]
    assert message_calls(choice.message) == [{"name": "add", "arguments": '{"a": 2, "b": 3}'}]
    params = engine.params[0]
    assert params.skip_special_tokens is False and _is_grammar_accept_string(params.structured_outputs.grammar, call)
