"""The ``ember`` command line.

::

    ember serve    [MODEL] [--host 127.0.0.1] [--port 8000] [engine flags]   OpenAI-compatible server
    ember run-batch -i IN.jsonl -o OUT.jsonl [engine flags]                 an OpenAI batch file, offline
    ember generate [--model M] --prompt TEXT [--chat] [sampling flags]     one-shot generation
    ember chat     [--model M] [--system TEXT] [sampling flags]            interactive chat (stdin)
    ember download [NAME ...]                                              fetch the bundled models
    ember bench    latency|throughput [engine flags]                      offline benchmarks + roofline
    ember bench    serve --base-url URL [load flags]                      load an OpenAI-compatible server
    ember bench    perplexity --text-file PATH [engine flags]             perplexity on a text (sliding windows)

Without ``--model`` every command uses the bundled default model. Engine flags are
those of :meth:`EngineArgs.add_cli_args` (``ember serve --help`` lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import sys
import uuid
from typing import Any

from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.reasoning import reasoning_parser_names
from ember.tool_parsers import tool_parser_names
from ember.sampling_params import RequestOutputKind, SamplingParams

logger = logging.getLogger("ember.cli")


# ---------------------------------------------------------------- shared helpers


def _add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate at most (default {max_tokens})")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 disables")
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def _sampling_params(args: argparse.Namespace, output_kind: RequestOutputKind) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, stop=args.stop, ignore_eos=args.ignore_eos, output_kind=output_kind,
    )


def _engine_args(args: argparse.Namespace) -> EngineArgs:
    return EngineArgs.from_cli_args(args)


def _load_quietly(load: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``load`` (an engine constructor) with its stdout sent to stderr.

    NOTE: stdout carries only generated text, so that ``ember generate | ...`` pipes
    cleanly; start-up reports printed while loading belong on stderr.
    """
    with contextlib.redirect_stdout(sys.stderr):
        return load(*args, **kwargs)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that deserve a one-line message rather than a traceback."""
    from ember.engine.core_client import EngineDeadError

    errors: list[type[BaseException]] = [ConfigError, EngineDeadError, ConnectionError]
    try:
        from ember.loader import ModelLoadError

        errors.append(ModelLoadError)
    except ImportError:
        pass
    return tuple(errors)


# ---------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from ember.engine.core_client import EngineDeadError
    from ember.entrypoints.openai.api_server import run_server

    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise SystemExit("ember serve: give the model either as MODEL or as --model, not both")
        args.model = args.model_tag
    try:
        run_server(args)
    except EngineDeadError as e:
        # NOTE: the server has shut down and its engine core is gone: exit now, not
        # after the interpreter has torn down a large heap (seconds on a busy
        # machine), so that a process supervisor restarts the server sooner.
        print(f"ember serve: error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0


def _bounded_number(kind: type, flag: str, low: float, inclusive: bool = True) -> Any:
    """An argparse ``type`` parsing ``kind`` (int or float) that must be ``>= low``
    (``> low`` unless ``inclusive``); the error names ``flag``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        if not math.isfinite(value) or not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"{flag} must be {'>=' if inclusive else '>'} {low:g}, got {text!r}")
        return value

    return parse


def cmd_run_batch(args: argparse.Namespace) -> int:
    from ember.entrypoints.openai.run_batch import run_batch_cli

    return run_batch_cli(args)


def _chat_template_arg(value: str) -> str:
    from ember.engine.input_processor import load_chat_template

    try:
        return load_chat_template(value)
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_frontend_args(p: argparse.ArgumentParser) -> None:
    """The OpenAI front end's flags (``ember serve`` and ``ember run-batch``)."""
    from ember.pooling_params import POOLING_TYPES

    p.add_argument("--chat-template", type=_chat_template_arg, default=None, metavar="FILE_OR_TEMPLATE",
                   help="the chat template for chats that give none: a Jinja file, or the template itself "
                        "(default: the tokenizer's)")
    p.add_argument("--pooling-type", default="LAST", choices=POOLING_TYPES,
                   help="how /v1/embeddings pools the final hidden states of an input: the last token's (LAST, "
                        "default) or the mean over its tokens (MEAN)")
    p.add_argument("--no-embedding-normalize", action="store_true",
                   help="return embeddings as pooled, not scaled to unit L2 norm (requests may still ask with "
                        "'normalize')")
