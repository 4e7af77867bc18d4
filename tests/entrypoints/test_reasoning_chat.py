"""``--reasoning-parser``: chat completions put the text between ``<think>`` and
``</think>`` in ``reasoning_content``, streamed one character per step (so the
tags always arrive split across deltas). Fast: a fake engine, no model."""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from ember.entrypoints.cli import make_parser
from ember.entrypoints.openai.api_server import build_app
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind
from tests.entrypoints.test_protocol import EchoEngine, sse_events

MESSAGES = [{"role": "user", "content": "2+2?"}]


class ScriptEngine(EchoEngine):
    """Answers every prompt with ``script``, one character per step."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    async def generate(self, prompt, sampling_params, request_id):
        ids = self.input_processor.tokenize(prompt)
        params = self.input_processor.check(ids, sampling_params)
        for step in range(1, len(self.script) + 1):
            await asyncio.sleep(0)
            finished = step == len(self.script)
            if params.output_kind == RequestOutputKind.FINAL_ONLY and not finished:
                continue
            text = self.script[step - 1] if params.output_kind == RequestOutputKind.DELTA else self.script[:step]
            yield RequestOutput(request_id, None, ids, [CompletionOutput(0, text, [ord(c) for c in text],
                                                                         "stop" if finished else None)], finished)


def client(script: str, parser: str | None) -> TestClient:
    return TestClient(build_app(ScriptEngine(script), reasoning_parser=parser), raise_server_exceptions=False)


@pytest.mark.parametrize("parser,script,reasoning,content", [
    ("deepseek_r1", "<think>\nTwo plus two.\n</think>\n\nFour.", "\nTwo plus two.\n", "\n\nFour."),
    ("deepseek_r1", "Two plus two.</think>Four.", "Two plus two.", "Four."),
    ("deepseek_r1", "<think>Still thinking", "Still thinking", None),
    ("qwen3", "<think>Two plus two.</think>\n\nFour.", "Two plus two.", "\n\nFour."),
    ("qwen3", "Four.", None, "Four."),
])
def test_chat_reasoning(parser, script, reasoning, content):
    c = client(script, parser)
    body = c.post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    expected = {"role": "assistant", "content": content}
    if reasoning is not None:
        expected["reasoning_content"] = reasoning
    assert body["choices"][0]["message"] == expected

    resp = c.post("/v1/chat/completions", json={"messages": MESSAGES, "stream": True})
    events = sse_events(resp.text)
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    streamed_reasoning = "".join(d.get("reasoning_content", "") for d in deltas) or None
    streamed_content = "".join(d.get("content", "") for d in deltas[1:]) or None
    assert (streamed_reasoning, streamed_content) == (reasoning, content)
    assert not any("<think>" in v or "</think>" in v for d in deltas for v in d.values() if isinstance(v, str))


def test_without_parser_tags_stay_in_content():
    script = "<think>r</think>a"
    body = client(script, None).post("/v1/chat/completions", json={"messages": MESSAGES}).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": script}


def test_cli_flag():
    args = make_parser().parse_args(["serve", "--reasoning-parser", "deepseek_r1"])
    assert args.reasoning_parser == "deepseek_r1"
    assert make_parser().parse_args(["serve"]).reasoning_parser is None
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--reasoning-parser", "nope"])
