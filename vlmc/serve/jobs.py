"""From an API request to a job for the generation loop, and back as events.

Everything that can fail because of the request (template, prompt length, sampling
values, schemas; images in ``media``) fails here, in worker threads, before the job is
queued, so a bad request costs the running batch nothing and gets a 4xx. A chat request
is checked in two steps: ``draft_chat`` before its images are fetched (so an over-long
prompt costs no fetch), ``plan_chat`` with them.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ContextLengthError, InputError
from ..runtime.batcher import FinishEvent, Job, Thinking, TokenEvent
from ..runtime.chat import normalize_messages, render_chat
from ..runtime.engine import Prompt
from ..runtime.sampling import SamplingParams
from .media import MediaLimits
from .models import Resident
from .parsers import OutputParser
from .protocol import ChatCompletionRequest, CompletionRequest, ResponseFormat


@dataclass
class Settings:
    """Server-wide defaults and limits (the ``vlmc serve`` flags)."""
    default_max_tokens: int = 512
    top_logprobs_k: int = 5
    max_prompt_tokens: int | None = None
    enable_thinking: bool | None = None
    thinking_budget: int | None = None
    think_start: str = "<think>"
    think_end: str = "</think>"
    media: MediaLimits = field(default_factory=MediaLimits)


@dataclass
class Plan:
    """A prepared request: the job's inputs and how to shape its output."""
    prompt: Prompt
    params: SamplingParams
    max_tokens: int
    stop: list[str]
    logprobs: int | None
    constraint: Any
    thinking: Thinking | None
    parser: dict[str, Any]          # OutputParser keyword arguments
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 16:
        raise InputError(f"stop takes at most 16 strings, got {len(stops)}")
    if any(not s for s in stops):
        raise InputError("stop strings must not be empty")
    return stops


def sampling(req: Any, vlm: Any) -> SamplingParams:
    """The request's sampling fields; those it leaves unset take the checkpoint's
    generation_config.json defaults (unless --generation-config vlmc), else OpenAI's
    (temperature 1)."""
    if getattr(req, "stream_options", None) is not None and not req.stream:
        raise InputError("stream_options is only allowed with stream: true")
    given = {name: getattr(req, name, None) for name in ("temperature", "top_p", "top_k", "min_p",
                                                          "repetition_penalty", "seed")}
    return vlm.sampling_params(base={"temperature": 1.0}, **given)


def _constraint(resident: Resident, fmt: ResponseFormat | None) -> Any:
    if fmt is None or fmt.type == "text":
        return None
    grammar = resident.grammar()
    if fmt.type == "json_object":
        return grammar.json(None)
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise InputError("response_format json_schema needs json_schema.schema")
    return grammar.json(fmt.json_schema.schema_)


def _max_tokens(requested: int | None, prompt_len: int, context: int, settings: Settings) -> int:
    """The reply budget: the request's own (refused if the context cannot hold it, as
    vLLM does, rather than silently cut), or the server default cut to the room left."""
    room = context - prompt_len
    if requested is not None and requested > room:
        raise ContextLengthError(f"max_tokens is {requested}, but the prompt ({prompt_len} tokens) leaves room for "
                         f"{room} in the model's context of {context} tokens")
    return min(requested or settings.default_max_tokens, room)


def prompt_limit(resident: Resident, settings: Settings) -> int:
    context = resident.vlm.max_context
    return min(context - 1, settings.max_prompt_tokens or context)


def check_prompt(prompt: Prompt, resident: Resident, settings: Settings) -> None:
    n, context = len(prompt.ids), resident.vlm.max_context
    limit = prompt_limit(resident, settings)
    if n > limit:
        raise ContextLengthError(f"the prompt is {n} tokens; this server takes at most {limit} "
                         f"(the model's context is {context} tokens, and room is needed for the reply)")


def guard_text(text: str, resident: Resident, settings: Settings) -> None:
    """Refuse a text that is certainly over the prompt limit before it is tokenized in
    full (``Tokenizer.exceeds``: a bounded amount of work whatever its length)."""
    limit = prompt_limit(resident, settings)
    if resident.vlm.tokenizer.exceeds(text, limit):
        raise ContextLengthError(f"the prompt is over {limit} tokens ({len(text)} characters); this server takes at "
                                 f"most {limit} (--max-prompt-tokens, and the model's context of "
                                 f"{resident.vlm.max_context} tokens)")


# Names the chat template is called with already: a request may not set them through
# chat_template_kwargs (``tools`` has its own field).
RESERVED_TEMPLATE_KWARGS = ("template", "messages", "add_generation_prompt", "bos_token", "eos_token", "tools")


@dataclass
class ChatDraft:
    """What a chat request needs besides its images, checked before any image is fetched."""
    messages: list[dict[str, Any]]
    refs: list[Any]                      # image references, in order of appearance
    template_vars: dict[str, Any]
    tools: list[dict[str, Any]] | None
    names: list[str] | None              # the function a tool_choice forces
    thinking: bool | None


