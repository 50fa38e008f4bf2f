"""`vlmc serve` against a live server on 127.0.0.1, driven by the real `openai` client and
raw HTTP: outputs, concurrency, cancellation, bad input, memory, model swap and unload."""
from __future__ import annotations

import json
import shutil
import io
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

from serve_helpers import EXAMPLES, LiveServer, NotFoundServer, data_uri, image_message  # noqa: E402

KEY = "sk-vlmc-test"
IMG = {i: data_uri(EXAMPLES / f"shapes-{i}.png") for i in (1, 2, 3)}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vlmc.demo import MODEL_DIR
    copy = tmp_path_factory.mktemp("models") / "demo-copy"
    shutil.copytree(MODEL_DIR, copy)
    s = LiveServer(str(MODEL_DIR), str(copy), "--max-images", "3", "--max-batch-size", "16",
                   "--allowed-local-media-path", str(EXAMPLES), "--allow-private-fetch", key=KEY)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(question, *images, model="vlmc-demo", **kw):
    return dict(messages=image_message(question, *images) if images else [{"role": "user", "content": question}],
                model=model, temperature=0, **kw)


# ---------------------------------------------------------------------- the openai client
def test_chat_with_an_image(client):
    r = client.chat.completions.create(**ask("What color is the circle?", IMG[1]))
    assert r.choices[0].message.content == "green"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens > 20 and r.usage.completion_tokens >= 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_matches_non_streaming(client):
    kw = ask("Describe the image.", IMG[2], max_tokens=40)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and len(whole.split()) >= 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_every_image_in_every_message_is_used(client):
    """Two images in one message and one in an earlier turn: removing any changes the prompt."""
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG[1]}},
                                         {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": "green"},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG[2]}},
                                         {"type": "image_url", "image_url": {"url": IMG[3]}},
                                         {"type": "text", "text": "How many shapes are there?"}]}]
    three = client.chat.completions.create(model="vlmc-demo", messages=msgs, temperature=0, max_tokens=5).usage.prompt_tokens
    msgs[2]["content"].pop(1)
    two = client.chat.completions.create(model="vlmc-demo", messages=msgs, temperature=0, max_tokens=5).usage.prompt_tokens
    assert three > two > 0


