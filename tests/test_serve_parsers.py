"""Reasoning/tool-call output parsing, streaming and not, including random splits."""

import json
import random
import re

import pytest

from vlmc.serve.parsers import OutputParser, ParsedOutput, parse_output

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
    {"type": "function", "function": {"name": "add", "parameters": {}}},
]


def call(name, args):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'


def stream(pieces, **kwargs):
    """Feed pieces; return (all deltas, the parser's own result)."""
    parser = OutputParser(**kwargs)
    deltas = []
    for piece in pieces:
        deltas += parser.feed(piece)
    deltas += parser.finish()
    return deltas, parser.result()


def assemble(deltas) -> ParsedOutput:
    """What a streaming client reconstructs from the deltas."""
    content, reasoning, calls = "", "", {}
    for d in deltas:
        assert len(d) == 1, d
        if "content" in d:
            assert d["content"], "empty content delta"
            content += d["content"]
        elif "reasoning_content" in d:
            assert d["reasoning_content"], "empty reasoning delta"
            reasoning += d["reasoning_content"]
        else:
            for tc in d["tool_calls"]:
                assert tc["index"] not in calls
                calls[tc["index"]] = {k: tc[k] for k in ("id", "type", "function")}
    assert sorted(calls) == list(range(len(calls)))
    return ParsedOutput(content, reasoning or None, [calls[i] for i in sorted(calls)])


def without_ids(p: ParsedOutput) -> ParsedOutput:
    for tc in p.tool_calls:
        assert re.fullmatch(r"call_[0-9a-f]{24}", tc["id"]), tc["id"]
    calls = [{k: v for k, v in tc.items() if k != "id"} for tc in p.tool_calls]
    return ParsedOutput(p.content, p.reasoning_content, calls)


def random_split(text, rng):
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(12, len(text) - 1))))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def test_plain_text_passes_through():
    p = parse_output("Hello, world.\nSecond line.")
    assert p == ParsedOutput("Hello, world.\nSecond line.", None, [])


def test_tags_are_plain_text_when_features_are_off():
    text = "<think>x</think> then " + call("add", {"a": 1})
    p = parse_output(text, tools=None, thinking=False)
    assert p.content == text and p.reasoning_content is None and p.tool_calls == []
    assert parse_output(text, tools=[], thinking=False).content == text


def test_thinking_split_with_start_tag():
    p = parse_output("<think>\nLet me see.\n</think>\n\nThe answer is 4.", thinking=True)
    assert p.reasoning_content == "Let me see."
    assert p.content == "The answer is 4."


def test_thinking_split_when_template_opened_the_block():
    p = parse_output("Let me see.\n</think>\n\nFour.", thinking=True, starts_in_thinking=True)
    assert (p.reasoning_content, p.content) == ("Let me see.", "Four.")


def test_unterminated_thinking_is_all_reasoning():
    p = parse_output("<think>still going and <b>then</b>", thinking=True)
    assert p.reasoning_content == "still going and <b>then</b>" and p.content == ""
    p = parse_output("no tags at all", thinking=True, starts_in_thinking=True)
    assert p.reasoning_content == "no tags at all" and p.content == ""


def test_custom_think_tags():
    p = parse_output("[R]why[/R]what", thinking=True, think_start="[R]", think_end="[/R]")
    assert (p.reasoning_content, p.content) == ("why", "what")


def test_strip_off_keeps_whitespace():
    p = parse_output("<think>\na\n</think>\n\nb\n", thinking=True, strip=False)
    assert (p.reasoning_content, p.content) == ("\na\n", "\n\nb\n")


def test_one_tool_call_with_text_before():
    text = "Let me check.\n" + call("get_weather", {"city": "Paris", "unit": "°C"})
    p = parse_output(text, tools=TOOLS)
    assert p.content == "Let me check."
    assert len(p.tool_calls) == 1
    tc = p.tool_calls[0]
    assert tc["type"] == "function" and tc["id"].startswith("call_")
    assert tc["function"]["name"] == "get_weather"
    assert isinstance(tc["function"]["arguments"], str)
    assert json.loads(tc["function"]["arguments"]) == {"city": "Paris", "unit": "°C"}