def draft_chat(resident: Resident, req: ChatCompletionRequest, settings: Settings) -> ChatDraft:
    """Everything about a chat request that does not need its images, including the length
    of the rendered prompt: a request that cannot fit is refused before anything is fetched."""
    vlm = resident.vlm
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    _, refs = normalize_messages(messages)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    choice = req.tool_choice
    if choice is not None and not tools:
        raise InputError("tool_choice needs tools")
    if choice == "none":
        tools = None
    names = None
    if isinstance(choice, dict) or hasattr(choice, "function"):
        name = choice.function.name
        if name not in {t["function"]["name"] for t in tools}:
            raise InputError(f"tool_choice names {name!r}, which is not among the tools")
        names = [name]
    thinking = settings.enable_thinking if req.enable_thinking is None else req.enable_thinking
    template_vars: dict[str, Any] = dict(req.chat_template_kwargs or {})
    taken = [k for k in RESERVED_TEMPLATE_KWARGS if k in template_vars]
    if taken:
        raise InputError(f"chat_template_kwargs may not set {', '.join(taken)} (the server sets "
                         f"{'it' if len(taken) == 1 else 'them'}; tools go in the tools field)")
    if "enable_thinking" in template_vars and req.enable_thinking is not None:
        raise InputError("give enable_thinking once (top level or in chat_template_kwargs)")
    thinking = template_vars.pop("enable_thinking", thinking)
    if thinking is not None:
        template_vars["enable_thinking"] = bool(thinking)
    if tools:
        template_vars["tools"] = tools
    if vlm.chat_template is not None:
        rendered = _render(vlm, messages, template_vars)
        guard_text(rendered, resident, settings)
        if tools and choice in (None, "auto"):
            _check_template_takes_tools(vlm, messages, template_vars, rendered)
    return ChatDraft(messages, refs, template_vars, tools, names, thinking)


def plan_chat(resident: Resident, req: ChatCompletionRequest, settings: Settings, draft: ChatDraft,
              images: list[Any]) -> Plan:
    vlm = resident.vlm
    tools, names, thinking, choice = draft.tools, draft.names, draft.thinking, req.tool_choice
    prompt = vlm.build_prompt(messages=draft.messages, loaded_images=images, template_vars=draft.template_vars)
    check_prompt(prompt, resident, settings)
    opened = prompt.text.rstrip().endswith(settings.think_start)
    if thinking is None and opened:  # neither request nor server said, and the template's
        thinking = True              # default opened a think block: it thinks
    starts_inside = bool(thinking) and opened
    if req.thinking_budget is not None and not thinking:
        raise InputError("thinking_budget needs thinking on (enable_thinking: true, the server's --enable-thinking, "
                         "or a chat template that thinks by default)")
    budget = req.thinking_budget or settings.thinking_budget
    think = None
    if budget and thinking:
        think = Thinking(budget, settings.think_start, settings.think_end,
                         vlm.tokenizer.encode(settings.think_end), inside=starts_inside)
    if req.response_format is not None and req.response_format.type != "text" and (choice in ("required",) or names):
        raise InputError("response_format and a forced tool_choice cannot be combined")
    constraint = _constraint(resident, req.response_format)
    if tools and (choice == "required" or names):
        constraint = resident.grammar().tool_call(tools, names)
    logprobs = None
    if req.logprobs:
        logprobs = _top_k(req.top_logprobs or 0, settings)
    elif req.top_logprobs is not None:
        raise InputError("top_logprobs needs logprobs: true")
    requested = req.max_completion_tokens or req.max_tokens
    if req.max_completion_tokens and req.max_tokens and req.max_completion_tokens != req.max_tokens:
        raise InputError("max_tokens and max_completion_tokens disagree; give one")
    return Plan(prompt, sampling(req, vlm), _max_tokens(requested, len(prompt.ids), vlm.max_context, settings),
                _stops(req.stop), logprobs, constraint, think,
                dict(tools=tools, thinking=bool(thinking), think_start=settings.think_start,
                     think_end=settings.think_end, starts_in_thinking=starts_inside),
                req.presence_penalty or 0.0, req.frequency_penalty or 0.0, _min_tokens(req))


def _render(vlm: Any, messages: list[dict], variables: dict[str, Any]) -> str:
    return render_chat(vlm.chat_template, messages, bos_token=vlm.tokenizer.bos_token,
                       eos_token=vlm.tokenizer.eos_token, **variables)


