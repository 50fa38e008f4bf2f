"""OpenAI-style error bodies and one-line messages for invalid requests.

Errors look like OpenAI's (``{"error": {"message", "type", "param", "code"}}``), so
clients that know the API show them properly.
"""
from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          408: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


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
        if where is None:
            return "the request body is empty; send a JSON object", None
        return f"missing required field '{where}'", where
    if where is None and kind in ("model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    return f"{where}: {e.get('msg', 'invalid value')}" if where else e.get("msg", "invalid request"), where