def test_two_tool_calls_and_only_tool_calls_give_empty_content():
    text = call("add", {"a": 1, "b": 2}) + "\n" + call("get_weather", {"city": "Oslo"})
    p = parse_output(text, tools=TOOLS)
    assert p.content == ""
    assert [tc["function"]["name"] for tc in p.tool_calls] == ["add", "get_weather"]
    assert json.loads(p.tool_calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert p.tool_calls[0]["id"] != p.tool_calls[1]["id"]


def test_arguments_as_json_string_and_missing_arguments():
    text = ('<tool_call>{"name": "add", "arguments": "{\\"a\\": 1}"}</tool_call>'
            '<tool_call>{"name": "get_weather"}</tool_call>')
    p = parse_output(text, tools=TOOLS)
    assert [json.loads(tc["function"]["arguments"]) for tc in p.tool_calls] == [{"a": 1}, {}]


@pytest.mark.parametrize("body", [
    '{"name": "add", "arguments": {"a": 1}',     # truncated JSON
    '{"arguments": {"a": 1}}',                   # no name
    '["add", {"a": 1}]',                         # not an object
    '{"name": "add", "arguments": [1, 2]}',      # arguments not an object
])
def test_malformed_tool_call_stays_content(body):
    bad = f"<tool_call>\n{body}\n</tool_call>"
    p = parse_output("Before. " + bad + " " + call("add", {"a": 2}), tools=TOOLS)
    assert p.content == "Before. " + bad
    assert len(p.tool_calls) == 1 and json.loads(p.tool_calls[0]["function"]["arguments"]) == {"a": 2}


def test_unknown_tool_name_stays_content():
    bad = call("rm_rf", {"path": "/"})
    p = parse_output(bad, tools=TOOLS)
    assert p.content == bad and p.tool_calls == []


def test_unterminated_tool_call():
    # Complete JSON but the closing tag never came (e.g. a stop string): still a call.
    p = parse_output('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n', tools=TOOLS)
    assert p.content == "" and p.tool_calls[0]["function"]["name"] == "add"
    # Cut off mid-JSON: the text is kept, not dropped.
    p = parse_output('Hi <tool_call>\n{"name": "add", "argu', tools=TOOLS)
    assert p.content == 'Hi <tool_call>\n{"name": "add", "argu' and p.tool_calls == []


def test_thinking_then_tool_call_and_no_tool_parsing_inside_reasoning():
    inner = call("add", {"a": 1})
    text = f"<think>maybe {inner}</think>Calling.\n" + call("add", {"a": 3})
    p = parse_output(text, tools=TOOLS, thinking=True)
    assert p.reasoning_content == f"maybe {inner}"
    assert p.content == "Calling."
    assert len(p.tool_calls) == 1


def test_tags_split_across_pieces_are_held_back():
    parser = OutputParser(tools=TOOLS, thinking=True)
    assert parser.feed("<th") == []
    assert parser.feed("ink>Hmm") == [{"reasoning_content": "Hmm"}]
    assert parser.feed(".</thi") == [{"reasoning_content": "."}]
    assert parser.feed("nk>Ok <too") == [{"content": "Ok"}]
    assert parser.feed('l_call>{"name": "add", "arguments": {}}</tool_') == []
    deltas = parser.feed("call> <tag")
    assert len(deltas) == 2 and deltas[0]["tool_calls"][0]["index"] == 0
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "add", "arguments": "{}"}
    # "<tag" is not a prefix of any tag, so it goes out; the whitespace around the
    # removed call is kept (it separates text), trailing whitespace waits.
    assert deltas[1] == {"content": "  <tag"}
    assert parser.feed("> <") == [{"content": ">"}]  # "<" may start a tag: held
    assert parser.feed("\n") == [{"content": " <"}]  # settled; the newline waits
    assert parser.finish() == []  # trailing whitespace is trimmed
    assert parser.result().content == "Ok  <tag> <"
    assert parser.finish() == []
    with pytest.raises(RuntimeError):
        parser.feed("more")


def test_partial_tag_that_never_completes_is_flushed():
    parser = OutputParser(tools=TOOLS, thinking=True)
    assert parser.feed("a <tool_ca") == [{"content": "a"}]
    assert parser.finish() == [{"content": " <tool_ca"}]


CASES = [
    ("Plain answer with < and <t and </ inside.", {}),
    ("<think>\nA < B? </thin k>\n</think>\n\nyes <tool_call> literal", {"thinking": True}),
    ("reason </think> answer <think>again</think> end", {"thinking": True, "starts_in_thinking": True}),
    ("unterminated <think> thought <tool_call>", {"thinking": True, "tools": TOOLS}),
    ("Sure.\n" + call("get_weather", {"city": "Zürich"}) + "\n" + call("add", {"a": 1, "b": 2}),
     {"tools": TOOLS}),
    ("<think>plan</think>\n" + call("add", {"x": "a < b </tool_"}) + "\nbad: "
     + call("nope", {}) + '<tool_call>{"name": add}</tool_call>tail <tool_call>{"name": "add"',
     {"thinking": True, "tools": TOOLS}),
    ("  \n<think>  </think>  \n  " + call("add", {}) + "  \n ", {"thinking": True, "tools": TOOLS}),
    ("a\n\n<think>b</think>\n\nc", {"thinking": True, "strip": False}),
]


@pytest.mark.parametrize("text,kwargs", CASES)
def test_random_splits_match_non_streaming(text, kwargs):
    whole = parse_output(text, **kwargs)
    one_piece, _ = stream([text], **kwargs)
    assert without_ids(assemble(one_piece)) == without_ids(whole)
    per_char, res = stream(list(text), **kwargs)
    assert without_ids(assemble(per_char)) == without_ids(whole) == without_ids(res)
    for seed in range(150):
        rng = random.Random(seed)
        deltas, res = stream(random_split(text, rng), **kwargs)
        got = assemble(deltas)
        assert without_ids(got) == without_ids(whole), (seed, deltas)
        assert got == res  # ids in the deltas are the ids in result()


def test_random_split_cases_are_nontrivial():
    # Guard against the property test passing vacuously: the cases exercise all channels.
    parsed = [parse_output(t, **kw) for t, kw in CASES]
    assert any(p.reasoning_content for p in parsed)
    assert sum(len(p.tool_calls) for p in parsed) >= 4
    assert any("<tool_call>" in p.content for p in parsed)
