"""Streaming text out of a token stream, safely.

Byte-level BPE (and SentencePiece byte fallback) tokens can end in the middle of a UTF-8
character: decoding such a prefix yields U+FFFD replacement characters that turn into the real
character once the next token arrives. A streaming decoder that emits them shows garbage, and
one that re-decodes the whole sequence every step is quadratic. `StreamingDetokenizer` decodes a
short window of recent tokens, emits only text that can no longer change, and guarantees that the
concatenation of everything it emits equals `tokenizer.decode(all_ids)`.

`StopStringMatcher` cuts streamed text at the first stop string, holding back any tail that may
turn out to be the start of one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from vlmc.errors import InputError

_REPLACEMENT = "\ufffd"
# One character is at most 4 bytes, so at most 4 tokens can be needed to finish it. When this many
# tokens are pending and the text still ends in U+FFFD, the earlier replacement characters are
# genuinely invalid bytes and the window is advanced past them (keeps the work per token bounded).
_MAX_PENDING = 8
_KEEP_PENDING = 4


class _Decodes(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...


class StreamingDetokenizer:
    """Incremental decoding: `add(token_id)` returns the newly final text, `flush()` the rest.

    It keeps a window of token ids starting at `_prefix` (a token boundary where all earlier text
    is final). `_emitted` counts the characters of `decode(ids[_prefix:])` already returned.
    Decoding from a boundary *before* the newest complete text (rather than from the newest token
    alone) keeps decoders that treat the first token specially (SentencePiece's leading-space
    strip) consistent: both the old and the new text of a window are decoded from the same start.
    """

    def __init__(self, tokenizer: _Decodes, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.reset()

    def reset(self) -> None:
        self._ids: list[int] = []
        self._prefix = 0  # window start (token index)
        self._read = 0  # tokens before this are fully emitted
        self._emitted = 0  # chars of decode(ids[_prefix:]) already emitted

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def _decode(self, start: int, stop: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:stop], skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one token; return the text that became final (possibly '')."""
        self._ids.append(int(token_id))
        text = self._decode(self._prefix)
        stable = text.rstrip(_REPLACEMENT)
        piece = stable[self._emitted :] if len(stable) > self._emitted else ""
        self._emitted = max(self._emitted, len(stable))
        if len(stable) == len(text):
            # Everything decodes cleanly: slide the window to start at the previous boundary.
            self._slide(len(self._ids))
        elif len(self._ids) - self._read > _MAX_PENDING:
            piece += self._force_slide(text)
        return piece

    def add_many(self, token_ids: Sequence[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def _slide(self, new_read: int) -> None:
        """Make `self._read` the new window start and `new_read` the new read point."""
        if new_read == self._read:
            return
        self._prefix, self._read = self._read, new_read
        # Chars of the new window that are already emitted: the window's text up to new_read.
        self._emitted = len(self._decode(self._prefix, self._read))

    def _force_slide(self, text: str) -> str:
        """Many tokens pending yet the text still ends in U+FFFD: the stream holds invalid bytes.

        Move the window to start a few tokens back, at `cut`, if the text splits cleanly there
        (decode(before cut) + decode(from cut) == decode(all)); the replacement characters before
        the cut can no longer change, so they are released. Returns the text released.
        """
        cut = len(self._ids) - _KEEP_PENDING
        head = self._decode(self._prefix, cut)
        tail = self._decode(cut)
        if head + tail != text:
            return ""  # no clean boundary there; try again on the next token
        released = text[self._emitted : len(head)] if len(head) > self._emitted else ""
        self._emitted = max(0, self._emitted - len(head))
        self._prefix = self._read = cut
        return released

    def flush(self) -> str:
        """Return whatever is still held back (including trailing U+FFFD from invalid bytes)."""
        text = self._decode(self._prefix)
        piece = text[self._emitted :] if len(text) > self._emitted else ""
        self._emitted = max(self._emitted, len(text))
        self._slide(len(self._ids))
        return piece


@dataclass
class StopMatch:
    """Result of feeding text to a `StopStringMatcher`.

    `text` is safe to emit now; `stopped` says a stop string was hit (then `text` is everything
    before it and the stream should end); `stop` is the stop string that matched.
    """

    text: str
    stopped: bool = False
    stop: str | None = None


class StopStringMatcher:
    """Find stop strings in streamed text, holding back any suffix that could begin one."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        stops = list(stops or [])
        for s in stops:
            if not isinstance(s, str):
                raise InputError(f"stop strings must be strings, got {type(s).__name__}")
            if s == "":
                raise InputError("stop strings must not be empty")
        self.stops: list[str] = list(dict.fromkeys(stops))
        self._max_hold = max((len(s) for s in self.stops), default=1) - 1
        self._buffer = ""
        self._done = False

    @property
    def stopped(self) -> bool:
        return self._done

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._max_hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def feed(self, text: str) -> StopMatch:
        if self._done:
            return StopMatch("", True, None)
        if not self.stops:
            return StopMatch(text)
        buf = self._buffer + text
        best: tuple[int, int, str] | None = None  # earliest start, then longest stop
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i, -len(s)) < (best[0], best[1])):
                best = (i, -len(s), s)
        if best is not None:
            self._done = True
            self._buffer = ""
            return StopMatch(buf[: best[0]], True, best[2])
        hold = self._held_suffix(buf)
        self._buffer = buf[len(buf) - hold :] if hold else ""
        return StopMatch(buf[: len(buf) - hold])

    def flush(self) -> str:
        """End of stream without a stop: release the held-back text."""
        if self._done:
            return ""
        out, self._buffer = self._buffer, ""
        return out
