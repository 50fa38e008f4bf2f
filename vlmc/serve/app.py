"""The OpenAI-compatible HTTP app (FastAPI on uvicorn).

FastAPI for its routing, exception handlers and OpenAPI page (``/docs``); request bodies
are parsed by pydantic directly (``protocol.parse_body``: strict, and off the event loop
when large), so an unknown field is a 400 naming it and nothing is coerced. Generation
never runs on the event loop, and neither does anything long: planning (template,
tokenizer) and image decoding run in worker threads, image URLs are fetched
asynchronously, and the model runs on the generation loop's thread (``runtime.batcher``).

A request counts against ``--max-queue`` from the moment it is admitted, while its images
are fetched and its prompt prepared, not only once it waits for a batch slot, so a burst of
slow fetches gets 429s instead of an invisible line. A client that disconnects cancels
its request wherever it is: while preparing, waiting, or generating.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from .. import __version__
from ..errors import ContextLengthError, InputError, VlmcError
from ..runtime.batcher import FinishEvent, LoopStopped, QueueFull, TokenEvent
from . import responses_api
from .errors import error_body, error_response, validation_message
from .jobs import GenerationFailed, Running, Settings, draft_chat, plan_chat, plan_completion
from .media import MediaLoader
from .metrics import Metrics, prometheus
from .middleware import CLIENT_GONE, Front, Guard, request_id
from .models import Models, UnknownModel
from .parsers import parse_output
from .protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest, parse_body, request_schemas

T = TypeVar("T")

_PARSE_INLINE_BYTES = 1 << 16  # bodies up to this are parsed on the event loop (faster than a thread hop)


class ClientGone(Exception):
    """The client disconnected before its reply was ready; its work was cancelled."""


def create_app(models: Models, settings: Settings | None = None, *, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = 32 * 2**20,
               read_timeout: float = 15.0) -> Any:
    settings = settings or Settings()
    metrics = Metrics()
    media = MediaLoader(settings.media)
    metrics.media = media

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await media.fetcher.close()
        await asyncio.to_thread(models.close)  # shutdown: stop the loop, flush the prefix cache

    app = FastAPI(title="vlmc", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for vision-language models compiled by vlmc")
    app.state.models, app.state.settings, app.state.metrics = models, settings, metrics

    def openapi() -> dict[str, Any]:
        """The spec, with the request bodies the routes parse themselves, and the API key
        scheme so /docs' "Authorize" sends it."""
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            spec.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas())
            if api_key:
                spec["components"]["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
                spec["security"] = [{"apiKey": []}]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi

    # ------------------------------------------------------------------ errors
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(InputError)
    async def _bad_input(request: Request, exc: InputError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return error_response(400, str(exc), code=code)

    @app.exception_handler(VlmcError)
    async def _vlmc_error(request: Request, exc: VlmcError):  # e.g. a model that fails to load
        return error_response(500, str(exc), code="model_error")

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return error_response(404, f"model {exc.args[0]!r} is not served here (served: {', '.join(models.listing())})",
                              param="model", code="model_not_found")

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, exc: QueueFull):
        return error_response(429, f"the server is busy ({exc}); retry shortly", code="queue_full",
                              headers={"Retry-After": "1"})

    @app.exception_handler(LoopStopped)
    async def _stopped(request: Request, exc: LoopStopped):
        return error_response(503, "the model was unloaded or swapped out while this request was being prepared; "
                                   "retry", code="model_unloaded", headers={"Retry-After": "1"})

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, exc: GenerationFailed):
        return error_response(exc.args[0], exc.args[1], headers={"Retry-After": "1"} if exc.args[0] == 503 else None)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone):
        return Response(status_code=CLIENT_GONE)  # nobody reads it; /metrics counts it

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # Front writes the log line (this one re-raises to it)
        rid = request_id.get()
        return error_response(500, f"internal error (request id {rid}); the server log has the details",
                              code="internal_error")

    # ------------------------------------------------------------------ service routes
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        resident = models.resident
        if resident is not None and not resident.batcher.alive:
            return JSONResponse({"status": "unhealthy", "error": f"generation loop died: {resident.batcher.error}"},
                                status_code=503)
        return {"status": "ok", "model": resident.id if resident else None}

    ui_page = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root():
        return RedirectResponse("/ui")

    @app.api_route("/ui", methods=["GET", "HEAD"], include_in_schema=False)
    async def ui():
        """A chat page over this API (static; the API key, if any, is typed into it)."""
        return HTMLResponse(ui_page)

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def list_models():
        resident = models.resident  # once: an /unload may clear it meanwhile
        data = []
        for mid in models.listing():
            loaded = resident is not None and resident.id == mid
            entry = {"id": mid, "object": "model", "created": int(metrics.started), "owned_by": "vlmc",
                     "loaded": loaded}
            if loaded:
                vlm = resident.vlm
                entry["context_length"] = vlm.max_context
                entry["input_modalities"] = ["text"] + (["image"] if vlm.image_token_id is not None else []) + \
                    (["video"] if vlm.inputs.video_processor is not None else [])
            else:
                entry.update(_describe(models.sources[mid]))
            data.append(entry)
        return {"object": "list", "data": data}

    @app.post("/unload")
    async def unload():
        gone = await models.unload()
        return {"unloaded": gone, "mlx_active_memory_bytes": __import__("mlx.core").core.get_active_memory()}

    @app.get("/metrics")
    async def get_metrics(request: Request, format: str | None = None):
        snap = metrics.snapshot(models)
        accept = request.headers.get("accept", "")
        if format == "prometheus" or (format is None and ("text/plain" in accept or "openmetrics" in accept)):
            return Response(prometheus(snap), media_type="text/plain; version=0.0.4; charset=utf-8")
        return snap

    # ------------------------------------------------------------------ generation routes
    async def body_of(request: Request, model: type[T]) -> T:
        raw = await request.body()
        if len(raw) > _PARSE_INLINE_BYTES:
            return await run_in_threadpool(parse_body, model, raw)
        return parse_body(model, raw)

    async def start(model: str | None, req: Any, chat: bool) -> Running:
        """Admit, prepare and submit a request: its images fetched and decoded, its prompt
        built and checked. It counts against --max-queue all along."""
        resident = await models.get(model)
        waiting = metrics.preparing + resident.batcher.load()["queue_depth"]
        if waiting >= resident.batcher.max_queue:
            raise QueueFull(f"{waiting} requests are already waiting")  # before spending any work on this one
        metrics.preparing += 1
        try:
            if chat:
                draft = await run_in_threadpool(draft_chat, resident, req, settings)
                vlm_inputs = resident.vlm.inputs
                images = await media.load(draft.refs, video_sampler=vlm_inputs.video_sampler
                                           if vlm_inputs.video_processor is not None else None) if draft.refs else []
                async with media.slot() if images else contextlib.nullcontext():  # preprocessing is image work too
                    plan = await run_in_threadpool(plan_chat, resident, req, settings, draft, images)
            else:
                plan = await run_in_threadpool(plan_completion, resident, req, settings)
            running = Running(resident, plan)
            running.submit()
        finally:
            metrics.preparing -= 1
        metrics.in_flight += 1  # until its events end (_collect, or the stream closing)
        return running

    async def generate(request: Request, req: Any, chat: bool, prefix: str, stream_fn, body_fn,
                       stream: bool | None = None):
        if req.stream if stream is None else stream:
            running = await while_connected(request, start(req.model, req, chat))
            rid = f"{prefix}{uuid.uuid4().hex}"
            include_usage = bool(getattr(req, "stream_options", None) and req.stream_options.include_usage)
            return _sse(running, metrics, stream_fn(running, rid, include_usage, metrics),
                        events=prefix == "resp_")

        async def whole():
            running = await start(req.model, req, chat)
            try:
                events = await _collect(running, metrics)
            except asyncio.CancelledError:
                running.job.cancel()
                raise
            return body_fn(running, f"{prefix}{uuid.uuid4().hex}", events)

        return await while_connected(request, whole())

    chat_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ChatCompletionRequest"}}}}}
    completion_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/CompletionRequest"}}}}}
    responses_body = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ResponsesRequest"}}}}}

    @app.post("/v1/chat/completions", openapi_extra=chat_body)
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request):
        req = await body_of(request, ChatCompletionRequest)
        return await generate(request, req, True, "chatcmpl-", _chat_stream, _chat_body)

    @app.post("/v1/completions", openapi_extra=completion_body)
    @app.post("/completions", include_in_schema=False)
    async def completions(request: Request):
        req = await body_of(request, CompletionRequest)
        return await generate(request, req, False, "cmpl-", _completion_stream, _completion_body)

    @app.post("/v1/responses", openapi_extra=responses_body)
    @app.post("/responses", include_in_schema=False)
    async def responses(request: Request):
        req = await body_of(request, ResponsesRequest)
        chat = responses_api.to_chat_request(req)
        return await generate(request, chat, True, "resp_",
                              lambda running, rid, _usage, m: responses_api.stream(running, rid, req, m),
                              lambda running, rid, events: responses_api.body(running, rid, req, events),
                              stream=req.stream)

    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    guarded = Guard(app, api_key=api_key, max_body_bytes=max_body_bytes, read_timeout=read_timeout)
    return Front(guarded, metrics.record)


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled
    (and with it the request's job) and ClientGone is raised."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        gone.cancel()
        raise
    if task.done():
        gone.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise ClientGone()


async def _disconnected(receive) -> None:
    """Returns once the client has gone (the body was read already, so the next message
    the server gives is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0)  # (a server that answers with empty body messages must not spin us)


def _describe(source: str) -> dict[str, Any]:
    """Context length and modalities of a model that is not loaded, from its config."""
    from pathlib import Path
    for name in ("manifest.json", "config.json"):
        path = Path(source).expanduser() / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                return {}
            text = cfg.get("text_config") or cfg.get("meta", {}).get("text") or cfg
            ctx = text.get("max_position_embeddings")
            return {"context_length": ctx, "input_modalities": ["text", "image"]} if ctx else {}
    return {}


# ---------------------------------------------------------------------- shared output shaping
def usage(finish: FinishEvent) -> dict[str, Any]:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": finish.cached_tokens}}


async def _collect(running: Running, metrics: Metrics) -> list[Any]:
    """All events of a non-streaming request (``while_connected`` cancels it if its
    client disconnects)."""
    events = []
    try:
        async for ev in running.events():
            if isinstance(ev, TokenEvent):
                metrics.tokens()
            events.append(ev)
    finally:
        metrics.in_flight -= 1
    failure = running.ended(events[-1], metrics)
    if failure is not None:
        raise GenerationFailed(*failure)
    return events



def _finish_reason(finish: FinishEvent, tool_calls: bool) -> str:
    if tool_calls:
        return "tool_calls"
    return finish.reason if finish.reason in ("stop", "length") else "stop"


def _token_logprob(running: Running, token: int, lp: float, top: list) -> dict[str, Any]:
    text = running.token_text(token)
    return {"token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := running.token_text(i)), "logprob": v, "bytes": list(t.encode())}
                             for i, v in (top or [])]}


def _chat_body(running: Running, rid: str, events: list[Any]) -> dict[str, Any]:
    finish: FinishEvent = events[-1]
    text = "".join(ev.text for ev in events[:-1]) + finish.text
    parsed = parse_output(text, **running.plan.parser)
    message: dict[str, Any] = {"role": "assistant", "content": parsed.content if (parsed.content or not parsed.tool_calls) else None}
    if parsed.reasoning_content is not None:
        message["reasoning_content"] = parsed.reasoning_content
    if parsed.tool_calls:
        message["tool_calls"] = parsed.tool_calls
    logprobs = None
    if running.plan.logprobs is not None:
        logprobs = {"content": [_token_logprob(running, ev.token, ev.logprob, ev.top_logprobs)
                                for ev in events[:-1]]}
    return {"id": rid, "object": "chat.completion", "created": running.created, "model": running.resident.id,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                         "finish_reason": _finish_reason(finish, bool(parsed.tool_calls))}],
            "usage": usage(finish)}


def _sse(running: Running, metrics: Metrics, chunks: AsyncIterator[Any], events: bool = False) -> StreamingResponse:
    async def body():
        try:
            async for item in chunks:
                if events:
                    yield f"event: {item['type']}\ndata: {json.dumps(item)}\n\n"
                else:
                    yield f"data: {item if isinstance(item, str) else json.dumps(item)}\n\n"
        finally:  # done, or the client went away (Starlette closes this generator): free the slot now
            running.job.cancel()
            metrics.in_flight -= 1
    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_stream(running: Running, rid: str, include_usage: bool, metrics: Metrics):
    base = {"id": rid, "object": "chat.completion.chunk", "created": running.created, "model": running.resident.id}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    parser, saw_tools = running.parser, False
    async for ev in running.events():
        if isinstance(ev, TokenEvent):
            metrics.tokens()
            deltas = parser.feed(ev.text)
            lp = None
            if running.plan.logprobs is not None:
                lp = {"content": [_token_logprob(running, ev.token, ev.logprob, ev.top_logprobs)]}
                if not deltas:
                    deltas = [{"content": ""}]
            for i, delta in enumerate(deltas):
                saw_tools |= "tool_calls" in delta
                yield chunk(delta, logprobs=lp if i == 0 else None)
            continue
        failure = running.ended(ev, metrics)
        if failure is not None:
            yield error_body(*failure)
            return
        for delta in parser.feed(ev.text) + parser.finish():
            saw_tools |= "tool_calls" in delta
            yield chunk(delta)
        yield chunk({}, _finish_reason(ev, saw_tools))
        if include_usage:
            yield {**base, "choices": [], "usage": usage(ev)}
        yield "[DONE]"


def _completion_logprobs(running: Running, events: list[Any]) -> dict[str, Any]:
    tokens, lps, tops, offsets, at = [], [], [], [], 0
    for ev in events:
        text = running.token_text(ev.token)
        tokens.append(text)
        lps.append(ev.logprob)
        tops.append({running.token_text(i): v for i, v in (ev.top_logprobs or [])})
        offsets.append(at)
        at += len(ev.text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _completion_body(running: Running, rid: str, events: list[Any]) -> dict[str, Any]:
    finish: FinishEvent = events[-1]
    text = "".join(ev.text for ev in events[:-1]) + finish.text
    logprobs = _completion_logprobs(running, events[:-1]) if running.plan.logprobs is not None else None
    return {"id": rid, "object": "text_completion", "created": running.created, "model": running.resident.id,
            "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _finish_reason(finish, False)}],
            "usage": usage(finish)}


async def _completion_stream(running: Running, rid: str, include_usage: bool, metrics: Metrics):
    base = {"id": rid, "object": "text_completion", "created": running.created, "model": running.resident.id}
    async for ev in running.events():
        if isinstance(ev, TokenEvent):
            metrics.tokens()
            lp = _completion_logprobs(running, [ev]) if running.plan.logprobs is not None else None
            yield {**base, "choices": [{"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None}]}
            continue
        failure = running.ended(ev, metrics)
        if failure is not None:
            yield error_body(*failure)
            return
        yield {**base, "choices": [{"index": 0, "text": ev.text, "logprobs": None,
                                    "finish_reason": _finish_reason(ev, False)}]}
        if include_usage:
            yield {**base, "choices": [], "usage": usage(ev)}
        yield "[DONE]"
