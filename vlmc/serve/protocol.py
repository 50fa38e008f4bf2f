"""Request bodies of the OpenAI-compatible API, as pydantic models.

Every model forbids fields it does not declare, so a parameter vlmc does not implement
is a 400 that names it rather than something silently ignored. Bodies are parsed strictly
(``parse_body``): ``"stream": "yes"`` or ``true`` as a token id is an error, not a guess,
and a string holding a lone UTF-16 surrogate is invalid JSON, not a crash further down. Fields are typed loosely
where the runtime already validates with better messages (message content parts go
through ``runtime.chat.normalize_messages``; sampling values through ``SamplingParams``).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, TypeVar, Union

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class JsonSchema(Strict):
    name: str = "response"
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(default=None, alias="schema")
    strict: Optional[bool] = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchema] = None


class FunctionDef(Strict):
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(Strict):
    name: str


class ToolChoiceNamed(Strict):
    type: Literal["function"]
    function: ToolChoiceFunction


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Any], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class Sampling(Strict):
    """Sampling fields shared by every generation endpoint."""
    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(default=None, gt=0)
    presence_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(default=None, ge=-2, le=2)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    min_tokens: int = Field(default=0, ge=0, description="vlmc/vLLM extension: no EOS before this many tokens")


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceNamed, None] = None
    enable_thinking: Optional[bool] = None
    thinking_budget: Optional[int] = Field(default=None, ge=1)
    chat_template_kwargs: Optional[dict[str, Any]] = None


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0, le=20)
    echo: bool = False
    response_format: Optional[ResponseFormat] = None


class ResponsesText(Strict):
    format: Optional[dict[str, Any]] = None


class ResponsesTool(Strict):
    type: Literal["function"]
    name: str
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ResponsesRequest(Strict):
    model: Optional[str] = None
    input: Union[str, list[dict[str, Any]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    text: Optional[ResponsesText] = None
    tools: Optional[list[ResponsesTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    store: Optional[bool] = None


Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], body: bytes) -> Body:
    """A request body as ``model``, parsed as strict JSON by pydantic (no second parse);
    every problem is a RequestValidationError, which the app answers with a 400."""
    if not body.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "the request body is empty"}])
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        for err in errors:
            if err.get("type") == "json_invalid" and ("escape" in str(err.get("ctx")) or "code point" in str(err.get("ctx"))):
                err["ctx"] = {"error": f"{err['ctx']['error']}: strings must be valid Unicode, without lone "
                                       f"surrogates such as \\ud800"}
        raise RequestValidationError(errors) from None


def request_schemas() -> dict[str, Any]:
    """JSON schemas of the request bodies (and the models they use), for the OpenAPI spec."""
    out: dict[str, Any] = {}
    for model in (ChatCompletionRequest, CompletionRequest, ResponsesRequest):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema
    return out
