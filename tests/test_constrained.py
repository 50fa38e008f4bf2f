"""Constrained decoding (vlmc.runtime.constrained) driven with the demo tokenizer."""

from __future__ import annotations

import json
import random
import re
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")

from tokenizers import AddedToken  # noqa: E402
from tokenizers import Tokenizer as BackendTokenizer  # noqa: E402

from vlmc.errors import InputError  # noqa: E402
from vlmc.runtime.constrained import (  # noqa: E402
    MAX_INDENT,
    ConstraintError,
    GrammarCompiler,
)
from vlmc.runtime.tokenizer import Tokenizer  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "vlmc" / "demo" / "model"
V = 512  # logits rows: more than the tokenizer's 382 tokens, like a padded LM head


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(DEMO)


@pytest.fixture(scope="module")
def gc(tok) -> GrammarCompiler:
    return GrammarCompiler(tok, V, set(tok.eos_token_ids))


# ----------------------------------------------------------------------------- helpers


def check(schema: dict, value, path: str = "$") -> None:
    """A hand validator for the JSON-schema subset these tests use (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{path}: {value!r} not in enum"
    if "const" in schema:
        assert value == schema["const"], f"{path}: {value!r} != const"
    if "anyOf" in schema:
        errors = []
        for sub in schema["anyOf"]:
            try:
                check(sub, value, path)
                break
            except AssertionError as e:
                errors.append(str(e))
        else:
            raise AssertionError(f"{path}: matches no anyOf branch: {errors}")
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{path}: not an object"
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            assert key in value, f"{path}: missing {key!r}"
        for key, item in value.items():
            if key in props:
                check(props[key], item, f"{path}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{path}: extra key {key!r}"
    elif kind == "array":
        assert isinstance(value, list), f"{path}: not an array"
        assert len(value) <= schema.get("maxItems", len(value)), f"{path}: too many items"
        assert len(value) >= schema.get("minItems", 0), f"{path}: too few items"
        for i, item in enumerate(value):
            check(schema.get("items", {}), item, f"{path}[{i}]")
    elif kind == "string":
        assert isinstance(value, str), f"{path}: not a string"
        assert len(value) <= schema.get("maxLength", len(value)), f"{path}: too long"
        assert len(value) >= schema.get("minLength", 0), f"{path}: too short"
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{path}: {value!r} !~ {schema['pattern']}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{path}: not an integer"
    elif kind == "number":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{path}: not a number"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{path}: not a boolean"
    elif kind == "null":
        assert value is None, f"{path}: not null"
    if kind in ("integer", "number"):
        assert value >= schema.get("minimum", value), f"{path}: {value} < minimum"
        assert value <= schema.get("maximum", value), f"{path}: {value} > maximum"


def validate(schema: dict, value) -> None:
    check(schema, value)
    try:
        import jsonschema
    except ImportError:
        return
    jsonschema.validate(value, schema)


CLOSERS = ['"', "}", "]", ":", "0"]


def drive(tok, gc, c, seed: int, random_steps: int = 10**9, max_steps: int = 2000) -> list[int]:
    """Random allowed tokens (never EOS while anything else is allowed), then, after
    `random_steps`, tokens that close the document quickly. Returns the ids before EOS."""
    rng = random.Random(seed)
    closers = [tok.token_to_id(t) for t in CLOSERS]
    ids: list[int] = []
    for step in range(max_steps):
        if c.done:
            return ids
        m = c.mask()
        assert m.shape == (V,) and m.dtype == np.bool_
        allowed = [int(i) for i in np.flatnonzero(m)]
        assert allowed, f"nothing allowed after {tok.decode(ids)!r}"
        assert max(allowed) < tok.vocab_size, "a padded id was allowed"
        text_ids = [i for i in allowed if i not in gc.eos_ids]
        if not text_ids:  # only EOS left: the grammar accepts
            c.advance(allowed[0])
            assert c.done
            return ids
        choice = None
        if step >= random_steps:
            choice = next((i for i in closers if i in text_ids), None)
        if choice is None:
            choice = rng.choice(text_ids)
        c.advance(choice)
        ids.append(choice)
    raise AssertionError(f"no end after {max_steps} tokens: {tok.decode(ids)[:300]!r}")


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "score": {"type": "number"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "home": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "zip": {"type": "string", "pattern": "^[0-9]{3}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "nick": {"anyOf": [{"type": "string", "maxLength": 6}, {"type": "null"}]},
    },
    "required": ["name", "age", "ok", "score", "color", "tags", "home", "nick"],
    "additionalProperties": False,
}


# ----------------------------------------------------------------------------- JSON schema


@pytest.mark.parametrize("seed", range(12))
def test_random_tokens_give_valid_json(tok, gc, seed):
    c = gc.json(PERSON)
    ids = drive(tok, gc, c, seed, random_steps=150)
    text = tok.decode(ids)
    value = json.loads(text)
    validate(PERSON, value)
    assert c.done


def test_check_catches_invalid_values():
    # the validator the tests rely on must itself be able to fail
    good = {"name": "a", "age": 3, "ok": True, "score": 1.5, "color": "red", "tags": [],
            "home": {"city": "x", "zip": "123"}, "nick": None}
    validate(PERSON, good)
    for bad in ({**good, "age": 121}, {**good, "color": "pink"}, {**good, "home": {"city": "x", "zip": "12"}},
                {**good, "extra": 1}, {**good, "tags": ["a", "b", "c", "d"]}, {**good, "nick": 3}):
        with pytest.raises(AssertionError):
            check(PERSON, bad)


def test_enum_and_bounded_integer(tok, gc):
    schema = {
        "type": "object",
        "properties": {
            "answer": {"enum": ["yes", "no", "maybe"]},
            "n": {"type": "integer", "minimum": 3, "maximum": 17},
            "k": {"const": 42},
        },
        "required": ["answer", "n", "k"],
        "additionalProperties": False,
    }
    seen_answers, seen_n = set(), set()
    for seed in range(25):
        value = json.loads(tok.decode(drive(tok, gc, gc.json(schema), seed)))
        validate(schema, value)
        assert set(value) == {"answer", "n", "k"}
        seen_answers.add(value["answer"])
        seen_n.add(value["n"])
    assert len(seen_answers) >= 2 and len(seen_n) >= 3  # the driver explores, not one fixed path
    assert all(3 <= n <= 17 for n in seen_n)


def test_top_level_enum_is_forced_to_a_member(tok, gc):
    for seed in range(5):
        c = gc.json({"enum": ["alpha", "beta"]})
        assert json.loads(tok.decode(drive(tok, gc, c, seed))) in ("alpha", "beta")


def test_json_object_mode(tok, gc):
    for seed in range(8):
        c = gc.json(None)
        first = [tok.decode([i]) for i in np.flatnonzero(c.mask())]
        assert all(s.startswith("{") for s in first), first  # no leading blanks, no bare values
        value = json.loads(tok.decode(drive(tok, gc, c, seed, random_steps=40)))
        assert isinstance(value, dict)


def test_response_format(gc, tok):
    assert gc.response_format(None) is None
    assert gc.response_format({"type": "text"}) is None
    c = gc.response_format({"type": "json_object"})
    assert json.loads(tok.decode(drive(tok, gc, c, 0, random_steps=20))) is not None
    rf = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON, "strict": True}}
    validate(PERSON, json.loads(tok.decode(drive(tok, gc, gc.response_format(rf), 1, random_steps=150))))
    with pytest.raises(ConstraintError, match="response_format"):
        gc.response_format({"type": "yaml"})


def test_whitespace_is_bounded(tok, gc):
    """A model that prefers blanks cannot loop on them: each gap allows one newline and MAX_INDENT blanks."""
    blanks = [i for i in range(tok.vocab_size) if i not in tok.special_ids and tok.decode([i]).strip() == "" and tok.decode([i])]
    assert blanks
    for schema in (None, {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "integer"}}}}):
        c = gc.json(schema)
        ids: list[int] = []
        close = [tok.token_to_id(s) for s in ("}", "]", '"', "a", ":", "[", "1", "{")]
        for _ in range(600):
            if c.done:
                break
            m = c.mask()
            pick = next((i for i in blanks if m[i]), None)  # always blanks when allowed
            if pick is None:
                pick = next(i for i in close if i is not None and m[i])
            c.advance(pick)
            ids.append(pick)
        assert c.done, f"did not finish: {tok.decode(ids)[:200]!r}"
        text = tok.decode(ids)
        json.loads(text)
        runs = re.findall(r"\s+", text)
        assert runs and max(len(r) for r in runs) <= MAX_INDENT + 2  # "\r\n" + indent
        assert all(r.count("\n") <= 1 for r in runs)
        assert text[0] == "{" and text[-1] == "}"


def test_eos_only_when_complete(tok, gc):
    eos = sorted(gc.eos_ids)
    c = gc.json({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    for i in tok.encode('{"a": 7'):
        assert not c.mask()[eos].any()
        c.advance(i)
    assert not c.mask()[eos].any()  # '{"a": 7' is not a document yet
    with pytest.raises(ConstraintError):
        c.advance(eos[0])
    c.advance(tok.encode("}")[0])
    assert c.done and c.accepting
    m = c.mask()
    assert m[eos].all() and m.sum() == len(eos)  # only EOS may follow
    c.advance(eos[0])
    assert c.done and not c.mask().any()
    with pytest.raises(ConstraintError):
        c.advance(tok.encode("x")[0])


# ----------------------------------------------------------------------------- tool calls

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 10},
                    "unit": {"$ref": "#/$defs/unit"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7},
                },
                "required": ["city", "unit"],
                "additionalProperties": False,
                "$defs": {"unit": {"enum": ["c", "f"]}},
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time"}},
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}


def parse_tool_calls(text: str) -> list[dict]:
    calls = re.findall(r"<tool_call>\n(.*?)\n</tool_call>", text, flags=re.DOTALL)
    assert "\n".join(f"<tool_call>\n{c}\n</tool_call>" for c in calls) == text, text
    return [json.loads(c) for c in calls]


def check_call(call: dict, names) -> None:
    assert set(call) == {"name", "arguments"}
    assert call["name"] in names
    params = PARAMS[call["name"]]
    if params is None:
        assert call["arguments"] == {}
    else:
        resolved = json.loads(json.dumps(params).replace('{"$ref": "#/$defs/unit"}', '{"enum": ["c", "f"]}'))
        validate({k: v for k, v in resolved.items() if k != "$defs"}, call["arguments"])


@pytest.mark.parametrize("seed", range(8))
def test_tool_call_parses(tok, gc, seed):
    c = gc.tool_call(TOOLS, None)
    text = tok.decode(drive(tok, gc, c, seed, random_steps=60))
    (call,) = parse_tool_calls(text)
    check_call(call, PARAMS)
    assert c.done


def test_tool_call_respects_names(tok, gc):
    names = set()
    for seed in range(6):
        text = tok.decode(drive(tok, gc, gc.tool_call(TOOLS, ["add", "now"]), seed, random_steps=40))
        (call,) = parse_tool_calls(text)
        check_call(call, {"add", "now"})
        names.add(call["name"])
    assert names == {"add", "now"}
    text = tok.decode(drive(tok, gc, gc.tool_call(TOOLS, ["get_weather"]), 0, random_steps=40))
    assert parse_tool_calls(text)[0]["name"] == "get_weather"


def test_parallel_tool_calls(tok, gc):
    c = gc.tool_call(TOOLS, ["now"], parallel=True)
    second = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    for i in second + tok.encode("\n") + second:
        c.advance(i)
    assert c.accepting and not c.done  # another call could follow; EOS ends it
    c.advance(min(gc.eos_ids))
    assert c.done


def test_tool_call_errors(gc):
    with pytest.raises(ConstraintError, match="unknown tool"):
        gc.tool_call(TOOLS, ["nope"])
    with pytest.raises(ConstraintError, match="no tools"):
        gc.tool_call([], None)
    with pytest.raises(ConstraintError, match="twice"):
        gc.tool_call(TOOLS + TOOLS[:1], None)
    bad = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "wat"}}}}}]
    with pytest.raises(ConstraintError, match="wat"):
        gc.tool_call(bad, None)


@pytest.mark.parametrize("special", [False, True])
def test_tool_call_tags_as_single_tokens(tok, special):
    """Qwen2.5 has <tool_call> as one added (non-special) token: the mask must allow that token."""
    backend = BackendTokenizer.from_str(tok.backend.to_str())
    backend.add_tokens([AddedToken(t, special=special, normalized=False) for t in ("<tool_call>", "</tool_call>")])
    qtok = Tokenizer(backend, special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    open_id, close_id = qtok.token_to_id("<tool_call>"), qtok.token_to_id("</tool_call>")
    assert open_id >= 382
    g = GrammarCompiler(qtok, V, set(qtok.eos_token_ids))
    c = g.tool_call(TOOLS, ["now"])
    m = c.mask()
    assert m[open_id] and m[qtok.token_to_id("<")]  # the tag token, or the tag spelled out
    assert m.sum() == 2
    ids = [open_id] + qtok.encode('\n{"name": "now", "arguments": {}}\n') + [close_id]
    for i in ids:
        c.advance(i)
    assert c.done
    text = qtok.decode(ids)
    assert parse_tool_calls(text) == [{"name": "now", "arguments": {}}]


# ----------------------------------------------------------------------------- errors, masks


@pytest.mark.parametrize(
    "schema, words",
    [
        ({"type": "foo"}, "foo"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum"),
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
        ({"type": "string", "pattern": "(?<=a)b"}, "look"),
        ({"type": "string", "format": "no-such-format"}, "format"),
    ],
)
def test_bad_schema_raises(gc, schema, words):
    with pytest.raises(ConstraintError) as info:
        gc.json(schema)
    msg = str(info.value)
    assert words in msg and "\n" not in msg
    assert isinstance(info.value, InputError)


def test_non_object_schema_raises(gc):
    with pytest.raises(ConstraintError, match="must be an object"):
        gc.json(["type", "object"])  # type: ignore[arg-type]
    with pytest.raises(ConstraintError, match="serializable"):
        gc.json({"type": "object", "default": object()})


def test_disallowed_token_raises_and_keeps_state(tok, gc):
    c = gc.json({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    x = tok.encode("x")[0]
    assert not c.mask()[x]
    with pytest.raises(ConstraintError, match="not allowed"):
        c.advance(x)
    with pytest.raises(ConstraintError, match="outside"):
        c.advance(V - 1)  # a padded logits row
    with pytest.raises(ConstraintError):
        c.advance(10**6)
    for i in tok.encode('{"a": 1}'):  # the rejected tokens left the state as it was
        c.advance(i)
    assert c.done


def test_mask_covers_padded_vocab(tok):
    for v in (tok.vocab_size, 400, 1024):
        g = GrammarCompiler(tok, v, set(tok.eos_token_ids))
        c = g.json(None)
        m = c.mask()
        assert m.shape == (v,) and m.dtype == np.bool_
        assert not m[tok.vocab_size :].any()
        assert m[tok.encode("{")[0]] and m.sum() >= 1


def test_constraints_are_independent_and_compile_is_thread_safe(tok, gc):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"]}
    a, b = gc.json(schema), gc.json(schema)
    a.advance(tok.encode("{")[0])
    assert b.mask()[tok.encode("{")[0]] and not b.done  # b untouched by a
    results, errors = [], []

    def work(seed):
        try:
            for k in range(5):
                s = {**schema, "properties": {"n": {"type": "integer", "minimum": 0, "maximum": seed + k}}}
                value = json.loads(tok.decode(drive(tok, gc, gc.json(s), seed * 10 + k, random_steps=30)))
                assert 0 <= value["n"] <= seed + k
                results.append(value)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == 20
