"""Structured output through the real server and the real ``openai`` client on
the bundled Qwen2.5-Coder-0.5B-Instruct: ``chat.completions.parse`` with
Pydantic models, ``json_object``, the ``structured_outputs`` extra on
completions, 400s naming the problem, and the metrics."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.entrypoints import server_process
from tests.entrypoints.server_process import launch_server

pytestmark = pytest.mark.slow


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)


class Customer(BaseModel):
    name: str = Field(max_length=24)
    address: Address


class ShoppingList(BaseModel):
    items: list[str] = Field(min_length=1, max_length=4)


class Paint(BaseModel):
    color: Color
    liters: float = Field(ge=0.5, le=20)


class Verdict(BaseModel):
    approved: bool
    score: int = Field(ge=1, le=5)


class Point(BaseModel):
    x: int = Field(ge=-100, le=100)
    y: int = Field(ge=-100, le=100)


class Polygon(BaseModel):
    name: str = Field(max_length=16)
    points: list[Point] = Field(min_length=3, max_length=4)


class Book(BaseModel):
    title: str = Field(max_length=30)
    year: int = Field(ge=1450, le=2030)
    genre: Color | None


class Team(BaseModel):
    lead: Person
    size: int = Field(ge=1, le=50)


class Weather(BaseModel):
    city: str = Field(max_length=20)
    celsius: float = Field(ge=-60, le=60)
    sky: Color


CASES = [
    ("Invent a person.", Person),
    ("Invent a customer with an address.", Customer),
    ("What should I buy for a salad?", ShoppingList),
    ("Which paint should I buy for a fence?", Paint),
    ("Review this code: print('hi')", Verdict),
    ("Give a triangle.", Polygon),
    ("Recommend a book.", Book),
    ("Describe a small team.", Team),
    ("What is the weather in Oslo?", Weather),
    ("Give a point near the origin.", Point),
]


@pytest.fixture(scope="module")
def server(qwen_path):
    timeout = server_process.STARTUP_TIMEOUT_S
    server_process.STARTUP_TIMEOUT_S = max(timeout, 400)  # a 0.5B model loads slowly on a busy CPU
    try:
        with launch_server("--model", qwen_path, "--max-model-len", "1024", "--kv-cache-memory", "128M") as srv:
            yield srv
    finally:
        server_process.STARTUP_TIMEOUT_S = timeout


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_parse_returns_pydantic_objects(client, model) -> None:
    def ask(case):
        question, cls = case
        return cls, client.chat.completions.parse(
            model=model, messages=[{"role": "user", "content": question}], response_format=cls,
            max_tokens=120, temperature=0)

    with ThreadPoolExecutor(len(CASES)) as pool:  # concurrent: batched in the engine
        results = list(pool.map(ask, CASES))
    for cls, completion in results:
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, cls), completion
        assert completion.choices[0].finish_reason == "stop"


def test_json_object_always_parses(client, model) -> None:
    questions = ["Describe a dog in JSON with two short fields.", "List two fruits as a JSON object.", "Hello!"]
    for i, question in enumerate(questions):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           response_format={"type": "json_object"}, max_tokens=250,
                                           temperature=0.5 if i == 2 else 0, seed=i)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_structured_outputs_extra_on_completions(client, model) -> None:
    r = client.completions.create(model=model, prompt="The date of the moon landing is", max_tokens=20,
                                  temperature=0, n=2,
                                  extra_body={"structured_outputs": {"regex": r" [0-9]{4}-[0-9]{2}-[0-9]{2}"}})
    for c in r.choices:
        assert re.fullmatch(r" [0-9]{4}-[0-9]{2}-[0-9]{2}", c.text), c.text
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Is water wet?"}],
                                       max_tokens=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].message.content in ("yes", "no")
    grammar = 'root ::= "ANSWER: " ("A" | "B" | "C")'
    r = client.completions.create(model=model, prompt="Pick one.", max_tokens=10,
                                  extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch("ANSWER: [ABC]", r.choices[0].text)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "OK?"}], max_tokens=20,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "ok", "schema": schema,
                                                                        "strict": True}})
    assert json.loads(r.choices[0].message.content) in ({"ok": True}, {"ok": False})


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format", ["response_format.json_schema.schema", "foo"]),
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format", ["uniqueItems", "not supported"]),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs", ["structured_outputs.regex", "parenthesis"]),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs",
     ["structured_outputs.grammar", "undefined_rule"]),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", ["exactly one"]),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", ["choice"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, None, ["json_schema.schema"]),
    ({"response_format": {"type": "xml"}}, None, ["type"]),
])
def test_bad_constraints_are_400s(server, model, body: dict, param: str | None, words: list[str]) -> None:
    for path, base in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/completions", {"prompt": "hi"})):
        r = httpx.post(server.url + path, json={"model": model, "max_tokens": 5, **base, **body}, timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        for w in words:
            assert w in error["message"], error
        if param is not None:
            assert error["param"] == param


def test_metrics_count_requests_and_compiles(server, client, model) -> None:
    def scrape() -> dict[str, float]:
        text = httpx.get(server.url + "/metrics", timeout=30).text
        values = {}
        for line in text.splitlines():
            m = re.match(r'(ember:(structured_output_requests_total|grammar_compile_time_seconds_count))\{.*\} (\S+)',
                         line)
            if m:
                values[m.group(2)] = float(m.group(3))
        return values

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    before = scrape()
    for _ in range(2):  # the second one hits the compile cache
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "A digit?"}],
                                       max_tokens=10, response_format=fmt)
    after = scrape()
    assert after["structured_output_requests_total"] == before.get("structured_output_requests_total", 0) + 2
    assert after["grammar_compile_time_seconds_count"] == before.get("grammar_compile_time_seconds_count", 0) + 1
