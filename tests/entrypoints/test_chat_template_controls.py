"""Chat template controls (``add_generation_prompt``, ``continue_final_message``,
``chat_template``, ``chat_template_kwargs``, ``--chat-template``), ``/tokenizer_info``
and ``X-Request-Id``, with the official ``openai`` client and plain HTTP against
the app on the scripted engine of :mod:`tests.entrypoints.test_vllm_compat`
(the bundled models' real tokenizers and chat templates)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from ember.engine.input_processor import load_chat_template
from ember.entrypoints.openai.api_server import build_app
from tests.entrypoints.test_vllm_compat import MODEL, ScriptedEngine, error_of

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
PARTIAL = [*CHAT, {"role": "assistant", "content": "The answer is"}]
ROLES_TEMPLATE = ("{% for m in messages %}<<{{ m.role }}:{{ m.content }}>>{% endfor %}"
                  "{% if add_generation_prompt %}<<assistant:{% endif %}")
THINK_TEMPLATE = ("{% for m in messages %}{{ m.content }}|{% endfor %}"
                  "{% if enable_thinking is defined and not enable_thinking %}NOTHINK{% else %}THINK{% endif %}")


class RecordingEngine(ScriptedEngine):
    """The scripted engine, remembering the request ids it was given."""

    def __init__(self, tokenizer: Any, script: list[int]) -> None:
        super().__init__(tokenizer, script)
        self.request_ids: list[str] = []

    async def generate(self, prompt: list[int], params: Any, request_id: str, **kw: Any):
        self.request_ids.append(request_id)
        async for out in super().generate(prompt, params, request_id, **kw):
            yield out


@pytest.fixture
def engine(smollm2_tokenizer) -> RecordingEngine:
    return RecordingEngine(smollm2_tokenizer, smollm2_tokenizer.encode(" four"))


def http_of(engine: Any, **kwargs: Any) -> TestClient:
    return TestClient(build_app(engine, **kwargs), raise_server_exceptions=False)


def client_of(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", max_retries=0, http_client=http)


def rendered(http: TestClient, **body: Any) -> str:
    """The text /tokenize renders for ``body`` (its tokens decoded)."""
    resp = http.post("/tokenize", json=body)
    assert resp.status_code == 200, resp.text
    return http.app.state.engine.tokenizer.decode(resp.json()["tokens"])


def prompt_tokens(client: openai.OpenAI, messages: list[dict], **extra: Any) -> int:
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, extra_body=extra)
    return resp.usage.prompt_tokens


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_path: str) -> Any:
    from ember.loader.source import load_tokenizer_for

    return load_tokenizer_for(smollm2_path)


# ---------------------------------------------------------------- add_generation_prompt / continue_final_message


def test_add_generation_prompt_and_continue_final_message(engine, smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    http = http_of(engine)
    client = client_of(http)
    with_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    without = tok.apply_chat_template(CHAT, add_generation_prompt=False, tokenize=False)
    assert with_prompt == without + "<|im_start|>assistant\n"
    assert rendered(http, messages=CHAT) == with_prompt
    assert rendered(http, messages=CHAT, add_generation_prompt=False) == without
    # Chat completions render the same prompt (its token count is the usage).
    assert prompt_tokens(client, CHAT) == len(tok.encode(with_prompt, add_special_tokens=False))
    assert prompt_tokens(client, CHAT, add_generation_prompt=False) == len(tok.encode(without,
                                                                                     add_special_tokens=False))
    # continue_final_message: the assistant's last message stays open, for the model to go on.
    text = rendered(http, messages=PARTIAL, add_generation_prompt=False, continue_final_message=True)
    assert text == without + "<|im_start|>assistant\nThe answer is"
    assert prompt_tokens(client, PARTIAL, add_generation_prompt=False, continue_final_message=True) == len(
        tok.encode(text, add_special_tokens=False))
    streamed = list(client.chat.completions.create(
        model=MODEL, messages=PARTIAL, stream=True, stream_options={"include_usage": True},
        extra_body={"add_generation_prompt": False, "continue_final_message": True}))
    assert streamed[-1].usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == " four"


def test_continue_final_message_errors(engine) -> None:
    http = http_of(engine)
    client = client_of(http)
    cases = [
        (PARTIAL, {"continue_final_message": True},
         "continue_final_message cannot be used with add_generation_prompt"),
        (CHAT, {"continue_final_message": True, "add_generation_prompt": False},
         "continue_final_message needs the last message to be an assistant message (it is a user message)"),
    ]
    for messages, extra, match in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
        err = error_of(exc)
        assert err["param"] == "continue_final_message" and match in err["message"], err
        resp = http.post("/tokenize", json={"messages": messages, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "continue_final_message"
    for bad in ({"add_generation_prompt": "yes"}, {"continue_final_message": 1}):
        resp = http.post("/v1/chat/completions", json={"messages": CHAT, **bad})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == next(iter(bad)), resp.text


# ---------------------------------------------------------------- chat_template / chat_template_kwargs


def test_request_chat_template_and_kwargs(engine, smollm2_tokenizer) -> None:
    http = http_of(engine)
    client = client_of(http)
    assert rendered(http, messages=CHAT, chat_template=ROLES_TEMPLATE) == \
        "<<system:Be brief.>><<user:2+2?>><<assistant:"
    assert rendered(http, messages=CHAT, chat_template=ROLES_TEMPLATE, add_generation_prompt=False) == \
        "<<system:Be brief.>><<user:2+2?>>"
    expected = len(smollm2_tokenizer.encode("<<system:Be brief.>><<user:2+2?>><<assistant:",
                                            add_special_tokens=False))
    assert prompt_tokens(client, CHAT, chat_template=ROLES_TEMPLATE) == expected
    # chat_template_kwargs reach the template (as Qwen3's enable_thinking does).
    assert rendered(http, messages=CHAT, chat_template=THINK_TEMPLATE) == "Be brief.|2+2?|THINK"
    assert rendered(http, messages=CHAT, chat_template=THINK_TEMPLATE,
                    chat_template_kwargs={"enable_thinking": False}) == "Be brief.|2+2?|NOTHINK"
    assert prompt_tokens(client, CHAT, chat_template=THINK_TEMPLATE, chat_template_kwargs={
        "enable_thinking": False}) == len(smollm2_tokenizer.encode("Be brief.|2+2?|NOTHINK", add_special_tokens=False))


def test_chat_template_errors_name_the_field(engine) -> None:
    http = http_of(engine)
    client = client_of(http)
    cases = [
        ({"chat_template": "{% for m in messages %}{{ m.content }}"}, "chat_template",
         "chat_template is not a valid Jinja template"),
        ({"chat_template": "{{ raise_exception('no system messages here') }}"}, "messages",
         "chat template failed: no system messages here"),
        ({"chat_template": "{{ messages[5].content }}"}, "messages", "chat template failed"),
        ({"chat_template": ""}, "chat_template", "chat_template must not be empty"),
        ({"chat_template": 3}, "chat_template", "chat_template"),
        ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs",
         "chat_template_kwargs cannot set 'add_generation_prompt'"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs", "chat_template_kwargs"),
    ]
    for extra, param, match in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model=MODEL, messages=CHAT, extra_body=extra)
        err = error_of(exc)
        assert err["param"] == param and match in err["message"], (extra, err)
        resp = http.post("/tokenize", json={"messages": CHAT, **extra})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, (extra, resp.text)


def test_server_chat_template_file_or_inline(engine, tmp_path) -> None:
    path = tmp_path / "roles.jinja"
    path.write_text(ROLES_TEMPLATE)
    assert load_chat_template(str(path)) == ROLES_TEMPLATE == load_chat_template(ROLES_TEMPLATE)
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ValueError, match="--chat-template is not a valid Jinja template"):
        load_chat_template("{% if %}")
    http = http_of(engine, chat_template=load_chat_template(str(path)))
    assert rendered(http, messages=CHAT) == "<<system:Be brief.>><<user:2+2?>><<assistant:"
    # A request's own template still wins.
    assert rendered(http, messages=CHAT, chat_template=THINK_TEMPLATE) == "Be brief.|2+2?|THINK"
    info = http.get("/tokenizer_info").json()
    assert info["chat_template"] == ROLES_TEMPLATE


def test_cli_chat_template_flag(tmp_path) -> None:
    from ember.entrypoints.cli import make_parser

    path = tmp_path / "t.jinja"
    path.write_text(ROLES_TEMPLATE)
    assert make_parser().parse_args(["serve", "--chat-template", str(path)]).chat_template == ROLES_TEMPLATE
    with pytest.raises(SystemExit):
        make_parser().parse_args(["serve", "--chat-template", str(tmp_path / "nope.jinja")])


def test_tokenizer_info(engine, smollm2_tokenizer) -> None:
    info = http_of(engine).get("/tokenizer_info").json()
    tok = smollm2_tokenizer
    assert info["tokenizer_class"] == type(tok).__name__
    assert info["chat_template"] == tok.chat_template
    assert info["model_max_length"] == tok.model_max_length
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert info["added_tokens_decoder"][str(end)]["content"] == "<|im_end|>"
    assert info["added_tokens_decoder"][str(end)]["special"] is True


# ---------------------------------------------------------------- X-Request-Id


def test_request_id_header_names_the_request(engine) -> None:
    http = http_of(engine)
    client = client_of(http)
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT,
                                                           extra_headers={"X-Request-Id": "trace-42"})
    assert raw.headers["x-request-id"] == "trace-42"
    assert raw.parse().id == "chatcmpl-trace-42" and engine.request_ids[-1] == "chatcmpl-trace-42"
    completion = client.completions.create(model=MODEL, prompt="2+2=", extra_headers={"X-Request-Id": "c-1"})
    assert completion.id == "cmpl-c-1" and completion._request_id == "c-1"
    batch = client.completions.create(model=MODEL, prompt=["a", "b"], extra_headers={"X-Request-Id": "b-1"})
    assert batch.id == "cmpl-b-1" and engine.request_ids[-2:] == ["cmpl-b-1-0", "cmpl-b-1-1"]
    # Streamed: the header comes with the stream; every chunk carries the id.
    with client.chat.completions.with_streaming_response.create(
            model=MODEL, messages=CHAT, stream=True, extra_headers={"X-Request-Id": "s-7"}) as resp:
        assert resp.headers["x-request-id"] == "s-7"
        ids = {c.id for c in resp.parse()}
    assert ids == {"chatcmpl-s-7"}
    # Without the header the server makes one up and returns it.
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT)
    made_up = raw.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_up) and raw.parse().id == f"chatcmpl-{made_up}"
    # Every answer carries it, errors and other routes included.
    for resp in (http.get("/v1/models", headers={"X-Request-Id": "m"}),
                 http.post("/v1/completions", json={"prompt": ""}, headers={"X-Request-Id": "e"})):
        assert resp.headers["x-request-id"] in ("m", "e")


def test_bad_request_ids(engine) -> None:
    http = http_of(engine)
    body = {"model": MODEL, "prompt": "x"}
    for bad in ("a" * 129, "has space", "tab\there", "é"):
        resp = http.post("/v1/completions", json=body, headers={"X-Request-Id": bad.encode("utf-8")})
        assert resp.status_code == 400, bad
        err = resp.json()["error"]
        assert err["param"] == "X-Request-Id" and "1 to 128 visible ASCII characters" in err["message"]
    resp = http.post("/v1/completions", json=body, headers={"X-Request-Id": "a" * 128})
    assert resp.status_code == 200 and resp.json()["id"] == "cmpl-" + "a" * 128
    resp = http.post("/v1/completions", json=body, headers={"X-Request-Id": ""})
    assert resp.status_code == 400



class GatedEngine(RecordingEngine):
    """Refuses a request id in use (as AsyncLLM does) and holds every request
    until ``gate`` is set."""

    def __init__(self, tokenizer: Any, script: list[int]) -> None:
        super().__init__(tokenizer, script)
        self.active: set[str] = set()
        self.gate = asyncio.Event()

    async def generate(self, prompt: list[int], params: Any, request_id: str, **kw: Any):
        if request_id in self.active:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.active.add(request_id)
        try:
            await self.gate.wait()
            async for out in super().generate(prompt, params, request_id, **kw):
                yield out
        finally:
            self.active.discard(request_id)


def test_a_request_id_in_use_is_a_400(smollm2_tokenizer) -> None:
    engine = GatedEngine(smollm2_tokenizer, smollm2_tokenizer.encode(" four"))
    app = build_app(engine)

    async def scenario() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            body = {"model": MODEL, "messages": CHAT}
            first = asyncio.ensure_future(http.post("/v1/chat/completions", json=body,
                                                    headers={"X-Request-Id": "dup"}))
            while "chatcmpl-dup" not in engine.active:
                await asyncio.sleep(0.01)
            second = await http.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "dup"})
            other = asyncio.ensure_future(http.post("/v1/chat/completions", json=body,
                                                    headers={"X-Request-Id": "other"}))
            await asyncio.sleep(0.05)
            engine.gate.set()
            return await first, second, await other

    first, second, other = asyncio.run(scenario())
    assert first.status_code == 200 and first.json()["id"] == "chatcmpl-dup"
    assert other.status_code == 200 and other.json()["id"] == "chatcmpl-other"
    assert second.status_code == 400 and second.headers["x-request-id"] == "dup"
    err = second.json()["error"]
    assert err["param"] == "X-Request-Id" and "another running request has the same X-Request-Id" in err["message"]


def test_templates_use_hugging_face_jinja_extensions(engine) -> None:
    """Loop controls and the ``generation`` tag (assistant masks) parse, as in
    Hugging Face's template environment."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}{% generation %}[{{ m.content }}]"
                "{% endgeneration %}{% break %}{% endif %}{% endfor %}")
    assert load_chat_template(template) == template
    assert rendered(http_of(engine), messages=CHAT, chat_template=template) == "[2+2?]"