def _add_hygiene_args(p: argparse.ArgumentParser) -> None:
    """``ember serve``'s bounds on connections and on what a request may ask."""
    from ember.entrypoints.openai.connections import DEFAULT_TIMEOUT_HEADER_READ_S, DEFAULT_TIMEOUT_KEEP_ALIVE_S
    from ember.entrypoints.openai.input_limits import DEFAULT_MAX_STOP_STRING_CHARS, DEFAULT_MAX_STOP_STRINGS

    p.add_argument("--limit-concurrency", type=_bounded_number(int, "--limit-concurrency", 1), default=None,
                   metavar="N",
                   help="answer 503 (code too_many_requests, with Retry-After) while N requests are in progress, "
                        "streams included; /health and /metrics are not counted (default: no bound)")
    p.add_argument("--timeout-keep-alive", type=_bounded_number(float, "--timeout-keep-alive", 0, inclusive=False),
                   default=DEFAULT_TIMEOUT_KEEP_ALIVE_S, metavar="SECONDS",
                   help=f"close a kept-alive connection idle this long (default {DEFAULT_TIMEOUT_KEEP_ALIVE_S:g})")
    p.add_argument("--timeout-header-read", type=_bounded_number(float, "--timeout-header-read", 0, inclusive=False),
                   default=DEFAULT_TIMEOUT_HEADER_READ_S, metavar="SECONDS",
                   help="close a connection that has not sent a whole request head this long after connecting "
                        f"or starting its next request (default {DEFAULT_TIMEOUT_HEADER_READ_S:g})")
    p.add_argument("--max-stop-strings", type=_bounded_number(int, "--max-stop-strings", 1),
                   default=DEFAULT_MAX_STOP_STRINGS, metavar="N",
                   help=f"answer 400 to a request with more stop strings (default {DEFAULT_MAX_STOP_STRINGS})")
    p.add_argument("--max-stop-string-chars", type=_bounded_number(int, "--max-stop-string-chars", 1),
                   default=DEFAULT_MAX_STOP_STRING_CHARS, metavar="N",
                   help=f"answer 400 to a stop string longer than N characters "
                        f"(default {DEFAULT_MAX_STOP_STRING_CHARS})")
    p.add_argument("--allow-special-tokens-in-content", action="store_true",
                   help="let special-token strings inside chat messages (e.g. '<|im_end|>') become control tokens; "
                        "by default they are tokenized as text, so that a message cannot pose as another role. "
                        "Only for clients trusted to write the template's markers")


# ---------------------------------------------------------------- generate


def cmd_generate(args: argparse.Namespace) -> int:
    from ember.engine.llm import LLM

    prompts = args.prompt if args.prompt else [sys.stdin.read().rstrip("\n")]
    params = _sampling_params(args, RequestOutputKind.FINAL_ONLY)
    llm = _load_quietly(LLM, **dataclasses.asdict(_engine_args(args)))
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        conversations = [system + [{"role": "user", "content": p}] for p in prompts]
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for out in outputs:
        print(out.outputs[0].text, flush=True)
    return 0


# ---------------------------------------------------------------- chat