def _check_template_takes_tools(vlm: Any, messages: list[dict], template_vars: dict[str, Any],
                                rendered: str) -> None:
    """With tool_choice auto the model only learns of the tools through its chat template;
    a template that renders the same text without them would drop them silently."""
    without = {k: v for k, v in template_vars.items() if k != "tools"}
    if rendered == _render(vlm, messages, without):
        raise InputError("this model's chat template ignores tools, so with tool_choice 'auto' the model would "
                         "never see them; use tool_choice 'required' or a named function (the reply is then "
                         "constrained to a call), or leave tools out")


def _min_tokens(req: Any) -> int:
    limit = getattr(req, "max_completion_tokens", None) or req.max_tokens
    if limit is not None and req.min_tokens > limit:
        raise InputError(f"min_tokens ({req.min_tokens}) is larger than max_tokens ({limit})")
    return req.min_tokens


def _top_k(k: int, settings: Settings) -> int:
    if k > settings.top_logprobs_k:
        raise InputError(f"top_logprobs is {k}; this server returns at most {settings.top_logprobs_k} "
                         f"(--top-logprobs-k)")
    return k


def plan_completion(resident: Resident, req: CompletionRequest, settings: Settings) -> Plan:
    vlm = resident.vlm
    if req.echo:
        raise InputError("echo is not supported")
    prompt_in = req.prompt
    if isinstance(prompt_in, list) and prompt_in and all(isinstance(p, str) for p in prompt_in):
        if len(prompt_in) != 1:
            raise InputError("only one prompt per request is supported (got a list of several)")
        prompt_in = prompt_in[0]
    if isinstance(prompt_in, str):
        if not prompt_in:
            raise InputError("the prompt is empty")
        guard_text(prompt_in, resident, settings)
        ids = vlm.encode_prompt(prompt_in)
        text = prompt_in
    else:
        ids = list(prompt_in)
        check_prompt(Prompt(ids, None, ""), resident, settings)  # before looking at (or decoding) each id
        vocab = vlm.tokenizer.vocab_size
        if not ids or any(not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise InputError(f"a token-id prompt must be a non-empty list of ids in [0, {vocab})")
        text = vlm.tokenizer.decode(ids)
    if any(t in ids for t in vlm.placeholder_ids):
        raise InputError("the prompt contains image placeholder tokens; send images through /v1/chat/completions")
    prompt = Prompt(ids, None, text)
    check_prompt(prompt, resident, settings)
    logprobs = None if req.logprobs is None else _top_k(req.logprobs, settings)
    return Plan(prompt, sampling(req, vlm), _max_tokens(req.max_tokens, len(ids), vlm.max_context, settings),
                _stops(req.stop), logprobs, _constraint(resident, req.response_format), None,
                dict(tools=None, thinking=False), req.presence_penalty or 0.0, req.frequency_penalty or 0.0,
                _min_tokens(req))


class GenerationFailed(Exception):
    """A job that ended without a reply: a bug hit it (500), or the server cancelled it (503)."""


def generation_failure(finish: FinishEvent) -> tuple[int, str] | None:
    """(HTTP status, message) for a job that ended without a reply; None if it has one."""
    if finish.reason == "error":
        return 500, f"generation failed: {finish.error}"
    if finish.reason == "cancelled":
        return 503, "the request was cancelled: the model was unloaded or swapped out, or the server is stopping"
    return None


class Running:
    """A submitted job seen from the event loop: its events arrive on an asyncio queue."""

    def __init__(self, resident: Resident, plan: Plan):
        self.resident, self.plan = resident, plan
        self.queue: asyncio.Queue = asyncio.Queue()
        self.parser = OutputParser(**plan.parser)
        self.created = int(time.time())
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        loop = asyncio.get_running_loop()
        self.job = Job(plan.prompt, lambda ev: loop.call_soon_threadsafe(self.queue.put_nowait, ev),
                       plan.params, plan.max_tokens, plan.stop, plan.logprobs, plan.constraint, plan.thinking,
                       min_tokens=plan.min_tokens, presence_penalty=plan.presence_penalty,
                       frequency_penalty=plan.frequency_penalty)

    def submit(self) -> None:
        self.resident.batcher.submit(self.job)

    async def events(self):
        """TokenEvents, then one FinishEvent; cancels the job if the consumer goes away."""
        try:
            while True:
                ev = await self.queue.get()
                if isinstance(ev, TokenEvent) and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                yield ev
                if isinstance(ev, FinishEvent):
                    return
        finally:
            self.job.cancel()

    def ended(self, finish: FinishEvent, metrics: Any) -> tuple[int, str] | None:
        """Record this request's TTFT and latency; (HTTP status, message) if it ended
        without a reply (every route's end, streamed or not)."""
        metrics.finished(self.started, self.first_token_at)
        return generation_failure(finish)

    def token_text(self, token: int) -> str:
        return self.resident.vlm.tokenizer.decode([token])


def media_root(path: str | None) -> Path | None:
    if path is None:
        return None
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InputError(f"--allowed-local-media-path {path}: not a folder")
    return root.resolve()
