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
from ..runtime.batcher import FinishEvent
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


class _StreamState:
    """Output items as they form while a Responses stream runs, and the events for them."""

    def __init__(self):
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.reasoning: list[str] = []
        self.reasoning_done = False
        self.msg: dict[str, Any] | None = None     # the open message item: id, index, pieces

    def event(self, kind: str, **data: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **data}

    def close_reasoning(self) -> list[dict[str, Any]]:
        if not self.reasoning or self.reasoning_done:
            return []
        self.reasoning_done = True
        item = {"type": "reasoning", "id": f"rs_{uuid.uuid4().hex}", "status": "completed", "summary": [],
                "content": [{"type": "reasoning_text", "text": "".join(self.reasoning)}]}
        index = len(self.output)
        self.output.append(item)
        return [self.event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"}),
                self.event("response.output_item.done", output_index=index, item=item)]

    def open_message(self) -> list[dict[str, Any]]:
        msg_id = f"msg_{uuid.uuid4().hex}"
        self.msg = {"id": msg_id, "index": len(self.output), "pieces": []}
        self.output.append(_message(msg_id, "", "in_progress"))
        return [self.event("response.output_item.added", output_index=self.msg["index"],
                           item=_message(msg_id, "", "in_progress")),
                self.event("response.content_part.added", item_id=msg_id, output_index=self.msg["index"],
                           content_index=0, part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def text(self, piece: str) -> list[dict[str, Any]]:
        events = self.open_message() if self.msg is None else []
        self.msg["pieces"].append(piece)
        return events + [self.event("response.output_text.delta", item_id=self.msg["id"],
                                    output_index=self.msg["index"], content_index=0, delta=piece, logprobs=[])]

    def close_message(self) -> list[dict[str, Any]]:
        if self.msg is None:
            return []
        msg, self.msg = self.msg, None
        text = "".join(msg["pieces"])
        done = _message(msg["id"], text, "completed")
        self.output[msg["index"]] = done
        where = dict(item_id=msg["id"], output_index=msg["index"], content_index=0)
        return [self.event("response.output_text.done", text=text, logprobs=[], **where),
                self.event("response.content_part.done", part=done["content"][0], **where),
                self.event("response.output_item.done", output_index=msg["index"], item=done)]

    def tool_call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events = self.close_message()
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}
        index = len(self.output)
        self.output.append(item)
        return events + [
            self.event("response.output_item.added", output_index=index,
                       item={**item, "arguments": "", "status": "in_progress"}),
            self.event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                       delta=item["arguments"]),
            self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                       arguments=item["arguments"]),
            self.event("response.output_item.done", output_index=index, item=item)]


async def stream(running, rid: str, req: ResponsesRequest, metrics):
    """The Responses streaming events, item by item: reasoning (whole, once it ends), the
    message's text deltas, each function call once its closing tag arrives; then
    ``response.completed`` with the same output a non-streaming request returns."""
    st = _StreamState()
    yield st.event("response.created", response=_response(running, rid, req, "in_progress", [], None))
    yield st.event("response.in_progress", response=_response(running, rid, req, "in_progress", [], None))
    parser = running.parser
    async for ev in running.events():
        finished = isinstance(ev, FinishEvent)
        failure = running.ended(ev, metrics) if finished else None
        if failure is not None:
            yield st.event("error", code="server_error", message=failure[1], param=None)
            return
        if not finished:
            metrics.tokens()
        for delta in parser.feed(ev.text) + (parser.finish() if finished else []):
            if delta.get("reasoning_content"):
                st.reasoning.append(delta["reasoning_content"])
                continue
            for out in st.close_reasoning():
                yield out
            if delta.get("content"):
                for out in st.text(delta["content"]):
                    yield out
            for call in delta.get("tool_calls") or []:
                for out in st.tool_call(call):
                    yield out
        if finished:
            tail = st.close_reasoning()
            if st.msg is None and not any(item["type"] == "function_call" for item in st.output):
                tail += st.open_message()  # an empty reply is still one (empty) message, as in the body
            tail += st.close_message()
            for out in tail:
                yield out
            yield st.event("response.completed", response=_response(running, rid, req, "completed", st.output, ev))
            return