def test_completions_and_streaming(client):
    r = client.completions.create(model="vlmc-demo", prompt="The circle is", max_tokens=6, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 0
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="vlmc-demo", prompt="The circle is", max_tokens=6, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text


def test_responses_api(client):
    r = client.responses.create(model="vlmc-demo", temperature=0, input=[{"role": "user", "content": [
        {"type": "input_image", "image_url": IMG[1]}, {"type": "input_text", "text": "What color is the circle?"}]}])
    assert r.output_text == "green" and r.status == "completed"
    assert r.usage.input_tokens > 20
    events = list(client.responses.create(model="vlmc-demo", input="Hello", max_output_tokens=5, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text and events[-1].response.status == "incomplete"


def test_responses_api_tool_calls_stream_as_items(client):
    tools = [{"type": "function", "name": "get_color", "description": "color of a shape",
              "parameters": {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}},
                             "required": ["shape"], "additionalProperties": False}}]
    kw = dict(model="vlmc-demo", temperature=0, max_output_tokens=80, tools=tools,
              tool_choice={"type": "function", "name": "get_color"},
              input=[{"role": "user", "content": [{"type": "input_image", "image_url": IMG[1]},
                                                   {"type": "input_text", "text": "What color is the circle?"}]}])
    whole = client.responses.create(**kw)
    calls = [item for item in whole.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_color"
    assert json.loads(calls[0].arguments)["shape"] in ("circle", "square")
    events = list(client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    done = [e for e in events if e.type == "response.output_item.done"]
    assert [d.item.type for d in done] == [item.type for item in events[-1].response.output]
    streamed = [item for item in events[-1].response.output if item.type == "function_call"]
    assert streamed[0].arguments == calls[0].arguments


def test_models_listing(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"vlmc-demo", "demo-copy"}
    demo = models["vlmc-demo"].model_dump()
    assert demo["context_length"] == 1024 and demo["input_modalities"] == ["text", "image", "video"]


def test_logprobs(client):
    r = client.chat.completions.create(**ask("What color is the circle?", IMG[1]), logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    first = entries[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 3
    tops = [t.logprob for t in first.top_logprobs]
    assert tops == sorted(tops, reverse=True) and first.top_logprobs[0].token == first.token  # greedy picks the top
    with pytest.raises(openai.BadRequestError, match="top-logprobs-k"):
        client.chat.completions.create(**ask("hi"), logprobs=True, top_logprobs=9)


def test_json_schema_response_validates(client):
    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "count": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["color", "count"], "additionalProperties": False}
    r = client.chat.completions.create(**ask("What color is the circle?", IMG[1], max_tokens=60), response_format={
        "type": "json_schema", "json_schema": {"name": "shape", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"color", "count"} and value["color"] in ("red", "green", "blue")
    assert isinstance(value["count"], int) and 0 <= value["count"] <= 9


def test_tool_call_is_parsed(client):
    tools = [{"type": "function", "function": {"name": "get_color", "description": "color of a shape",
              "parameters": {"type": "object", "properties": {"shape": {"enum": ["circle", "square"]}},
                             "required": ["shape"], "additionalProperties": False}}}]
    r = client.chat.completions.create(**ask("What color is the circle?", IMG[1], max_tokens=80), tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_color"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_color" and json.loads(call.function.arguments)["shape"] in ("circle", "square")
    stream = list(client.chat.completions.create(**ask("What color is the circle?", IMG[1], max_tokens=80),
                                                 tools=tools, tool_choice="required", stream=True))
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_color"


def test_prefix_cache_serves_the_shared_start_of_a_conversation(server):
    first = image_message("What color is the circle?", IMG[3])
    status, a = server.post("/v1/chat/completions", {"model": "vlmc-demo", "messages": first, "max_tokens": 8})
    assert status == 200
    follow = first + [{"role": "assistant", "content": a["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "How many shapes are there?"}]
    before = server.metrics()["prefix_cache"]["hit_tokens"]
    status, b = server.post("/v1/chat/completions", {"model": "vlmc-demo", "messages": follow, "max_tokens": 8})
    cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert status == 200 and 0 < cached < b["usage"]["prompt_tokens"] and cached % 32 == 0
    assert server.metrics()["prefix_cache"]["hit_tokens"] - before == cached


# ---------------------------------------------------------------------- batching
def test_concurrent_greedy_requests_match_one_at_a_time(server):
    questions = ["What color is the circle?", "Describe the image.", "How many shapes are there?",
                 "Where is the square?"]
    reqs = []
    for i in range(16):
        if i % 4 == 3:  # text only, runs to its token limit
            reqs.append(ask("Tell me about shapes " * (1 + i // 4), max_tokens=8 + 6 * i))
        else:
            reqs.append(ask(questions[i % 4], IMG[1 + i % 3], max_tokens=10 + 5 * i))

    def run(payload):
        status, body = server.post("/v1/chat/completions", payload)
        assert status == 200, body
        return body["choices"][0]["message"]["content"], body["choices"][0]["finish_reason"], \
            body["usage"]["completion_tokens"]

    alone = [run(r) for r in reqs]
    steps_before = server.metrics()["decode_steps_total"]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, reqs))
    assert together == alone
    assert {a[1] for a in alone} == {"stop", "length"}
    m = server.metrics()
    generated = sum(a[2] for a in together)
    assert m["decode_steps_total"] - steps_before < generated * 0.6  # sequences really shared decode steps


# ---------------------------------------------------------------------- bad input
def _huge_png(width: int, height: int) -> bytes:
    """A real, valid PNG of width x height (1-bit, so it is small on the wire)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def missing_url():
    s = NotFoundServer()
    yield s.url
    s.stop()


def test_bad_inputs_get_4xx_and_the_server_keeps_serving(server, missing_url):
    png = (EXAMPLES / "shapes-1.png").read_bytes()
    chat = "/v1/chat/completions"
    cases = {
        "malformed json": (chat, b'{"messages": [', 400, "not valid JSON"),
        "unknown model": (chat, ask("hi", model="gpt-9"), 404, "not served"),
        "broken data uri": (chat, ask("hi", "data:image/png;base64,@@@not-base64"), 400, "image 1"),
        "404 image url": (chat, ask("hi", missing_url), 400, "could not be fetched"),
        "truncated png": (chat, ask("hi", data_uri(png[:len(png) // 2])), 400, "image 1"),
        "huge image": (chat, ask("hi", data_uri(_huge_png(20000, 20000))), 400, "pixels"),
        "too many images": (chat, ask("hi", *[IMG[1]] * 4), 400, "at most 3"),
        "prompt over context": (chat, ask("circle " * 1500), 400, "context"),
        "reply over context": (chat, ask("hi", max_tokens=5000), 400, "leaves room"),
        "unknown field": (chat, {**ask("hi"), "frobnicate": True}, 400, "frobnicate"),
        "local path outside": (chat, ask("hi", "/etc/hostname"), 400, "outside"),
        "bad sampling value": (chat, {**ask("hi"), "top_p": 7}, 400, "top_p"),
        "n > 1": (chat, {**ask("hi"), "n": 2}, 400, "n"),
        "thinking budget, thinking off": (chat, {**ask("hi"), "thinking_budget": 8}, 400, "thinking_budget"),
        "tools the template drops": (chat, {**ask("hi"), "tools": [{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object"}}}]}, 400, "ignores tools"),
        "empty messages": (chat, {"messages": []}, 400, "messages"),
        "bad completion prompt": ("/v1/completions", {"prompt": [10**9]}, 400, "ids"),
    }
    for name, (path, payload, status, text) in cases.items():
        got, body = server.post(path, payload)
        assert got == status, (name, got, body)
        assert text in body["error"]["message"], (name, body)
        assert body["error"]["type"]
    for over in (ask("circle " * 1500), ask("hi", max_tokens=5000)):
        assert server.post(chat, over)[1]["error"]["code"] == "context_length_exceeded"
    got, body = server.post(chat, ask("hi"), headers={"Authorization": "Bearer wrong"})
    assert got == 401 and body["error"]["code"] == "invalid_api_key"
    got, _, _ = server.request("GET", "/v1/models", headers={"Authorization": ""})
    assert got == 401
    assert server.get("/health", headers={"Authorization": ""})[0] == 200  # /health needs no key
    ok, body = server.post(chat, ask("What color is the circle?", str(EXAMPLES / "shapes-1.png")))
    assert ok == 200 and body["choices"][0]["message"]["content"] == "green"  # allowed local path


def test_chat_page(server):
    status, headers, page = server.get("/ui", headers={"Authorization": ""})  # the page needs no key
    assert status == 200 and headers["content-type"].startswith("text/html")
    text = page.decode()
    for needed in ("/v1/chat/completions", "/v1/models", "stream_options", "image_url", "AbortController"):
        assert needed in text
    status, headers, _ = server.request("GET", "/", headers={"Authorization": ""})
    assert status == 200  # urllib followed the redirect to the page


def test_cors_is_off_by_default(server):
    _, headers, _ = server.request("OPTIONS", "/v1/models", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in {k.lower() for k in headers}


# ---------------------------------------------------------------------- service routes
def test_metrics_json_and_prometheus(server):
    before = server.metrics()["vision_cache"]
    for _ in range(2):  # the same picture twice: encoded at most once
        assert server.post("/v1/chat/completions", ask("How many shapes are there?", IMG[2], max_tokens=4))[0] == 200
    m = server.metrics()
    assert m["generation_loop"]["alive"] and m["generation_tokens_total"] > 0
    assert m["requests_in_flight"] == 0  # streams and non-streamed requests all ended
    assert 0 < m["ttft_seconds_p50"] <= m["ttft_seconds_p99"] <= m["latency_seconds_p99"]
    assert m["vision_cache"]["hits"] - before["hits"] >= 1
    assert m["vision_cache"]["misses"] - before["misses"] <= 1
    _, _, text = server.get("/metrics?format=prometheus")
    lines = text.decode().splitlines()
    assert any(line.startswith("vlmc_generation_tokens_total ") for line in lines)
    assert "# TYPE vlmc_queue_depth gauge" in lines
    assert any(line.startswith("vlmc_latency_seconds_p99 ") for line in lines)
    status, _, raw = server.get("/openapi.json")
    assert status == 200 and "/v1/chat/completions" in json.loads(raw)["paths"]


def test_memory_is_flat_over_200_requests(server):
    def burst(n):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: server.post("/v1/chat/completions", ask(
                "How many shapes are there?", IMG[1 + i % 3], max_tokens=8) if i % 2 else ask("hi", max_tokens=8)),
                range(n)))
        return server.metrics()["resident_memory_bytes"]

    burst(20)
    after_20 = burst(20)
    after_200 = burst(180)
    assert after_200 <= after_20 * 1.10, (after_20, after_200)


def test_swap_and_unload(server):
    status, body = server.post("/v1/chat/completions", ask("What color is the circle?", IMG[1], model="demo-copy"))
    assert status == 200 and body["model"] == "demo-copy" and body["choices"][0]["message"]["content"] == "green"
    assert server.get("/health")[2] and json.loads(server.get("/health")[2])["model"] == "demo-copy"
    status, body = server.post("/unload", {})
    assert status == 200 and body["unloaded"] == "demo-copy" and body["mlx_active_memory_bytes"] == 0
    assert json.loads(server.get("/health")[2])["model"] is None
    status, body = server.post("/v1/chat/completions", ask("What color is the circle?", IMG[1]))
    assert status == 200 and body["model"] == "vlmc-demo"  # loaded again on request


def test_unload_cancels_running_requests_with_503(server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(server.post, "/v1/chat/completions", ask("Tell me about shapes", max_tokens=900))
        deadline = time.time() + 30
        while time.time() < deadline and not server.metrics()["batch_size"]:
            time.sleep(0.05)
        assert server.post("/unload", {})[0] == 200
        status, body = running.result(60)
    assert status == 503 and "cancelled" in body["error"]["message"]
    assert server.post("/v1/chat/completions", ask("What color is the circle?", IMG[1]))[0] == 200


# ---------------------------------------------------------------------- a one-slot server
@pytest.fixture(scope="module")
def small_server():
    s = LiveServer("--max-batch-size", "1", "--max-queue", "1", "--max-body-bytes", "4096")
    yield s
    s.stop()


def test_disconnect_mid_stream_frees_the_slot(small_server):
    s = small_server
    body = json.dumps({**ask("Tell me about shapes", max_tokens=900), "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", s.port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data:") < 3:
            got += sock.recv(4096)
    deadline = time.time() + 30
    while time.time() < deadline and s.metrics()["batch_size"]:
        time.sleep(0.1)
    assert s.metrics()["batch_size"] == 0
    status, reply = s.post("/v1/chat/completions", ask("What color is the circle?", IMG[1]))
    assert status == 200 and reply["choices"][0]["message"]["content"] == "green"


def test_full_queue_is_429_and_big_body_413(small_server):
    s = small_server
    long = ask("Tell me about shapes", max_tokens=600)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(s.post, "/v1/chat/completions", long)
        deadline = time.time() + 30  # the first holds the only batch slot before the others come
        while time.time() < deadline and not s.metrics()["batch_size"]:
            time.sleep(0.02)
        results = [first] + [pool.submit(s.post, "/v1/chat/completions", long) for _ in range(3)]
        results = [r.result() for r in results]
    statuses = sorted(r[0] for r in results)
    assert statuses.count(200) >= 2 and 429 in statuses
    status, _, _ = s.request("POST", "/v1/chat/completions", json.dumps(long).encode())
    assert status == 200  # still serving
    busy = [r for r in results if r[0] == 429][0][1]
    assert busy["error"]["type"] == "rate_limit_error"
    status, body = s.post("/v1/chat/completions", ask("x" * 5000))
    assert status == 413 and "max-body-bytes" in body["error"]["message"]


def test_prefix_cache_disk_tier_survives_a_restart(tmp_path):
    """SIGTERM flushes the prefix cache to --prefix-cache-dir; the next server reuses it."""
    system = {"role": "system", "content": "Answer with one word. " * 12}
    ask_one = {"model": "vlmc-demo", "max_tokens": 4, "temperature": 0,
               "messages": [system, *image_message("What color is the circle?", IMG[1])]}
    args = ("--prefix-cache-dir", str(tmp_path), "--prefix-block-size", "16")
    s = LiveServer(*args)
    try:
        status, body = s.post("/v1/chat/completions", ask_one)
        assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    finally:
        s.stop()
    assert list(tmp_path.glob("*.safetensors"))
    s = LiveServer(*args)
    try:
        ask_two = {**ask_one, "messages": [system, *image_message("How many shapes are there?", IMG[1])]}
        status, body = s.post("/v1/chat/completions", ask_two)
        assert status == 200 and body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16
        assert s.metrics()["prefix_cache"]["disk_hits"] > 0
    finally:
        s.stop()


def test_mixed_valid_bad_and_abandoned_requests_leave_the_server_healthy():
    """60 requests from 12 threads: valid, constrained, bad, streamed, streams dropped after
    two chunks, over-full queue. Nothing may be a 5xx, and afterwards nothing is left
    running and a plain request is answered correctly."""
    import random
    s = LiveServer("--max-batch-size", "4", "--max-queue", "6")
    rng = random.Random(0)
    schema = {"type": "object", "properties": {"c": {"enum": ["red", "green"]}}, "required": ["c"]}
    plain = {"model": "vlmc-demo", "messages": [{"role": "user", "content": "hi"}]}

    def stream(body: dict, chunks: int | None) -> int:
        raw = json.dumps({**body, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            got = b""
            while (chunks is None or got.count(b"data:") < chunks) and b"[DONE]" not in got:
                piece = sock.recv(65536)
                if not piece:
                    break
                got += piece
        return int(got.split(b" ")[1])

    def one(i):
        kind = rng.choice(["ok", "img", "json", "bad", "drop", "stream", "stop"])
        base = {**plain, "temperature": rng.choice([0, 0.7]), "seed": i, "max_tokens": 20}
        if kind == "img":
            return kind, s.post("/v1/chat/completions", {**base, "messages": image_message("Color?", IMG[1])})[0]
        if kind == "json":
            return kind, s.post("/v1/chat/completions", {**base, "max_tokens": 30, "response_format": {
                "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})[0]
        if kind == "bad":
            return kind, s.post("/v1/chat/completions", rng.choice([b"{", {"messages": []}, {**plain, "model": "x"}]))[0]
        if kind == "stop":
            return kind, s.post("/v1/chat/completions", {**base, "stop": ["e", "o"]})[0]
        if kind in ("drop", "stream"):
            return kind, stream({**base, "max_tokens": 200}, 2 if kind == "drop" else None)
        return kind, s.post("/v1/chat/completions", base)[0]

    try:
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(60)))
        assert all(status < 500 for _, status in results), results
        assert {status for _, status in results} >= {200, 400}
        deadline = time.time() + 30
        while time.time() < deadline and (s.metrics()["batch_size"] or s.metrics()["queue_depth"]):
            time.sleep(0.1)
        m = s.metrics()
        assert m["batch_size"] == 0 and m["queue_depth"] == 0 and m["generation_loop"]["alive"]
        status, body = s.post("/v1/chat/completions", ask("What color is the circle?", IMG[1]))
        assert status == 200 and body["choices"][0]["message"]["content"] == "green"
    finally:
        s.stop()


def test_thinking_budget_and_reasoning_split_end_to_end():
    """A server whose thinking start is the end of the demo template's prompt: every reply
    starts inside thinking, the budget forces the end tag after 3 tokens, and the reply
    comes back split into reasoning_content and content (streamed the same way)."""
    s = LiveServer("--enable-thinking", "--thinking-budget", "3",
                   "--thinking-start-token", "<|im_start|>assistant", "--thinking-end-token", "</think>")
    try:
        req = {"model": "vlmc-demo", "temperature": 0, "max_tokens": 16, "min_tokens": 16,
               "messages": [{"role": "user", "content": "Tell me about shapes"}]}
        status, body = s.post("/v1/chat/completions", req)
        assert status == 200, body
        msg = body["choices"][0]["message"]
        assert msg["reasoning_content"] and "</think>" not in msg["reasoning_content"] + msg["content"]
        assert msg["content"]
        status, off = s.post("/v1/chat/completions", {**req, "enable_thinking": False})
        assert "reasoning_content" not in off["choices"][0]["message"]
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="x", max_retries=0)
        plain = {k: v for k, v in req.items() if k != "min_tokens"}
        chunks = list(client.chat.completions.create(stream=True, extra_body={"min_tokens": 16}, **plain))
        deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
        reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
        content = "".join(d.get("content") or "" for d in deltas)
        assert (reasoning, content) == (msg["reasoning_content"], msg["content"])
    finally:
        s.stop()
