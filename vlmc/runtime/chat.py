"""Chat templates: render a conversation into the prompt text the model was trained on.

Templates are Jinja2 programs shipped with the checkpoint, i.e. untrusted code, so they run in
an immutable sandbox. The environment matches transformers' `apply_chat_template` (trim_blocks,
lstrip_blocks, loop controls, `raise_exception`, a `tojson` that does not HTML-escape,
`strftime_now`, a sandboxed `namespace`) so a prompt renders byte-for-byte the same as there.

Messages arrive OpenAI-style. `normalize_messages` turns every image content part into the
plain `{"type": "image"}` templates test for, and returns the image references separately, in
order of appearance, for the runtime to load.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from vlmc.errors import InputError, SourceError

# Names a message's reasoning text goes under; templates read the first.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_TEXT_PART_TYPES = ("text", "input_text", "output_text")
_IMAGE_PART_TYPES = ("image", "image_url", "input_image")
_VIDEO_PART_TYPES = ("video", "video_url", "input_video")


# --------------------------------------------------------------------------------- environment


def _raise_exception(message: Any) -> None:
    raise jinja2.exceptions.TemplateError(str(message))


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's built-in tojson HTML-escapes '<', '>', '&' and "'"; chat templates want plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the `dict` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore-prefixed attributes (no CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (assistant-mask markers) and render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> jinja2.Template:
    """Compile a chat template once (cached by its text). Syntax errors are SourceErrors."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise SourceError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


# --------------------------------------------------------------------------------- messages


