"""The Responses API (``/v1/responses``) mapped onto chat generation.

Input items become chat messages (``input_text`` / ``input_image`` parts, earlier
``function_call`` and ``function_call_output`` items as assistant tool calls and tool
results); ``instructions`` is the system message; ``text.format`` is the response format.
The output is the Responses object shape, streamed as its typed events.
"""
from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from ..errors import InputError
from ..runtime.batcher import FinishEvent, TokenEvent
from .parsers import parse_output
from .protocol import ChatCompletionRequest, ResponsesRequest


def _content(content: Any, where: str) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InputError(f"{where}: content must be a string or a list of parts")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text"):
            parts.append({"type": "text", "text": part.get("text")})
        elif kind == "input_image":
            url = part.get("image_url")
            if url is None and part.get("file_id") is not None:
                raise InputError(f"{where}: part {i}: file_id images are not supported; send image_url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise InputError(f"{where}: part {i}: unsupported content type {kind!r} "
                             f"(supported: input_text, input_image)")
    return parts


def to_chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    if req.store:
        raise InputError("store: true is not supported (this server keeps no responses)")
    messages: list[dict[str, Any]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    items = [{"role": "user", "content": req.input}] if isinstance(req.input, str) else req.input
    for n, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{n}]"
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": _content(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": str(item.get("output", ""))})
        else:
            raise InputError(f"{where}: unsupported input item type {kind!r}")
    fields: dict[str, Any] = {"model": req.model, "messages": messages, "temperature": req.temperature,
                              "top_p": req.top_p, "seed": req.seed, "max_tokens": req.max_output_tokens}
    fmt = (req.text.format if req.text else None) or None
    if fmt and fmt.get("type") != "text":
        if fmt.get("type") == "json_schema":
            fields["response_format"] = {"type": "json_schema", "json_schema": {
                k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}}
        else:
            fields["response_format"] = {"type": fmt.get("type")}
    if req.tools:
        fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                           for t in req.tools]
    if req.tool_choice is not None:
        choice = req.tool_choice
        if isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        fields["tool_choice"] = choice
    try:
        return ChatCompletionRequest(**{k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        raise InputError(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def _usage(finish: FinishEvent) -> dict[str, Any]:
    return {"input_tokens": finish.prompt_tokens, "input_tokens_details": {"cached_tokens": finish.cached_tokens},
            "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def _response(running, rid: str, req: ResponsesRequest, status: str, output: list, finish: FinishEvent | None):
    incomplete = finish is not None and finish.reason == "length"
    return {"id": rid, "object": "response", "created_at": running.created, "model": running.resident.id,
            "status": "incomplete" if incomplete else status,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "error": None, "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "output": output, "parallel_tool_calls": True, "temperature": req.temperature, "top_p": req.top_p,
            "tool_choice": req.tool_choice or "auto", "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "text": {"format": (req.text.format if req.text and req.text.format else {"type": "text"})},
            "usage": _usage(finish) if finish is not None else None}


def _output_items(parsed, msg_id: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    if parsed.reasoning_content:
        items.append({"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "status": "completed",
                      "summary": [], "content": [{"type": "reasoning_text", "text": parsed.reasoning_content}]})
    if parsed.content or not parsed.tool_calls:
        items.append(_message(msg_id, parsed.content, "completed"))
    for call in parsed.tool_calls:
        items.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items


def _message(msg_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": msg_id, "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def body(running, rid: str, req: ResponsesRequest, events: list[Any]) -> dict[str, Any]:
    finish = events[-1]
    text = "".join(ev.text for ev in events[:-1]) + finish.text
    parsed = parse_output(text, **running.plan.parser)
    return _response(running, rid, req, "completed", _output_items(parsed, f"msg_{uuid.uuid4().hex}"), finish)


async def stream(running, rid: str, req: ResponsesRequest, metrics):
    """The Responses streaming events: created, text deltas, then completed with the
    whole response (tool calls and reasoning appear as output items there)."""
    seq = 0

    def event(kind: str, **data: Any) -> dict[str, Any]:
        nonlocal seq
        seq += 1
        return {"type": kind, "sequence_number": seq - 1, **data}

    msg_id = f"msg_{uuid.uuid4().hex}"
    yield event("response.created", response=_response(running, rid, req, "in_progress", [], None))
    yield event("response.in_progress", response=_response(running, rid, req, "in_progress", [], None))
    yield event("response.output_item.added", output_index=0, item=_message(msg_id, "", "in_progress"))
    yield event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0,
                part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
    parser, pieces = running.parser, []
    async for ev in running.events():
        deltas = parser.feed(ev.text) if isinstance(ev, TokenEvent) else parser.feed(ev.text) + parser.finish()
        if isinstance(ev, TokenEvent):
            metrics.tokens()
        for delta in deltas:
            if delta.get("content"):
                pieces.append(delta["content"])
                yield event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                            delta=delta["content"], logprobs=[])
        if isinstance(ev, FinishEvent):
            if ev.reason == "error":
                yield event("error", code="server_error", message=f"generation failed: {ev.error}", param=None)
                return
            text = "".join(pieces)
            yield event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=text,
                        logprobs=[])
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            yield event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
            yield event("response.output_item.done", output_index=0, item=_message(msg_id, text, "completed"))
            output = _output_items(parser.result(), msg_id)
            yield event("response.completed", response=_response(running, rid, req, "completed", output, ev))
            return