class ChatSession:
    """A multi-turn conversation with an ``AsyncLLM``, printing replies as they stream.

    Args:
        engine: an ``AsyncLLM``.
        params: sampling parameters for every reply (``output_kind`` is set to DELTA).
        system: optional system prompt kept at the head of the history.
    """

    def __init__(self, engine: Any, params: SamplingParams, system: str | None = None) -> None:
        self.engine = engine
        self.params = params
        self.params.output_kind = RequestOutputKind.DELTA
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = list(self.system)

    def reset(self) -> None:
        self.history = list(self.system)

    async def reply(self, user_text: str, out: Any = sys.stdout) -> str:
        """Stream the assistant's answer to ``user_text`` into ``out``; record the turn.

        Raises:
            ValueError: the conversation no longer fits the context (history unchanged).
        """
        messages = self.history + [{"role": "user", "content": user_text}]
        prompt_ids = self.engine.input_processor.apply_chat_template(messages)
        params = self.engine.input_processor.check(prompt_ids, dataclasses.replace(self.params))
        pieces: list[str] = []
        async for output in self.engine.generate(prompt_ids, params, f"chat-{uuid.uuid4().hex}"):
            piece = output.outputs[0].text
            pieces.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        text = "".join(pieces)
        self.history = messages + [{"role": "assistant", "content": text}]
        return text


def _read_line(prompt: str) -> str | None:
    try:
        return input(prompt) if prompt else sys.stdin.readline() or None
    except EOFError:
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    from ember.engine.async_llm import AsyncLLM

    engine = _load_quietly(AsyncLLM.from_engine_args, _engine_args(args))
    session = ChatSession(engine, _sampling_params(args, RequestOutputKind.DELTA), args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {engine.model_config.served_model_name}. "
              "/reset clears the history, /exit (or Ctrl-D) quits, Ctrl-C stops a reply.", file=sys.stderr)
    # NOTE: one event loop for the whole session, but input is read outside it, so that
    # Ctrl-C at the prompt quits and Ctrl-C during a reply only cancels that reply.
    try:
        with asyncio.Runner() as runner:
            while (line := _read_line("> " if interactive else "")) is not None:
                text = line.strip()
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    session.reset()
                    continue
                if not text:
                    continue
                try:
                    runner.run(session.reply(text))
                except ValueError as e:
                    print(f"error: {e} (use /reset to start over)", file=sys.stderr)
                except KeyboardInterrupt:
                    print("\n[reply interrupted]", file=sys.stderr)
    except KeyboardInterrupt:
        print(file=sys.stderr)
    finally:
        engine.shutdown()
    return 0


# ---------------------------------------------------------------- download


def cmd_download(args: argparse.Namespace) -> int:
    from ember.loader.download import BUNDLED_MODELS, ensure_bundled_model

    names = args.names or list(BUNDLED_MODELS)
    unknown = [n for n in names if n not in BUNDLED_MODELS]
    if unknown:
        print(f"ember download: unknown model {unknown[0]!r}; bundled models: {', '.join(BUNDLED_MODELS)}",
              file=sys.stderr)
        return 2
    for name in names:
        print(f"{name}: {ensure_bundled_model(name)}", flush=True)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """``ember worker``: this node's ranks of a multi-node engine (see
    :func:`ember.executor.multiproc.run_worker_node`)."""
    from ember.executor.multiproc import run_worker_node

    return run_worker_node(args.master_addr, args.master_port, args.node_rank, args.nnodes)


def _env_int(name: str) -> int | None:
    text = os.environ.get(name)
    return int(text) if text and text.lstrip("-").isdigit() else None