def _plain(value: Any) -> Any:
    """A deep copy made only of JSON types, so the sandbox never sees rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            pass
    return f"<{type(value).__name__}>"


def _image_ref(part: Mapping[str, Any], where: str, required: bool) -> Any:
    """The reference (URL, path, data URI, or an image object) an image content part points at."""
    kind = part.get("type")
    ref: Any = None
    if kind == "image":
        for key in ("image", "url", "path", "image_url", "base64"):
            if part.get(key) is not None:
                ref = part[key]
                break
    else:  # image_url / input_image
        ref = part.get("image_url")
        if ref is None:
            ref = part.get("url") if part.get("url") is not None else part.get("file_id")
    if isinstance(ref, Mapping):  # {"image_url": {"url": ..., "detail": ...}}
        ref = ref.get("url")
    if required and (ref is None or (isinstance(ref, str) and not ref.strip())):
        raise InputError(f"{where} ({kind}) has no image URL or data")
    return ref


def _video_ref(part: Mapping[str, Any], where: str, required: bool) -> Any:
    """A video content part -> ``VideoRef`` (its source, and the sampling it asks for:
    ``fps``, ``max_frames``, ``num_frames`` on the part or inside its ``video_url`` object)."""
    from .video import VideoRef
    ref: Any = None
    settings: dict[str, Any] = {}
    for key in ("video_url", "video", "input_video", "url", "path", "file_id"):
        if part.get(key) is not None:
            ref = part[key]
            break
    if isinstance(ref, Mapping):  # {"video_url": {"url": ..., "fps": ...}}
        settings = {k: ref[k] for k in ("fps", "max_frames", "num_frames") if ref.get(k) is not None}
        ref = ref.get("url")
    settings.update({k: part[k] for k in ("fps", "max_frames", "num_frames") if part.get(k) is not None})
    if required and (ref is None or (isinstance(ref, str) and not ref.strip())):
        raise InputError(f"{where} ({part.get('type')}) has no video URL or data")
    try:
        return VideoRef(ref, **settings)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def normalize_messages(
    messages: Any, *, require_image_refs: bool = True
) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style messages -> (messages for the template, image references in order).

    Content may be a string or a list of parts: `text` / `input_text` (kept as
    `{"type": "text", "text": ...}`) and `image` / `image_url` / `input_image` (each becomes
    `{"type": "image"}`; its URL, path, data URI or object is appended to the returned list),
    and `video` / `video_url` / `input_video` (each becomes `{"type": "video"}`; a
    ``vlmc.runtime.video.VideoRef`` is appended, in the same list, so images and videos keep
    their order).
    Keys whose value is None are dropped, as transformers does (templates test for presence).
    An image part without any reference is an InputError unless `require_image_refs=False`
    (then None is recorded), which lets already-normalized messages pass through again.
    """
    if not isinstance(messages, (list, tuple)):
        raise InputError(f"messages must be a list of message objects, got {type(messages).__name__}")
    if not messages:
        raise InputError("messages is empty: at least one message is required")
    out: list[dict[str, Any]] = []
    images: list[Any] = []
    for m_index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            got = type(message).__name__
            raise InputError(f"message {m_index} must be an object with 'role' and 'content', got {got}")
        if "role" in message and not isinstance(message["role"], str):
            raise InputError(f"message {m_index}: 'role' must be a string")
        new: dict[str, Any] = {}
        for key, value in message.items():
            if value is None:
                continue
            if key == "content" and isinstance(value, (list, tuple)):
                parts = []
                for p_index, part in enumerate(value):
                    if isinstance(part, str):
                        parts.append({"type": "text", "text": part})
                        continue
                    if not isinstance(part, Mapping):
                        raise InputError(f"message {m_index}: content part {p_index} must be an object")
                    kind = part.get("type")
                    if kind is None:  # transformers-style parts may omit "type"
                        kind = "text" if "text" in part else "image" if "image" in part or "url" in part else None
                    if kind in _TEXT_PART_TYPES:
                        text = part.get("text")
                        if not isinstance(text, str):
                            raise InputError(f"message {m_index}: text part {p_index} has no 'text' string")
                        parts.append({"type": "text", "text": text})
                    elif kind in _IMAGE_PART_TYPES:
                        where = f"message {m_index}: content part {p_index}"
                        images.append(_image_ref({**part, "type": kind}, where, require_image_refs))
                        parts.append({"type": "image"})
                    elif kind in _VIDEO_PART_TYPES:
                        where = f"message {m_index}: content part {p_index}"
                        images.append(_video_ref({**part, "type": kind}, where, require_image_refs))
                        parts.append({"type": "video"})
                    else:
                        raise InputError(
                            f"message {m_index}: unsupported content part type {kind!r} "
                            f"(supported: {', '.join(_TEXT_PART_TYPES + _IMAGE_PART_TYPES + _VIDEO_PART_TYPES)})"
                        )
                new[key] = parts
            elif key == "content" and not isinstance(value, str):
                raise InputError(f"message {m_index}: 'content' must be a string or a list of parts")
            else:
                new[key] = _plain(value)
        reasoning = next((new[k] for k in _REASONING_FIELDS if new.get(k) is not None), None)
        if reasoning is not None:
            new = {"thinking": reasoning, **new, "reasoning_content": reasoning}
        out.append(new)
    return out, images


# --------------------------------------------------------------------------------- rendering


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **extra: Any,
) -> str:
    """Render `messages` with a chat template, as transformers' `apply_chat_template(tokenize=False)`.

    `messages` may be raw OpenAI-style messages; they pass through `normalize_messages` (use that
    directly to also get the image references). Extra keyword arguments (tools, documents,
    other special tokens, `enable_thinking`, ...) become template variables; None values are
    left undefined, as transformers leaves unset special tokens out.
    Errors the template raises (`raise_exception`, type errors on unexpected input) are InputErrors.
    """
    if not isinstance(template, str) or not template:
        raise SourceError("no chat template: the checkpoint ships none and none was given")
    compiled = compile_template(template)
    normalized, _ = normalize_messages(messages, require_image_refs=False)
    variables: dict[str, Any] = {k: _plain(v) for k, v in extra.items() if v is not None}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    if bos_token is not None:
        variables["bos_token"] = bos_token
    if eos_token is not None:
        variables["eos_token"] = eos_token
    try:
        return compiled.render(messages=normalized, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise InputError(f"chat template rejected the messages: {e.message or type(e).__name__}") from None
    except Exception as e:  # template code failing on the given input (e.g. str + list)
        detail = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"chat template failed on the messages: {type(e).__name__}: {detail}") from None
