"""Constrained decoding: JSON (OpenAI `response_format`) and forced tool calls.

The grammar engine is llguidance (PyPI `llguidance`, a Rust extension with no Python
dependencies). It was chosen over xgrammar and outlines-core by measured per-token cost
and install cost; `benchmarks/constrained_overhead.py` has the numbers and the method.

Use::

    compiler = GrammarCompiler(tokenizer, vocab_size=V, eos_ids={...})   # once per model
    c = compiler.json(schema)            # or compiler.json(None), compiler.tool_call(tools, names)
    while not c.done:
        logits[~c.mask()] = -inf         # bool [V]
        tok = sample(logits)
        c.advance(tok)                   # raises ConstraintError for a token the mask forbade
        if tok in eos_ids: break

Cost (benchmarks/constrained_overhead.py, 2-core x86): mask + advance take ~10 us per token
with a 382-token vocabulary and ~20 us with a 150k one (about half of that is unpacking the
bitmask into the bool array); strings with `maxLength` are the slow case, ~1 ms per token
inside them with a 150k vocabulary. The engine drops the GIL while it computes a mask, so a
caller may compute it on another thread while the model runs.

Whitespace between JSON tokens is allowed but bounded (`MAX_NEWLINES` newlines and
`MAX_INDENT` spaces/tabs at each place JSON permits whitespace, nothing before the
document or after it), so a model cannot loop forever on blanks. The bound is one space:
a model that was never taught JSON (the bundled demo model) otherwise spends its token
budget on tabs and newlines, and the reply is cut off before the document closes. Strings, arrays without
`maxItems` and objects open to extra keys are unbounded, as the schema says; the caller's
max_tokens covers those.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from vlmc.errors import InputError

try:  # the engine is a runtime dependency; a clear error if an install lacks it
    import llguidance as _llg
except ImportError:  # pragma: no cover - exercised only on broken installs
    _llg = None

__all__ = ["MAX_INDENT", "MAX_NEWLINES", "Constraint", "ConstraintError", "GrammarCompiler"]

# Whitespace allowed at each place JSON permits it: at most one line break, then a bounded indent.
MAX_NEWLINES = 0
MAX_INDENT = 1
_WHITESPACE_PATTERN = rf"(\r?\n){{0,{MAX_NEWLINES}}}[ \t]{{0,{MAX_INDENT}}}"
_JSON_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": _WHITESPACE_PATTERN,
    "item_separator": ",",
    "key_separator": ":",
    "lenient": False,  # a keyword the engine does not implement is an error, not silently ignored
}

# The Qwen / Hermes tool-call wrapper (what Qwen2/2.5/3 chat templates emit and parse).
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


class ConstraintError(InputError):
    """A schema, tool list or grammar that cannot be enforced, or a token the grammar forbids."""


def _one_line(message: str, limit: int = 400) -> str:
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _require_engine() -> Any:
    if _llg is None:
        raise ConstraintError(
            "constrained decoding needs the 'llguidance' package (pip install llguidance)"
        )
    return _llg


def _lark_string(text: str) -> str:
    """A Lark string literal matching `text` exactly (JSON escapes are valid Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


class GrammarCompiler:
    """Builds per-request constraints for one loaded model.

    `vocab_size` is the logits width (may exceed the tokenizer's vocabulary: padded rows are
    never allowed). `eos_ids` are the ids that end generation; they are allowed exactly when
    the grammar accepts. Construction costs a pass over the vocabulary (milliseconds for the
    demo model, about a second for a 150k vocabulary): do it once per model. Compiling is
    thread-safe.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> None:
        llg = _require_engine()
        self.vocab_size = int(vocab_size)
        if self.vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        tok_size = int(tokenizer.vocab_size)
        # Ids the tokenizer can produce and the logits cover; everything else is always masked.
        self._n_real = min(tok_size, self.vocab_size)
        bad = sorted(i for i in self.eos_ids if not 0 <= i < self._n_real)
        if bad:
            raise ValueError(f"EOS ids {bad} are outside the vocabulary ({self._n_real} tokens)")
        if not self.eos_ids:
            raise ValueError("constrained decoding needs at least one EOS id")
        self._n_engine = max(tok_size, self.vocab_size)
        backend = tokenizer.backend
        try:
            self._lltok = llg.LLTokenizer(
                backend.to_str(), n_vocab=self._n_engine, eos_token=sorted(self.eos_ids)
            )
        except Exception as e:  # the engine reports unusable tokenizers as plain exceptions
            raise ConstraintError(f"the grammar engine cannot use this tokenizer: {_one_line(e)}") from None
        self._mask_words = (self._n_engine + 31) // 32
        self._lock = threading.Lock()
        self._cache: dict[str, Any] = {}  # grammar text -> a fresh matcher to copy (LRU by insertion)
        self._cache_size = 64
        # How the tool-call wrapper tags are spelled in the grammar: as themselves when they are
        # special tokens (a text literal would never match them), else as text.
        self._tag_open = self._tag(TOOL_CALL_OPEN)
        self._tag_close = self._tag(TOOL_CALL_CLOSE)

    def _tag(self, text: str) -> str:
        """A Lark expression for a wrapper tag. When the tokenizer has the tag as one added token
        (e.g. `<tool_call>` as an added, non-special token) the engine treats that token as
        special, so a text literal alone would never match it: allow the token or the spelled text."""
        tid = self.tokenizer.token_to_id(text)
        if tid is not None and tid < self._n_real and self._lltok.is_special_token(tid):
            return f"(<[{tid}]> | {_lark_string(text)})"
        return _lark_string(text)

    # ----------------------------------------------------------------------------- public

    def json(self, schema: Mapping[str, Any] | None) -> Constraint:
        """Any JSON object (`schema=None`, json_object mode), or a document valid under `schema`."""
        if schema is None:
            schema = {"type": "object"}
        if not isinstance(schema, Mapping):
            raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        schema = _plain_schema(schema, "JSON schema")
        llg = _require_engine()
        try:
            grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=dict(_JSON_OPTIONS))
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid JSON schema: {_one_line(e)}") from None
        return self._constraint(grammar, "JSON schema")

    def response_format(self, response_format: Mapping[str, Any] | None) -> Constraint | None:
        """The constraint for an OpenAI `response_format` value; None for plain text."""
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise ConstraintError("response_format must be an object")
        kind = response_format.get("type")
        if kind in (None, "text"):
            return None
        if kind == "json_object":
            return self.json(None)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, Mapping):
                raise ConstraintError("response_format.json_schema must be an object with a 'schema'")
            schema = spec.get("schema")
            if schema is None:
                return self.json(None)
            return self.json(schema)
        raise ConstraintError(
            f"unsupported response_format type {kind!r} (expected 'text', 'json_object' or 'json_schema')"
        )

    def tool_call(
        self, tools: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None, *, parallel: bool = False
    ) -> Constraint:
        """Force `<tool_call>\\n{"name": N, "arguments": A}\\n</tool_call>`.

        N is one of `names` (default: every tool) and A is valid under that tool's `parameters`
        schema. With `parallel=True` further calls may follow, each on a new line.
        """
        params = _tool_parameters(tools)
        if names is None:
            chosen = list(params)
        else:
            if isinstance(names, str):
                names = [names]
            chosen = list(dict.fromkeys(names))
            unknown = [n for n in chosen if n not in params]
            if unknown:
                raise ConstraintError(
                    f"tool_choice names unknown tool(s) {unknown}; the request defines {sorted(params)}"
                )
        if not chosen:
            raise ConstraintError("tool call forced but no tools are defined")
        rules = []
        alts = []
        for k, name in enumerate(chosen):
            schema = dict(params[name])
            schema["x-guidance"] = dict(_JSON_OPTIONS)
            head = '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": '
            rules.append(f"call_{k}: {_lark_string(head)} args_{k} \"}}\"")
            rules.append(f"args_{k}: %json {json.dumps(schema, ensure_ascii=False)}")
            alts.append(f"call_{k}")
        body = "start: tool_call" + (' ("\\n" tool_call)*' if parallel else "")
        lark = "\n".join(
            [
                body,
                f'tool_call: {self._tag_open} "\\n" call "\\n" {self._tag_close}',
                "call: " + " | ".join(alts),
                *rules,
            ]
        )
        grammar = _require_engine().LLMatcher.grammar_from_lark(lark)
        return self._constraint(grammar, "tool parameters schema")

    # ----------------------------------------------------------------------------- internals

    def _constraint(self, grammar: str, what: str) -> Constraint:
        llg = _require_engine()
        with self._lock:
            proto = self._cache.pop(grammar, None)
            if proto is not None:
                self._cache[grammar] = proto  # most recently used last
        if proto is None:
            # Built outside the lock: the engine drops the GIL while it compiles.
            proto = llg.LLMatcher(self._lltok, grammar, log_level=0)
            if proto.is_error():
                raise ConstraintError(f"cannot enforce this {what}: {_one_line(_short_error(proto.get_error()))}")
            with self._lock:
                self._cache[grammar] = proto
                while len(self._cache) > self._cache_size:
                    self._cache.pop(next(iter(self._cache)))
        return Constraint(proto.deep_copy(), self)


def _short_error(err: str) -> str:
    """The engine's message without the grammar source excerpt it appends for Lark errors."""
    first = err.strip().splitlines()[0] if err.strip() else "unknown error"
    # "at 3(9): failed to compile JSON schema: Invalid type: foo" -> drop the position prefix
    if first.startswith("at ") and ": " in first:
        first = first.split(": ", 1)[1]
    if "regex parse error" in err:  # the regex error's detail is on later lines
        return _one_line(err)
    return first


def _plain_schema(schema: Mapping[str, Any], what: str) -> dict[str, Any]:
    """A JSON-serializable deep copy of `schema` (the engine reads it as JSON text)."""
    try:
        return json.loads(json.dumps(schema))
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{what} is not JSON-serializable: {_one_line(e)}") from None


def _tool_parameters(tools: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Tool name -> parameters schema, from OpenAI tool dicts (or bare function dicts)."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise ConstraintError("tools must be a list of tool objects")
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ConstraintError(f"tools[{i}] must be an object")
        kind = tool.get("type", "function")
        if kind != "function":
            raise ConstraintError(f"tools[{i}] has type {kind!r}; only 'function' tools can be called")
        fn = tool.get("function", tool)
        if not isinstance(fn, Mapping):
            raise ConstraintError(f"tools[{i}].function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ConstraintError(f"tools[{i}].function.name must be a non-empty string")
        params = fn.get("parameters")
        if params is None:  # OpenAI: omitted parameters means a function that takes none
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, Mapping):
            raise ConstraintError(f"tools[{i}] ({name}) parameters must be a JSON schema object")
        if name in out:
            raise ConstraintError(f"tool name {name!r} is defined twice")
        out[name] = _plain_schema(params, f"parameters of tool {name!r}")
    return out


class Constraint:
    """The grammar state of one request. Not thread-safe: use it from one generation loop."""

    def __init__(self, matcher: Any, compiler: GrammarCompiler) -> None:
        self._m = matcher
        self._c = compiler
        self._bits = np.zeros(compiler._mask_words, dtype=np.int32)  # engine bitmask, 1 bit per id
        self._bits_valid = False  # _bits holds the mask of the current state
        self._ended = False  # an EOS id was consumed

    def _fill(self) -> None:
        if self._bits_valid:
            return
        if self._ended or self._m.is_error():
            self._bits[:] = 0
        else:
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            if self._m.is_error():
                raise ConstraintError(f"grammar engine failed: {_one_line(self._m.get_error())}")
        self._bits_valid = True

    def mask(self) -> np.ndarray:
        """bool [vocab_size]: the tokens allowed next. EOS ids only where the grammar accepts."""
        self._fill()
        c = self._c
        full = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=c._n_engine)
        mask = full[: c.vocab_size].view(bool)
        if c._n_real < c.vocab_size:
            mask[c._n_real :] = False
        return mask

    def allows(self, token_id: int) -> bool:
        """Whether `token_id` may come next."""
        token_id = int(token_id)
        if not 0 <= token_id < self._c._n_real:
            return False
        self._fill()
        return bool((int(self._bits[token_id >> 5]) >> (token_id & 31)) & 1)

    def advance(self, token_id: int) -> None:
        """Consume one sampled token; ConstraintError (state unchanged) if the grammar forbids it."""
        token_id = int(token_id)
        if self._ended:
            raise ConstraintError(f"token {token_id} after the end of the constrained output")
        if not self.allows(token_id):
            raise ConstraintError(
                f"token {token_id} ({self._describe(token_id)}) is not allowed by the grammar here"
            )
        if not self._m.consume_token(token_id):
            raise ConstraintError(f"grammar engine rejected token {token_id}: {_one_line(self._m.get_error())}")
        self._bits_valid = False
        if token_id in self._c.eos_ids:
            self._ended = True

    def _describe(self, token_id: int) -> str:
        if not 0 <= token_id < self._c._n_real:
            return "outside the tokenizer vocabulary"
        try:
            return repr(self._c.tokenizer.decode([token_id]))
        except Exception:  # description only
            return "?"

    @property
    def done(self) -> bool:
        """True once the output is complete and nothing more may follow (EOS consumed, or the
        grammar cannot be extended)."""
        return self._ended or (self._m.is_stopped() and not self._m.is_error())

    @property
    def accepting(self) -> bool:
        """True when the output so far is a complete match (EOS would be allowed)."""
        return self._ended or self._m.is_accepting()

    def copy(self) -> Constraint:
        """An independent copy of this state (e.g. for speculative decoding)."""
        other = Constraint(self._m.deep_copy(), self._c)
        other._ended = self._ended
        return other

    def rollback(self, n_tokens: int) -> None:
        """Undo the last `n_tokens` advances (speculative decoding)."""
        if n_tokens <= 0:
            return
        if not self._m.rollback(int(n_tokens)):
            raise ConstraintError(f"cannot roll back {n_tokens} tokens: {_one_line(self._m.get_error())}")
        self._bits_valid = False
        self._ended = False

    def forced_text(self) -> bytes:
        """Bytes the grammar forces next regardless of the model (may be empty)."""
        return bytes(self._m.compute_ff_bytes())

