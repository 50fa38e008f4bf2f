"""Output parsers for the OpenAI-compatible server: reasoning split and tool calls.

A model's generated text mixes three things the API keeps apart: reasoning inside
``<think> ... </think>``, tool calls in the Hermes/Qwen format
(``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, the format of
every family vlmc serves), and the answer itself (``content``).

One state machine, ``OutputParser``, does all of it incrementally, because streaming
needs it: the detokenizer hands over text pieces split anywhere (``'<too' + 'l_call>'``),
so any suffix that could still become a tag is held back until the next piece settles
it, and ``finish()`` flushes what is left. ``parse_output`` is the same machine fed the
whole text at once, so the non-streaming answer is by construction what the streamed
deltas add up to; every decision depends on text positions only, never on where the
pieces were split (the tests check this with random splits).

Nothing is silently dropped: a tool call whose JSON does not parse, lacks a name, or
names a tool the request did not offer goes back into ``content`` verbatim, tags
included, so the user sees what the model said.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

TOOL_START = "<tool_call>"
TOOL_END = "</tool_call>"

_CONTENT, _REASONING, _TOOL = "content", "reasoning_content", "tool"


@dataclass
class ParsedOutput:
    """A whole reply split the way an OpenAI chat message wants it.

    ``content`` is "" when the model only called tools (the server sends null then);
    ``reasoning_content`` is None when there was no reasoning text.
    """

    content: str
    reasoning_content: str | None
    tool_calls: list[dict] = field(default_factory=list)


class _TrimmedText:
    """Accumulates one text channel with its outer whitespace trimmed, streaming-safe.

    Models surround tags with newlines (``</think>\\n\\n``, ``\\n<tool_call>``); left in,
    a tool-only reply would carry content "\\n\\n" instead of none. Leading whitespace
    is dropped; trailing whitespace is held until more text follows it, and dropped
    if nothing does. With ``strip`` off the text passes through unchanged.
    """

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.emitted: list[str] = []
        self._held_ws = ""

    def add(self, text: str) -> str:
        """Take raw text; return the part that is now final (maybe "")."""
        if not self.strip:
            self.emitted.append(text)
            return text
        body = text.rstrip()
        if not body:
            if self.emitted:
                self._held_ws += text
            return ""
        tail = text[len(body):]
        out = self._held_ws + body if self.emitted else body.lstrip()
        self._held_ws = tail
        if out:
            self.emitted.append(out)
        return out

    def text(self) -> str:
        return "".join(self.emitted)


def tool_names(tools: list[dict] | None) -> set[str]:
    """The function names a request's ``tools`` offers (OpenAI shape, or bare {"name"})."""
    names: set[str] = set()
    for tool in tools or []:
        if not isinstance(tool, dict):
            continue
        fn = tool.get("function", tool)
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def parse_tool_call_body(body: str, allowed: set[str]) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) from the text between the tool-call tags.

    None when the body is not one JSON object with a string ``name`` the request
    offered, or when ``arguments`` is neither an object nor a string holding one
    (Qwen models occasionally emit the string form; some emit ``parameters``).
    """
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or name not in allowed:
        return None
    args: Any = obj.get("arguments", obj.get("parameters", {}))
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` + 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


class OutputParser:
    """Incremental splitter of generated text into content, reasoning and tool calls.

    ``feed(piece)`` returns the deltas that piece made final, in order; each delta is
    one of ``{"content": str}``, ``{"reasoning_content": str}`` or
    ``{"tool_calls": [{"index", "id", "type": "function", "function": {"name",
    "arguments"}}]}`` (a call is sent whole once its closing tag arrives).

    Rules, all positional so any split of the text gives the same result:
    - ``thinking`` off: think tags are plain content. On: text between ``think_start``
      and ``think_end`` is reasoning (a reply may hold more than one block); with
      ``starts_in_thinking`` the text begins as reasoning (the chat template already
      put ``think_start`` in the prompt). Reasoning never closed is all reasoning.
    - ``tools`` empty: tool-call tags are plain content. Otherwise each
      ``<tool_call>...</tool_call>`` in content becomes a call or, if invalid, text.
      A call cut off at the end (no closing tag, e.g. a stop string) still counts if
      its JSON is complete. Tags inside reasoning are not parsed.
    - ``strip``: content and reasoning lose their leading and trailing whitespace.
      Whitespace between two content parts stays (around a removed call too).

    Custom think tags must not contain another watched tag except as a prefix, or
    the split-independence above no longer holds.
    """

    def __init__(
        self,
        *,
        tools: list[dict] | None = None,
        thinking: bool = False,
        think_start: str = "<think>",
        think_end: str = "</think>",
        starts_in_thinking: bool = False,
        strip: bool = True,
    ) -> None:
        if thinking and (not think_start or not think_end):
            raise ValueError("think_start and think_end must be non-empty strings")
        self.thinking = thinking
        self.think_start = think_start
        self.think_end = think_end
        self.allowed = tool_names(tools)
        self._mode = _REASONING if thinking and starts_in_thinking else _CONTENT
        self._buf = ""  # text not yet assigned: a possible tag start
        self._tool_body: list[str] = []
        self._content = _TrimmedText(strip)
        self._reasoning = _TrimmedText(strip)
        self._calls: list[dict] = []
        self._finished = False

    # -- public API -----------------------------------------------------------------

    def feed(self, text: str) -> list[dict]:
        """Take the next piece of final text; return the deltas it settles."""
        if self._finished:
            raise RuntimeError("OutputParser.feed() called after finish()")
        out: list[dict] = []
        self._buf += text
        while True:
            tags = self._watched_tags()
            hit = _earliest(self._buf, tags)
            if hit is None:
                keep = _partial_tag_suffix(self._buf, tags)
                self._emit_text(self._buf[: len(self._buf) - keep], out)
                self._buf = self._buf[len(self._buf) - keep:]
                return _merged(out)
            pos, tag = hit
            self._emit_text(self._buf[:pos], out)
            self._buf = self._buf[pos + len(tag):]
            self._on_tag(tag, out)

    def finish(self) -> list[dict]:
        """End of generation: flush held-back text and any unterminated tool call."""
        if self._finished:
            return []
        out: list[dict] = []
        self._emit_text(self._buf, out)
        self._buf = ""
        if self._mode == _TOOL:
            self._close_tool_call(out, closed=False)
        self._finished = True
        return _merged(out)

    def result(self) -> ParsedOutput:
        """Everything settled so far (the whole reply once ``finish()`` ran)."""
        reasoning = self._reasoning.text()
        return ParsedOutput(
            content=self._content.text(),
            reasoning_content=reasoning or None,
            tool_calls=[dict(c, function=dict(c["function"])) for c in self._calls],
        )

    # -- internals ------------------------------------------------------------------

    def _watched_tags(self) -> list[str]:
        if self._mode == _REASONING:
            return [self.think_end]
        if self._mode == _TOOL:
            return [TOOL_END]
        tags = []
        if self.thinking:
            tags.append(self.think_start)
        if self.allowed:
            tags.append(TOOL_START)
        return tags

    def _emit_text(self, text: str, out: list[dict]) -> None:
        if not text:
            return
        if self._mode == _TOOL:
            self._tool_body.append(text)
            return
        channel = self._reasoning if self._mode == _REASONING else self._content
        settled = channel.add(text)
        if settled:
            out.append({self._mode: settled})

    def _on_tag(self, tag: str, out: list[dict]) -> None:
        if self._mode == _REASONING:  # think_end
            self._mode = _CONTENT
        elif self._mode == _TOOL:  # TOOL_END
            self._close_tool_call(out, closed=True)
        elif tag == TOOL_START and self.allowed:
            self._mode = _TOOL
            self._tool_body = []
        else:  # think_start
            self._mode = _REASONING

    def _close_tool_call(self, out: list[dict], *, closed: bool) -> None:
        body = "".join(self._tool_body)
        self._tool_body = []
        self._mode = _CONTENT
        parsed = parse_tool_call_body(body, self.allowed)
        if parsed is None:
            self._emit_text(TOOL_START + body + (TOOL_END if closed else ""), out)
            return
        name, arguments = parsed
        call = {"id": new_call_id(), "type": "function",
                "function": {"name": name, "arguments": arguments}}
        index = len(self._calls)
        self._calls.append(call)
        out.append({"tool_calls": [{"index": index, **call,
                                    "function": dict(call["function"])}]})


def _earliest(buf: str, tags: list[str]) -> tuple[int, str] | None:
    """The first complete tag in ``buf`` (the longest one on a tie), or None."""
    best: tuple[int, str] | None = None
    for tag in tags:
        pos = buf.find(tag)
        if pos < 0:
            continue
        if best is None or pos < best[0] or (pos == best[0] and len(tag) > len(best[1])):
            best = (pos, tag)
    return best


def _partial_tag_suffix(buf: str, tags: list[str]) -> int:
    """Length of the longest suffix of ``buf`` that is a proper prefix of some tag.

    That suffix must wait: the next piece decides whether it is a tag or text.
    """
    longest = max((len(t) for t in tags), default=0)
    for k in range(min(len(buf), longest - 1), 0, -1):
        tail = buf[-k:]
        if any(t.startswith(tail) for t in tags):
            return k
    return 0


def _merged(deltas: list[dict]) -> list[dict]:
    """Join adjacent text deltas of the same kind so one feed yields few chunks."""
    merged: list[dict] = []
    for d in deltas:
        if merged and "tool_calls" not in d and merged[-1].keys() == d.keys():
            key = next(iter(d))
            merged[-1] = {key: merged[-1][key] + d[key]}
        else:
            merged.append(d)
    return merged


def parse_output(text: str, **options: Any) -> ParsedOutput:
    """Non-streaming parse: the whole reply at once, same rules (and keyword options) as
    ``OutputParser``."""
    parser = OutputParser(**options)
    parser.feed(text)
    parser.finish()
    return parser.result()
