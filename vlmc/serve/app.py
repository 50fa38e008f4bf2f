"""The OpenAI-compatible HTTP app (FastAPI on uvicorn).

FastAPI because its pydantic request models give the strict validation this server
promises (an unknown field is a 400 naming it) and the OpenAPI spec (``/openapi.json``,
``/docs``) for free, and Starlette's streaming responses cancel the generator when a
client disconnects, which is how a gone client's batch slot is freed. Generation itself
never runs on the event loop: request preparation runs in worker threads and the model
runs on the generation loop's thread (``runtime.batcher``).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import traceback
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse

from .. import __version__
from ..errors import ContextLengthError, InputError, VlmcError
from ..runtime.batcher import FinishEvent, QueueFull, TokenEvent
from . import responses_api
from .errors import BodyTooLarge, Guard, error_body, error_response, validation_message
from .jobs import GenerationFailed, Running, Settings, plan_chat, plan_completion
from .metrics import Metrics, prometheus
from .models import Models, UnknownModel
from .parsers import parse_output
from .protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest


PREPARE_CONCURRENCY = 4


def create_app(models: Models, settings: Settings | None = None, *, api_key: str | None = None,
               cors_origins: list[str] | None = None, max_body_bytes: int = 32 * 2**20) -> Any:
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(models.close)  # shutdown: stop the loop, flush the prefix cache

    app = FastAPI(title="vlmc", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server for vision-language models compiled by vlmc")
    app.state.models, app.state.settings, app.state.metrics = models, settings, metrics

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

    @app.exception_handler(BodyTooLarge)
    async def _too_big(request: Request, exc: BodyTooLarge):
        return error_response(413, f"the request body is over {max_body_bytes} bytes (--max-body-bytes)")

    @app.exception_handler(GenerationFailed)
    async def _failed(request: Request, exc: GenerationFailed):
        return error_response(exc.args[0], exc.args[1])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        traceback.print_exception(exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.middleware("http")
    async def _count(request: Request, call_next):
        response = await call_next(request)
        metrics.record(request.url.path, response.status_code)
        return response

    # ------------------------------------------------------------------ service routes
    @app.get("/health")
    async def health():
        resident = models.resident
        if resident is not None and not resident.batcher.alive:
            return JSONResponse({"status": "unhealthy", "error": f"generation loop died: {resident.batcher.error}"},
                                status_code=503)
        return {"status": "ok", "model": resident.id if resident else None}

    ui_page = (Path(__file__).parent / "ui.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    async def ui():
        """A chat page over this API (static; the API key, if any, is typed into it)."""
        return HTMLResponse(ui_page)

    @app.get("/v1/models")
    @app.get("/models", include_in_schema=False)
    async def list_models():
        data = []
        for mid in models.listing():
            entry = {"id": mid, "object": "model", "created": int(metrics.started), "owned_by": "vlmc",
                     "loaded": models.resident is not None and models.resident.id == mid}
            if entry["loaded"]:
                vlm = models.resident.vlm
                entry["context_length"] = vlm.max_context
                entry["input_modalities"] = ["text", "image"] if vlm.image_token_id is not None else ["text"]
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
            return PlainTextResponse(prometheus(snap), media_type="text/plain; version=0.0.4")
        return snap

    # ------------------------------------------------------------------ generation routes
    # Preparing a request decodes its images (up to --max-image-pixels each): a few at a time,
    # so a burst of large images cannot hold dozens of decoded pictures in memory at once.
    preparing = asyncio.Semaphore(PREPARE_CONCURRENCY)

    async def start(model: str | None, plan_fn, req) -> Running:
        resident = await models.get(model)
        if resident.batcher.load()["queue_depth"] >= resident.batcher.max_queue:
            raise QueueFull("the queue is full")  # before spending any work on this request
        async with preparing:
            plan = await run_in_threadpool(plan_fn, resident, req, settings)
        running = Running(resident, plan)
        running.submit()
        metrics.in_flight += 1  # until its events end (_collect, or the stream closing)
        return running

    async def generate(req, request: Request, plan_fn, prefix: str, stream_fn, body_fn):
        running = await start(req.model, plan_fn, req)
        rid = f"{prefix}{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(running, metrics, stream_fn(running, rid, include_usage, metrics))
        return body_fn(running, rid, await _collect(running, request, metrics))

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions", include_in_schema=False)
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await generate(req, request, plan_chat, "chatcmpl-", _chat_stream, _chat_body)

    @app.post("/v1/completions")
    @app.post("/completions", include_in_schema=False)
    async def completions(req: CompletionRequest, request: Request):
        return await generate(req, request, plan_completion, "cmpl-", _completion_stream, _completion_body)

    @app.post("/v1/responses")
    @app.post("/responses", include_in_schema=False)
    async def responses(req: ResponsesRequest, request: Request):
        chat = responses_api.to_chat_request(req)
        running = await start(req.model, plan_chat, chat)
        rid = f"resp_{uuid.uuid4().hex}"
        if req.stream:
            return _sse(running, metrics, responses_api.stream(running, rid, req, metrics), events=True)
        events = await _collect(running, request, metrics)
        return responses_api.body(running, rid, req, events)

    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["*"], allow_headers=["*"])
    return Guard(app, api_key=api_key, max_body_bytes=max_body_bytes)


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


async def _collect(running: Running, request: Request, metrics: Metrics) -> list[Any]:
    """All events of a non-streaming request; a client that disconnects cancels the job."""
    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)
        running.job.cancel()

    watcher = asyncio.create_task(watch())
    events = []
    try:
        async for ev in running.events():
            if isinstance(ev, TokenEvent):
                metrics.tokens()
            events.append(ev)
    finally:
        watcher.cancel()
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
