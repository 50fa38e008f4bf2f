"""OpenAI-style error bodies, and the middlewares that guard every route.

Errors look like OpenAI's (``{"error": {"message", "type", "param", "code"}}``), so
clients that know the API show them properly. The guards are plain ASGI middleware so
they never buffer a streamed response.
"""
from __future__ import annotations

import hmac
import json
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first problem, and the field it is in."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    where = ".".join(loc) or None
    kind = e.get("type", "")
    if kind == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    if kind == "extra_forbidden":
        return f"unknown or unsupported field '{where}'", where
    if kind == "missing":
        return f"missing required field '{where}'", where
    if where is None and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return f"{where}: {e.get('msg', 'invalid value')}" if where else e.get("msg", "invalid request"), where


OPEN_PATHS = {"/health", "/", "/ui"}  # no data behind them: the chat page asks for the key itself


class Guard:
    """API key (Bearer) on every route but ``OPEN_PATHS``, and a cap on request body bytes."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                return await _send_error(send, 401, "invalid or missing API key (send Authorization: Bearer KEY)",
                                         code="invalid_api_key")
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await _drain(receive)
            return await _send_error(send, 413, f"the request body is {int(length)} bytes; this server takes at most "
                                                f"{self.max_body_bytes} (--max-body-bytes)")
        seen = 0
        too_big = False

        async def counted():
            nonlocal seen, too_big
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    too_big = True
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await _send_error(send, 413, f"the request body is over {self.max_body_bytes} bytes (--max-body-bytes)")


class BodyTooLarge(Exception):
    pass


async def _drain(receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


async def _send_error(send, status: int, message: str, code: str | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
