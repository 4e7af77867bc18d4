"""``X-Request-Id``: a client's (or proxy's) id for a request, kept end to end.

As in vLLM, a request's ``X-Request-Id`` header names it: its engine request id
(what the request log line ``ember.request`` and the server's warnings show) is
the route's prefix and this id (``chatcmpl-<id>``, ``cmpl-<id>``, ``embd-<id>``),
which is also the response's ``id``, and every response carries the header
back. Without the header the server makes one up (32 hex digits) and returns it
the same way, so a client can always quote the id of a request it made.

The id is 1 to :data:`MAX_REQUEST_ID_CHARS` visible ASCII characters (``!`` to
``~``: no spaces or control characters, which would break log lines and
headers); anything else is refused with a 400 naming ``X-Request-Id``. Two
running requests cannot share an id: the second gets a 400.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request

from ember.entrypoints.openai.protocol import APIError

HEADER = "X-Request-Id"
_HEADER_KEY = HEADER.lower().encode()
# Longer ids are refused: a log line and an engine id should stay short (a UUID is 36).
MAX_REQUEST_ID_CHARS = 128
_SCOPE_KEY = "ember.request_id"


def _check(raw: bytes) -> str | None:
    """The id in a header value, or None when it is not a valid id."""
    if not 1 <= len(raw) <= MAX_REQUEST_ID_CHARS or any(not 0x21 <= b <= 0x7E for b in raw):
        return None
    return raw.decode("ascii")


class RequestIdMiddleware:
    """ASGI middleware: reads (or makes up) the request id, refuses an invalid
    one with 400 (``param`` ``X-Request-Id``), and adds ``X-Request-Id`` to every
    response's headers. Handlers read the id with :func:`request_id_of`.

    Args:
        app: the ASGI app.
        error_response: turns an ``APIError`` into the app's JSON error response.
    """

    def __init__(self, app: Any, error_response: Any) -> None:
        self.app = app
        self.error_response = error_response

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = next((v for k, v in scope["headers"] if k == _HEADER_KEY), None)
        request_id = uuid.uuid4().hex if raw is None else _check(raw)
        if request_id is None:
            err = APIError(f"the {HEADER} header must be 1 to {MAX_REQUEST_ID_CHARS} visible ASCII characters "
                           "(no spaces)", param=HEADER)
            await self.error_response(err)(scope, receive, send)
            return
        scope[_SCOPE_KEY] = request_id
        header = (_HEADER_KEY, request_id.encode())

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def request_id_of(request: Request) -> str:
    """The id :class:`RequestIdMiddleware` gave ``request`` (a fresh one
    without the middleware)."""
    return request.scope.get(_SCOPE_KEY) or uuid.uuid4().hex
