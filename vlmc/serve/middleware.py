"""The ASGI layers in front of the routes: request ids, accounting and the last-resort
error handler (``Front``), then the API key and the request body (``Guard``).

Both are plain ASGI rather than Starlette's ``BaseHTTPMiddleware``: that one runs the app
in a task of its own behind a proxied ``receive``, so a route never sees its client
disconnect, and it buffers nothing but hides exceptions behind a second traceback.
"""
from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import time
import traceback
import uuid
from typing import Any, Callable

from ..runtime import memory
from .errors import error_body

log = logging.getLogger("vlmc.serve")

BIG_BODY_BYTES = 1 << 20  # after a request this large, freed heap pages go back to the system

# The id of the request being served, for log lines written anywhere below the middleware.
request_id: contextvars.ContextVar[str] = contextvars.ContextVar("vlmc_request_id", default="-")

# No data behind them: the chat page asks for the key itself, and the API's schema and its
# documentation page are public knowledge (the page sends the key typed into "Authorize").
OPEN_PATHS = {"/health", "/", "/ui", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}

CLIENT_GONE = 499  # nginx's status for a client that closed the connection first


class Front:
    """Gives each HTTP request an id (``X-Request-Id``), records its route template and
    status in ``record``, and turns any exception that escapes the app into one log line
    (and a 500 carrying the id, if the response had not started)."""

    def __init__(self, app: Any, record: Callable[[str, int], None]):
        self.app, self.record = app, record

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = f"req_{uuid.uuid4().hex[:16]}"
        token = request_id.set(rid)
        state = {"status": None, "done": False}

        async def tagged(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                state["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, never a second traceback
            log.error("%s %s %s: internal error: %s", rid, scope.get("method"), _printable(scope.get("path", "")),
                      describe_exception(exc))
            if state["status"] is None:
                state["status"] = 500
                await send_error(send, 500, f"internal error (request id {rid}); the server log has the details",
                                 code="internal_error", headers=[(b"x-request-id", rid.encode())])
            elif not state["done"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            request_id.reset(token)
            route = scope.get("route")
            self.record(getattr(route, "path", None) or "other", state["status"] or CLIENT_GONE)


def describe_exception(exc: BaseException) -> str:
    """``Type: message at file:line in function`` (the innermost frame): enough to find
    the bug from one log line."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    return f"{type(exc).__name__}: {_printable(str(exc))}{where}"


def _printable(text: str, limit: int = 300) -> str:
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")


class Guard:
    """The API key (Bearer) on every route but ``OPEN_PATHS``; the request body read in
    full before the route runs, at most ``max_body_bytes`` (413, also for chunked bodies)
    and with at most ``read_timeout`` seconds of silence between its parts (408)."""

    def __init__(self, app: Any, *, api_key: str | None, max_body_bytes: int, read_timeout: float = 15.0):
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.read_timeout = max_body_bytes, read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode("utf-8", "replace"), self.api_key.encode()):
                return await send_error(send, 401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                        code="invalid_api_key", headers=[(b"www-authenticate", b"Bearer")])
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(send, f"the request body is {int(length)} bytes")
        chunks, seen = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout)
            except asyncio.TimeoutError:
                return await send_error(send, 408, f"the request body stopped arriving (nothing for "
                                                   f"{self.read_timeout:g} s)", headers=[(b"connection", b"close")])
            if message["type"] != "http.request":
                return  # the client left before its body was complete: nobody to answer
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return await self._too_large(send, "the request body is over that")
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        del chunks
        big = len(body) > BIG_BODY_BYTES
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:  # the whole body at once, then the client's own (its disconnect)
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            if big:
                del body
                release_soon()

    async def _too_large(self, send, what: str) -> None:
        await send_error(send, 413, f"{what}; this server takes at most {self.max_body_bytes} bytes "
                                    f"(--max-body-bytes)", headers=[(b"connection", b"close")])


_released = [0.0]


def release_soon() -> None:
    """Hand freed memory back to the system, at most every 2 s, off the event loop. A big
    body (or a big image) leaves tens of MB of freed heap that glibc would otherwise keep
    resident while the server is busy (the generation loop releases only when idle)."""
    now = time.monotonic()
    if now - _released[0] < 2.0:
        return
    _released[0] = now
    asyncio.get_running_loop().run_in_executor(None, memory.release)


async def send_error(send, status: int, message: str, code: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})
