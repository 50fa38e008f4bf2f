"""Malformed request bodies never get a 5xx: hypothesis puts hostile values into every
field the request models declare (read from their JSON schemas, so a new field is fuzzed
too), into message parts, and into whole bodies, and posts them to a live server."""
from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from serve_helpers import EXAMPLES, LiveServer, data_uri  # noqa: E402

from vlmc.serve.protocol import ChatCompletionRequest, CompletionRequest, ResponsesRequest  # noqa: E402

IMG = data_uri(EXAMPLES / "shapes-1.png")
FUZZ = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ENDPOINTS = {
    "/v1/chat/completions": (ChatCompletionRequest,
                             {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    "/v1/completions": (CompletionRequest, {"prompt": "The circle", "max_tokens": 2}),
    "/v1/responses": (ResponsesRequest, {"input": "hi", "max_output_tokens": 2}),
}
FIELDS = [(path, name) for path, (model, _) in ENDPOINTS.items() for name in model.model_json_schema()["properties"]]

surrogates = st.sampled_from(["\ud800", "x\udfffy", "\udc00" * 3])
strings = st.one_of(st.text(max_size=12), surrogates, st.sampled_from(
    ["", " ", "\x00", "../../etc/passwd", "file:///etc/hostname", "http://127.0.0.1:1/x.png", "data:,",
     "data:image/png;base64,!!", IMG, "<|im_start|>", "{{ raise_exception('x') }}", "auto", "none", "required",
     "function", "json_schema", "text", "messages", "add_generation_prompt", "bos_token", "template"]))
numbers = st.one_of(st.integers(-3, 3), st.sampled_from([2**31, 2**63, 2**64, -2**63, 10**30, 1023, 1024]),
                    st.floats(allow_nan=False, width=64), st.sampled_from([1e-38, 1e-300, 5e-324, 1e308]))
leaves = st.one_of(st.none(), st.booleans(), numbers, strings)
values = st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(strings, inner, max_size=3)), max_leaves=8)
part_kinds = st.sampled_from(["text", "image_url", "input_text", "input_image", "image", "video", None, 3])
parts = st.fixed_dictionaries({"type": part_kinds}, optional={"text": values, "image_url": values, "url": values,
                                                               "image": values})


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-batch-size", "4", "--max-tokens", "4")
    yield s
    s.stop()


def _check(server, path: str, body) -> None:
    raw_body = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, raw = server.request("POST", path, raw_body, timeout=60)
    assert status < 500, (path, raw_body[:300], raw[:300])
    if status >= 400:
        error = json.loads(raw)["error"]
        assert isinstance(error["message"], str) and error["message"] and error["type"]


@settings(max_examples=40, **FUZZ)
@given(value=values)
def test_any_value_in_any_field_is_answered_without_a_5xx(server, value):
    for path, name in FIELDS:  # every field gets every value hypothesis draws
        body = dict(ENDPOINTS[path][1])
        body[name] = value
        _check(server, path, body)


@settings(max_examples=100, **FUZZ)
@given(role=st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), strings),
       content=st.one_of(strings, st.lists(parts, max_size=3), values), extra=st.dictionaries(
           st.sampled_from(["name", "tool_calls", "tool_call_id", "reasoning_content"]), values, max_size=2))
def test_hostile_messages_are_answered_without_a_5xx(server, role, content, extra):
    _check(server, "/v1/chat/completions", {"messages": [{"role": role, "content": content, **extra}],
                                            "max_tokens": 2})
    items = [{"type": "message", "role": role, "content": content if isinstance(content, (str, list)) else "x"}]
    _check(server, "/v1/responses", {"input": items, "max_output_tokens": 2})


@settings(max_examples=60, **FUZZ)
@given(body=st.one_of(values, st.binary(max_size=40)))
def test_whole_bodies_of_any_shape_are_answered_without_a_5xx(server, body):
    for path in ENDPOINTS:
        _check(server, path, body if isinstance(body, bytes) else json.dumps(body).encode())
