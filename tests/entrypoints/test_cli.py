"""The ``ember`` command line: parser and chat session in-process, then the real
commands (generate, chat, download) as subprocesses on the bundled model."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ember.entrypoints.cli import ChatSession, make_parser
from ember.outputs import CompletionOutput, RequestOutput
from ember.sampling_params import RequestOutputKind, SamplingParams

EMBER = [sys.executable, "-m", "ember.entrypoints.cli"]
SMALL = ["--kv-cache-memory", "64M", "--max-model-len", "512"]


def run_ember(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([*EMBER, *args], input=stdin, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


# ---------------------------------------------------------------- in-process


def test_parser() -> None:
    parser = make_parser()
    args = parser.parse_args(["serve"])
    assert (args.model, args.model_tag, args.host, args.port) == (None, None, "127.0.0.1", 8000)
    args = parser.parse_args(["serve", "some/model.gguf", "--port", "0", "--max-model-len", "256",
                              "--kv-cache-memory", "256M"])
    assert (args.model_tag, args.port, args.max_model_len, args.kv_cache_memory) == ("some/model.gguf", 0, 256, 256 << 20)
    args = parser.parse_args(["generate", "-p", "a", "-p", "b", "--max-tokens", "8", "--temperature", "0", "--chat"])
    assert (args.prompt, args.max_tokens, args.temperature, args.chat, args.model) == (["a", "b"], 8, 0.0, True, None)
    assert parser.parse_args(["download"]).names == []
    with pytest.raises(SystemExit):
        parser.parse_args([])


class EchoChatEngine:
    """Replies with the number of messages it was given and the last one's text."""

    def __init__(self) -> None:
        self.input_processor = SimpleNamespace(
            apply_chat_template=lambda messages: [len(messages)] + [ord(c) for c in messages[-1]["content"]],
            check=lambda ids, params: params,
        )

    async def generate(self, prompt, params, request_id):
        assert params.output_kind == RequestOutputKind.DELTA
        words = [f"{prompt[0]}:", "".join(chr(c) for c in prompt[1:])]
        for i, w in enumerate(words):
            last = i == len(words) - 1
            yield RequestOutput(request_id, None, prompt, [CompletionOutput(0, w, [0], "stop" if last else None)], last)


def test_chat_session_keeps_history() -> None:
    session = ChatSession(EchoChatEngine(), SamplingParams(max_tokens=8), system="be brief")
    out = io.StringIO()
    assert asyncio.run(session.reply("hi", out)) == "2:hi"
    assert asyncio.run(session.reply("again", out)) == "4:again"  # system, user, assistant, user
    assert out.getvalue() == "2:hi\n4:again\n"
    assert [m["role"] for m in session.history] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.history == [{"role": "system", "content": "be brief"}]


# ---------------------------------------------------------------- subprocesses (real model)


def test_generate() -> None:
    proc = run_ember("generate", "--prompt", "The capital of France is", "--max-tokens", "8", "--temperature", "0",
                     *SMALL)
    assert proc.stdout.strip()


def test_generate_chat() -> None:
    proc = run_ember("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "16",
                     "--temperature", "0", *SMALL)
    assert "Paris" in proc.stdout


def test_chat_two_turns() -> None:
    proc = run_ember("chat", "--temperature", "0", "--max-tokens", "24", *SMALL,
                     stdin="What is the capital of France?\nAnd what about Germany?\n")
    replies = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2, proc.stdout
    assert "Paris" in replies[0]
    assert "Berlin" in replies[1]  # "what about Germany?" only makes sense with the first turn in the history


def test_download() -> None:
    proc = run_ember("download", timeout=600)
    paths = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert set(paths) == {"SmolLM2-135M-Instruct", "Qwen2.5-Coder-0.5B-Instruct"}
    for path in paths.values():
        assert path.endswith(".gguf") and os.path.isfile(path)