# ---------------------------------------------------------------- parser


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description="Ember: LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"ember {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the OpenAI-compatible API server")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="same as --model")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--reasoning-parser", default=None, choices=reasoning_parser_names(),
                   help="return the text between <think> and </think> as reasoning_content in chat completions")
    p.add_argument("--tool-call-parser", default=None, choices=tool_parser_names(),
                   help="read chat completions' tool calls in this format (default: the format the model's chat "
                        "template teaches: hermes for Qwen2.5/Qwen3, llama3_json for Llama 3.1+, deepseek_v3 for "
                        "DeepSeek-V3/R1)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM compatibility: Ember always honours tool_choice 'auto' when the server "
                        "has a tool-call parser")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health, /metrics, /version and "
                        "the API docs (default: $EMBER_API_KEY, else none)")
    p.add_argument("--max-request-body-bytes", type=_bounded_number(int, "--max-request-body-bytes", 1),
                   default=16 * 1024 * 1024, metavar="BYTES",
                   help="answer 413 to a larger request body, judged from Content-Length before reading it, or "
                        "as soon as a chunked body passes the limit (default 16 MiB: a prompt filling a "
                        "128K-token context is about 1 MiB, as text or as token ids, so this leaves room for "
                        "batches and long chats while bounding what one request makes the server hold and parse)")
    p.add_argument("--max-waiting-requests", type=_bounded_number(int, "--max-waiting-requests", 0), default=None,
                   help="answer 429 (with Retry-After) while this many requests wait for a slot (default: no bound)")
    p.add_argument("--request-timeout", type=_bounded_number(float, "--request-timeout", 0, inclusive=False),
                   default=None, metavar="SECONDS",
                   help="abort a generation request running longer (queueing included): HTTP 504 with code "
                        "request_timeout, or, for a stream under way, finish_reason 'abort' and an error event "
                        "(default: no limit)")
    p.add_argument("--shutdown-timeout", type=_bounded_number(float, "--shutdown-timeout", 0), default=30.0,
                   metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, seconds running requests get to finish before they are aborted; "
                        "new requests get 503 meanwhile (default 30)")
    _add_hygiene_args(p)
    add_frontend_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run-batch", help="run an OpenAI batch file (JSONL requests in, JSONL responses out)")
    p.add_argument("-i", "--input-file", required=True, help="the batch's requests, one JSON object a line")
    p.add_argument("-o", "--output-file", required=True, help="where to write the responses, one a line")
    p.add_argument("--max-concurrency", type=_bounded_number(int, "--max-concurrency", 1), default=256,
                   help="requests sent to the engine at once (default 256)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_frontend_args(p)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_run_batch)

    p = sub.add_parser("generate", help="generate text for one or more prompts and print it")
    p.add_argument("--prompt", "-p", action="append", default=None,
                   help="prompt text (repeatable; default: read one prompt from stdin)")
    p.add_argument("--chat", action="store_true", help="treat each prompt as a user message (chat template)")
    p.add_argument("--system", default=None, help="system prompt (with --chat)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    EngineArgs.add_cli_args(p)
    _add_sampling_args(p, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat interactively (reads stdin, streams replies)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    EngineArgs.add_cli_args(p)
    _add_sampling_args(p, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    from ember.entrypoints.bench.offline import add_bench_parsers
    from ember.entrypoints.bench.perplexity import add_perplexity_parser
    from ember.entrypoints.bench.serve import add_serve_parser

    bench_kinds = add_bench_parsers(sub)
    add_serve_parser(bench_kinds)
    add_perplexity_parser(bench_kinds)

    p = sub.add_parser("worker", help="run this node's ranks of a multi-node engine (node 0 runs the engine)")
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR"), required="MASTER_ADDR" not in os.environ,
                   help="node 0's address (default: $MASTER_ADDR)")
    p.add_argument("--master-port", type=int, default=_env_int("MASTER_PORT"),
                   required="MASTER_PORT" not in os.environ,
                   help="node 0's --master-port (default: $MASTER_PORT); its control port is the next one")
    p.add_argument("--node-rank", type=int, default=_env_int("NODE_RANK"), required="NODE_RANK" not in os.environ,
                   help="this node's index, 1 .. nnodes - 1 (default: $NODE_RANK)")
    p.add_argument("--nnodes", type=int, default=_env_int("NNODES"), required="NNODES" not in os.environ,
                   help="number of nodes, as node 0's --nnodes (default: $NNODES)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("download", help="fetch the bundled models and print their paths")
    p.add_argument("names", nargs="*", metavar="NAME", help="bundled model names (default: all)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_download)
    return parser


def _version() -> str:
    from ember import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except _user_errors() as e:
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
