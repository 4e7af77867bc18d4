"""Tool calling against the real server (``ember serve``) on the bundled
Qwen2.5-Coder-0.5B-Instruct, with the official ``openai`` client and LangChain.

``tool_choice`` ``required`` and named are forced by the grammar the server
builds (the engine enforces ``structured_outputs``): every call's arguments
parse and validate against its tool's schema, streamed or not, and the
streamed chunks assemble to the non-streamed answer for the same seed. One
server for the module; requests go concurrently so that the engine batches them.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import openai
import pytest

from tests.entrypoints.server_process import launch_server

MAX_TOKENS = 96


def function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": properties, "required": required}}}


TOOLS = [
    function("get_weather", "Current weather in a city", {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["city"]),
    function("add", "Add two numbers", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"]),
    function("set_alarm", "Set an alarm clock", {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "minute": {"type": "integer", "minimum": 0, "maximum": 59},
        "label": {"type": "string", "maxLength": 30}}, ["hour", "minute"]),
    function("create_event", "Create a calendar event", {
        "title": {"type": "string", "maxLength": 40},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "when": {"type": "object", "properties": {"day": {"type": "string", "enum": ["mon", "tue", "wed", "thu",
                                                                                      "fri"]},
                                                  "hour": {"type": "integer", "minimum": 8, "maximum": 18}},
                 "required": ["day", "hour"]}}, ["title", "when"]),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What's the weather like in Paris?", "Is it cold in Oslo right now, in fahrenheit?", "What is 2 plus 3?",
    "Add 1.5 and -7.", "Wake me up at 6:30.", "Set an alarm for 7 pm called dinner.",
    "Schedule a meeting with Ann and Bob on Tuesday at 10.", "Plan a code review on Friday at 3pm.",
    "How warm is Tokyo?", "Sum 100 and 250.", "I need an alarm at 5 in the morning.",
    "Book a standup on Monday at 9 with Carl.", "Weather in Lima please.", "What's 12 + 30?",
    "Remind me at 22:15 to sleep.", "Create a lunch event on Wednesday at noon.", "Is it raining in Cairo?",
    "Compute 0.1 + 0.2.", "Alarm at 8:05 labelled gym.", "Set up a retro Thursday 4pm with the team.",
]
# Prompts 0..9 let the model pick among the tools; 10..19 name the tool (the one the prompt is about).
CHOICES: list[Any] = ["required"] * 10 + [
    {"type": "function", "function": {"name": name}}
    for name in ["get_weather", "add", "set_alarm", "create_event", "get_weather", "add", "set_alarm",
                 "create_event", "get_weather", "add"]]


@pytest.fixture(scope="module")
def server(qwen_path: str) -> Any:
    # NOTE: loading the 0.5B model takes a minute on a busy CPU: more than SmolLM2's start-up bound.
    with launch_server("--model", qwen_path, "--max-model-len", "1024", "--kv-cache-memory", "512M",
                       startup_timeout=360) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="x", max_retries=0, timeout=600)


def ask(client: openai.OpenAI, i: int, stream: bool) -> Any:
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": PROMPTS[i]}], tools=TOOLS,
        tool_choice=CHOICES[i], max_tokens=MAX_TOKENS, temperature=0.7, seed=i, stream=stream)


def assembled(stream: Any) -> tuple[str | None, list[dict[str, str]], str | None]:
    """The content, tool calls and finish reason a stream's chunks add up to."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            for tc in c.delta.tool_calls or []:
                if tc.id is not None:
                    calls[tc.index] = {"name": tc.function.name, "arguments": tc.function.arguments or ""}
                else:
                    calls[tc.index]["arguments"] += tc.function.arguments
            finish = c.finish_reason or finish
    return content or None, [calls[i] for i in range(len(calls))], finish


def test_forced_calls_validate_and_stream_as_they_answer(client):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda i: ask(client, i, stream=False), range(len(PROMPTS))))
        streams = list(pool.map(lambda i: assembled(ask(client, i, stream=True)), range(len(PROMPTS))))
    for i, (resp, streamed) in enumerate(zip(answers, streams)):
        choice = resp.choices[0]
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in choice.message.tool_calls]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, (i, choice)
        assert calls, i
        for call in calls:
            jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])
        if isinstance(CHOICES[i], dict):
            assert [c["name"] for c in calls] == [CHOICES[i]["function"]["name"]]
        assert streamed == (None, calls, "tool_calls"), i


def test_a_tool_result_continues_to_a_text_answer(client):
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What's the weather like in Paris?"}]
    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=MAX_TOKENS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments)
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 22, "unit": "celsius"}'}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, tool_choice="none",
                                            max_tokens=48, temperature=0)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and choice.message.content and "22" in choice.message.content


def test_langchain_bind_tools_round_trip(server):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    def add(a: float, b: float) -> float:
        """Add two numbers."""
        return a + b

    llm = ChatOpenAI(base_url=f"{server}/v1", api_key="x", model=openai.OpenAI(
        base_url=f"{server}/v1", api_key="x").models.list().data[0].id, temperature=0, max_tokens=MAX_TOKENS,
        max_retries=0)
    question = HumanMessage("What is 2 plus 3?")
    ai = llm.bind_tools([add], tool_choice="add").invoke([question])
    (call,) = ai.tool_calls
    assert call["name"] == "add" and set(call["args"]) == {"a", "b"}
    result = ToolMessage(str(add(**call["args"])), tool_call_id=call["id"])
    answer = llm.bind_tools([add], tool_choice="none").invoke([question, ai, result])
    assert answer.tool_calls == [] and isinstance(answer.content, str) and answer.content


def test_unknown_tool_is_400(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=client.models.list().data[0].id, messages=[{"role": "user",
                                                                                           "content": "Hi"}],
                                       tools=TOOLS, tool_choice={"type": "function", "function": {"name": "fly"}})
    assert exc.value.response.json()["error"]["param"] == "tool_choice"
