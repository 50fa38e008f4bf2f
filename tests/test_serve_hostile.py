"""`vlmc serve` against hostile clients: each test is one way a client (or a damaged disk)
could stall, crash, probe or mislead the server, and checks that it cannot."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serve_helpers import EXAMPLES, BlackHole, LiveServer, NotFoundServer, data_uri, image_message, rss_bytes

CHAT = "/v1/chat/completions"
IMG = data_uri(EXAMPLES / "shapes-1.png")


def plain(text="hi", **kw):
    return {"model": "vlmc-demo", "messages": [{"role": "user", "content": text}], "temperature": 0, **kw}


def raw(port: int, payload: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        got = b""
        try:
            while True:
                piece = sock.recv(65536)
                if not piece:
                    break
                got += piece
        except socket.timeout:
            pass
        return got


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    (folder / "shapes-1.png").write_bytes((EXAMPLES / "shapes-1.png").read_bytes())
    os.mkfifo(folder / "pipe.png")
    return folder


@pytest.fixture(scope="module")
def server(media_dir):
    """Default fetch policy, a small queue."""
    s = LiveServer("--max-batch-size", "4", "--max-queue", "8", "--fetch-timeout", "4",
                   "--allowed-local-media-path", str(media_dir))
    yield s
    s.stop()


# ---------------------------------------------------------------------- 1: a huge prompt
def test_a_body_cap_sized_prompt_is_refused_without_stalling_the_server(server):
    """A 30 MB prompt (under the 32 MiB body cap), tokenized in full, would hold the GIL
    for a minute and take gigabytes: /health answers within a second all along, RSS stays
    within 1 GB of idle, and the reply is a 400 naming the limit."""
    idle = rss_bytes(server.proc.pid)
    huge = "circle square " * (30_000_000 // 14)
    bodies = [(CHAT, plain(huge)), ("/v1/completions", {"prompt": huge, "max_tokens": 2}),
              ("/v1/responses", {"input": huge, "max_output_tokens": 2})]
    results, peak, slowest = [], idle, 0.0
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(server.post, path, body, timeout=120) for path, body in bodies]
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert server.get("/health", timeout=5)[0] == 200
            slowest = max(slowest, time.perf_counter() - t0)
            peak = max(peak, rss_bytes(server.proc.pid))
            time.sleep(0.05)
        results = [f.result() for f in futures]
    for status, body in results:
        assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
        assert "over 1023 tokens" in body["error"]["message"]
    assert slowest < 1.0, slowest
    assert peak - idle < 2**30, (idle, peak)


def test_tokenizer_decides_a_huge_text_is_too_long_in_bounded_time():
    from vlmc.demo import MODEL_DIR
    from vlmc.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(MODEL_DIR)
    t0 = time.perf_counter()
    assert tok.exceeds("x" * 30_000_000, 1000)  # by length alone
    assert tok.exceeds("ab " * 200_000, 1000)   # by tokenizing only until the limit is passed
    assert time.perf_counter() - t0 < 1.0
    text = "circle " * 100
    assert not tok.exceeds(text, 1000) and len(tok.encode(text)) < 1000
    long_ok = "circle " * 6000  # over the piece size, under the limit in tokens
    assert not tok.exceeds(long_ok, len(tok.encode(long_ok)))


def test_long_encodes_release_the_gil():
    """While one thread encodes a long text, another keeps running."""
    from vlmc.demo import MODEL_DIR
    from vlmc.runtime.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(MODEL_DIR)
    text = "circle red square " * 150_000
    gaps, stop = [], threading.Event()

    def tick():
        while not stop.is_set():
            t0 = time.perf_counter()
            time.sleep(0.005)
            gaps.append(time.perf_counter() - t0)

    ticker = threading.Thread(target=tick)
    ticker.start()
    t0 = time.perf_counter()
    tok.encode(text)
    took = time.perf_counter() - t0
    stop.set()
    ticker.join()
    assert took > 0.2 and max(gaps) < took / 2, (took, max(gaps))


# ---------------------------------------------------------------------- 2: disconnects
def test_a_non_streaming_client_that_hangs_up_is_cancelled(server):
    body = json.dumps(plain("Tell me about shapes", max_tokens=900)).encode()
    before = server.metrics()["generation_tokens_total"]
    socks = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        socks.append(sock)
    time.sleep(0.3)
    for sock in socks:
        sock.close()
    t0 = time.time()
    while time.time() - t0 < 5:
        m = server.metrics()
        if not (m["batch_size"] or m["queue_depth"] or m["requests_preparing"]):
            break
        time.sleep(0.05)
    assert time.time() - t0 < 2.0, m  # slots freed within about a second
    spent = server.metrics()["generation_tokens_total"] - before
    assert spent < 8 * 300, spent  # not 8 x 900
    counted = {(r["route"], r["status"]) for r in server.metrics()["requests"]}
    assert (CHAT, 499) in counted


# ---------------------------------------------------------------------- 3: head-of-line blocking
@pytest.fixture(scope="module")
def fetching_server():
    s = LiveServer("--allow-private-fetch", "--fetch-timeout", "3", "--max-queue", "10")
    yield s
    s.stop()


def test_slow_image_hosts_neither_block_other_requests_nor_hide_from_the_queue(fetching_server):
    s = fetching_server
    hole = BlackHole()
    try:
        with ThreadPoolExecutor(16) as pool:
            stuck = [pool.submit(s.post, CHAT, {**plain(), "messages": image_message("hi", hole.url(i))})
                     for i in range(8)]
            deadline = time.time() + 5
            while time.time() < deadline and s.metrics()["image_fetches_in_flight"] < 8:
                time.sleep(0.02)
            m = s.metrics()
            assert m["requests_preparing"] == 8 and m["image_fetches_in_flight"] == 8, m
            t0 = time.perf_counter()
            status, _ = s.post(CHAT, plain(max_tokens=2))
            assert status == 200 and time.perf_counter() - t0 < 2.0
            more = [pool.submit(s.post, CHAT, {**plain(), "messages": image_message("hi", hole.url(9))})
                    for _ in range(4)]
            statuses = sorted(f.result()[0] for f in stuck + more)
        assert statuses.count(429) >= 2 and set(statuses) <= {400, 429}, statuses
        _, text = s.get("/metrics?format=prometheus")[0:3:2]
        assert b"vlmc_requests_preparing" in text and b"vlmc_image_fetches_in_flight" in text
    finally:
        hole.stop()


def test_fifo_in_the_media_folder_is_refused_at_once(server, media_dir):
    t0 = time.perf_counter()
    status, body = server.post(CHAT, {**plain(), "messages": image_message("hi", str(media_dir / "pipe.png"))})
    assert status == 400 and "not a regular file" in body["error"]["message"]
    assert time.perf_counter() - t0 < 5
    status, body = server.post(CHAT, {**plain(max_tokens=2), "messages": image_message("hi", str(media_dir / "shapes-1.png"))})
    assert status == 200, body


def _png(width: int, height: int) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def test_many_huge_images_in_one_request_are_bounded(server):
    """8 images of 6300x6300 are each within --max-image-pixels but together over
    --max-request-pixels: refused from their headers after at most two are decoded."""
    big = data_uri(_png(6300, 6300))
    idle = rss_bytes(server.proc.pid)
    peak = [idle]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(server.proc.pid))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        status, body = server.post(CHAT, {**plain(), "messages": image_message("hi", *[big] * 8)})
    finally:
        done.set()
        watcher.join()
    assert status == 400 and "--max-request-pixels" in body["error"]["message"], body
    assert peak[0] - idle < 900 * 2**20, (idle, peak[0])


# ---------------------------------------------------------------------- 4: inputs that must be 4xx, not 500s
def test_client_input_errors_are_400s_with_one_message(server, media_dir):
    s = server
    surrogate = '"x\\ud800y"'
    tool = ('{"model":"vlmc-demo","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function",'
            '"function":{"name":%s}}]}' % surrogate)
    cases = {
        "chat text": (CHAT, '{"messages":[{"role":"user","content":%s}]}' % surrogate),
        "completion": ("/v1/completions", '{"prompt":%s}' % surrogate),
        "responses": ("/v1/responses", '{"input":%s}' % surrogate),
        "image url": (CHAT, '{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":%s}}]}]}'
                      % surrogate),
        "tool name": (CHAT, tool),
    }
    for name, (path, body) in cases.items():
        status, reply = s.post(path, body.encode())
        assert status == 400 and "surrogate" in reply["error"]["message"], (name, reply)
    for key in ("add_generation_prompt", "messages", "bos_token", "template", "tools"):
        status, reply = s.post(CHAT, {**plain(), "chat_template_kwargs": {key: True}})
        assert status == 400 and key in reply["error"]["message"], (key, reply)
    for path in (str(media_dir / "a\0b.png"), str(media_dir / ("x" * 300 + ".png"))):
        status, reply = s.post(CHAT, {**plain(), "messages": image_message("hi", path)})
        assert status == 400 and reply["error"]["message"].startswith("image 1"), (path[-20:], reply)
    assert "Traceback" not in s.log.getvalue().decode(errors="replace")


def test_an_unexpected_exception_is_one_500_with_a_request_id_and_one_log_line(caplog):
    """The catch-all: whatever escapes a route is a JSON 500 naming the request id, logged once."""
    import asyncio
    import logging
    import httpx2
    from vlmc.serve.app import create_app

    class Broken:
        resident, sources, loads = None, {"m": "m"}, 0

        def listing(self):
            return ["m"]

        async def get(self, model):
            raise ZeroDivisionError("a bug")

        def close(self):
            pass

    async def call():
        transport = httpx2.ASGITransport(app=create_app(Broken()))
        async with httpx2.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post(CHAT, json=plain())

    with caplog.at_level(logging.ERROR, logger="vlmc.serve"):
        resp = asyncio.run(call())
    assert resp.status_code == 500
    rid = resp.headers["x-request-id"]
    assert rid in resp.json()["error"]["message"] and resp.json()["error"]["code"] == "internal_error"
    lines = [r for r in caplog.records if r.name == "vlmc.serve"]
    assert len(lines) == 1 and rid in lines[0].getMessage() and "ZeroDivisionError: a bug" in lines[0].getMessage()
    assert lines[0].exc_info is None  # one line, no traceback


# ---------------------------------------------------------------------- 6: /unload racing requests
def test_unload_while_requests_run_is_never_a_500(server):
    """90 requests from 6 threads (fewer than --max-queue) while /unload runs 10 times:
    each request finishes, or gets a 503 with Retry-After."""
    def ask(i):
        status, headers, _ = server.request("POST", CHAT, json.dumps(plain(f"shapes {i}", max_tokens=12)).encode())
        return status, {k.lower(): v for k, v in headers.items()}

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, i) for i in range(90)]
        for _ in range(10):
            assert server.post("/unload", {})[0] == 200
            time.sleep(0.15)
        results = [f.result() for f in futures]
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) > 0
    assert all(headers.get("retry-after") for status, headers in results if status == 503)
    assert server.post(CHAT, plain(max_tokens=2))[0] == 200


# ---------------------------------------------------------------------- 7: outbound fetch policy
def test_image_urls_to_private_addresses_are_refused_by_default(server):
    missing = NotFoundServer()
    try:
        status, body = server.post(CHAT, {**plain(), "messages": image_message("hi", missing.url)})
    finally:
        missing.stop()
    assert status == 400 and "could not be fetched" in body["error"]["message"]
    log = server.log.getvalue().decode(errors="replace")
    assert "--allow-private-fetch" in log and "127.0.0.1" in log  # the reason is in the server's log only
    assert "127.0.0.1" not in body["error"]["message"]


def test_fetch_failures_all_look_alike_to_the_client(fetching_server):
    s = fetching_server
    missing = NotFoundServer()
    closed = free_closed_port()
    redirect = RedirectServer("ftp://example.com/x.png")
    try:
        urls = {"404": missing.url, "refused": f"http://127.0.0.1:{closed}/x.png",
                "not an image": s.base + "/health", "redirect to ftp": redirect.url,
                "no such scheme": "gopher://127.0.0.1/x"}
        messages = {}
        for name, url in urls.items():
            status, body = s.post(CHAT, {**plain(), "messages": image_message("hi", url)})
            assert status == 400, (name, body)
            messages[name] = body["error"]["message"]
    finally:
        missing.stop()
        redirect.stop()
    fetched = {k: v for k, v in messages.items() if k != "no such scheme"}
    assert len(set(fetched.values())) == 1, messages


def test_fetch_policy_addresses_and_redirect_hops():
    import asyncio
    import ipaddress
    from vlmc.serve.fetch import FetchFailed, Fetcher, FetchPolicy

    default = FetchPolicy()
    for address, allowed in {"93.184.215.14": True, "2606:4700::1111": True, "127.0.0.1": False,
                             "10.0.0.1": False, "172.16.3.4": False, "192.168.1.1": False, "169.254.169.254": False,
                             "::1": False, "fe80::1": False, "fc00::1": False, "::ffff:10.0.0.1": False,
                             "2002:7f00:1::": False, "64:ff9b::a00:1": False, "100.64.0.1": False,
                             "0.0.0.0": False, "224.0.0.1": False}.items():
        assert default.allows(address) is allowed, address
    private = FetchPolicy(allow_private=True)
    assert private.allows("127.0.0.1") and private.allows("10.1.1.1") and not private.allows("169.254.169.254")
    # a hop that is allowed may not redirect to one that is not: 127.0.0.1 is allowed here, 127.0.0.3 is not
    target = RedirectServer("http://127.0.0.3:9/x.png")
    try:
        policy = FetchPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), timeout=3)
        with pytest.raises(FetchFailed, match="127.0.0.3"):
            asyncio.run(Fetcher(policy).get(target.url))
    finally:
        target.stop()


# ---------------------------------------------------------------------- 8: metrics labels
def test_metrics_label_routes_by_template_and_escape(server):
    for i in range(200):
        server.get(f"/probe/{i}")
    server.get('/a"b\\c')
    status, _, text = server.get("/metrics?format=prometheus")
    assert status == 200
    from prometheus_client.parser import text_string_to_metric_families
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    routes = {s.labels["route"] for s in families["vlmc_requests"].samples}
    assert "other" in routes and not any(r.startswith("/probe") for r in routes)
    assert routes <= {"other", "/health", "/metrics", CHAT, "/v1/completions", "/v1/responses", "/unload",
                      "/v1/models"}, routes
    assert len(text) < 20_000


# ---------------------------------------------------------------------- 9: tiny temperatures
def test_tiny_temperatures_are_greedy(server):
    import mlx.core as mx
    from vlmc.runtime.sampling import Sampler, SamplingParams
    assert SamplingParams(temperature=1e-38).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    logits = mx.random.normal((4, 50)) * 30
    assert Sampler(SamplingParams(temperature=1e-38))(logits).tolist() == mx.argmax(logits, axis=-1).tolist()
    greedy = server.post(CHAT, plain("Tell me about shapes", max_tokens=12))[1]["choices"][0]["message"]["content"]
    for t in (1e-38, 1e-30, 1e-7):
        reply = server.post(CHAT, {**plain("Tell me about shapes", max_tokens=12), "temperature": t})[1]
        assert reply["choices"][0]["message"]["content"] == greedy, t


# ---------------------------------------------------------------------- 10: transport timeouts
@pytest.fixture(scope="module")
def impatient_server():
    s = LiveServer("--read-timeout", "2")
    yield s
    s.stop()


def test_idle_and_silent_connections_are_closed(impatient_server):
    """--read-timeout 2: connections that send nothing, trickle headers, or stop in the
    middle of a body are closed (a 408 for the body) instead of held forever."""
    server = impatient_server
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    trickle = socket.create_connection(("127.0.0.1", server.port))
    t0 = time.time()
    trickle.sendall(b"GET /health HTTP/1.1\r\n")
    silent = raw(server.port, f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              "Content-Length: 100\r\n\r\n".encode() + b'{"messages": ')  # 13 of the 100 bytes
    assert silent.startswith(b"HTTP/1.1 408") or b" 408 " in silent.split(b"\r\n")[0], silent[:200]
    for sock in idle + [trickle]:
        sock.settimeout(6)
        try:
            while sock.recv(1024):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    assert time.time() - t0 < 8


def test_a_chunked_body_over_the_cap_is_413():
    s = LiveServer("--max-body-bytes", "4096")
    try:
        chunk = b"x" * 3000
        payload = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   "Transfer-Encoding: chunked\r\n\r\n").encode()
        payload += b"".join(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
        reply = raw(s.port, payload)
        assert reply.split(b"\r\n")[0].endswith(b"413 Request Entity Too Large") or b" 413 " in reply[:20], reply[:200]
        assert b"max-body-bytes" in reply
    finally:
        s.stop()


# ---------------------------------------------------------------------- 11: smaller items
def test_smaller_protocol_details():
    key = "sk-hostile"
    s = LiveServer("--api-key", key)
    try:
        status, headers, _ = s.request("GET", "/v1/models", headers={"Authorization": ""})
        assert status == 401 and headers.get("www-authenticate", headers.get("WWW-Authenticate")) == "Bearer"
        for path in ("/docs", "/openapi.json"):
            assert s.request("GET", path, headers={"Authorization": ""})[0] == 200, path
        spec = json.loads(s.request("GET", "/openapi.json", headers={"Authorization": ""})[2])
        assert spec["components"]["securitySchemes"] and "ChatCompletionRequest" in spec["components"]["schemas"]
        assert s.request("HEAD", "/health", headers={"Authorization": ""})[0] == 200
        auth = {"Authorization": f"Bearer {key}"}
        status, _, reply = s.request("POST", CHAT, b"", headers=auth)
        message = json.loads(reply)["error"]["message"]
        assert status == 400 and "None" not in message and "empty" in message
        for bad in ({**plain(), "stream": "yes"}, {"prompt": [1, True], "max_tokens": 2},
                    {**plain(), "temperature": "0.5"}):
            path = CHAT if "messages" in bad else "/v1/completions"
            assert s.post(path, bad, headers=auth)[0] == 400, bad
        status, body = s.post(CHAT, {**plain(), "messages": image_message("hi", "file://otherhost/etc/hostname")},
                              headers=auth)
        assert status == 400 and "otherhost" in body["error"]["message"]
    finally:
        s.stop()
    refused = subprocess.run([sys.executable, "-c", "from vlmc.cli import main; main()", "serve", "--max-queue", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "--max-queue" in refused.stderr and "Traceback" not in refused.stderr


# ---------------------------------------------------------------------- helpers
def free_closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedirectServer:
    """Answers every GET with a 302 to ``location``."""

    def __init__(self, location: str):
        import http.server

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/img.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


# ---------------------------------------------------------------------- 5: damaged prefix-cache blocks
def _layers(width: int = 8, n: int = 2):
    import mlx.core as mx
    return [{"k.x": mx.random.normal((1, 2, 4, width)), "v.x": mx.random.normal((1, 2, 4, width))} for _ in range(n)]


def _spec(n: int = 2):
    from vlmc.runtime.kv_cache import KVCache
    from vlmc.runtime.prefix_cache import block_spec
    return [block_spec(KVCache(1, 2, 8), 4) for _ in range(n)]


def test_disk_blocks_with_flipped_bytes_or_no_checksum_are_dropped(tmp_path):
    import mlx.core as mx
    from vlmc.runtime.prefix_cache import DiskTier
    disk = DiskTier(tmp_path)
    disk.put("good", _layers())
    assert disk.get("good") is not None
    for key, damage in {"flip": lambda b: b[:-9] + bytes([b[-9] ^ 0x10]) + b[-8:],
                        "cut": lambda b: b[:len(b) // 2],
                        "header": lambda b: b"\xff" * 8 + b[8:]}.items():
        disk.put(key, _layers())
        path = tmp_path / f"{key}.safetensors"
        path.write_bytes(damage(path.read_bytes()))
        assert disk.get(key) is None, key
        assert not path.exists(), key
    mx.save_safetensors(str(tmp_path / "bare.safetensors"), {f"0.{k}": v for k, v in _layers(n=1)[0].items()})
    assert disk.get("bare") is None  # written without this format's metadata: not trusted
    assert disk.corrupt == 4


def test_blocks_that_do_not_fit_the_cache_are_not_served(tmp_path):
    from vlmc.runtime.prefix_cache import DiskTier, PrefixCache
    disk = DiskTier(tmp_path)
    cache = PrefixCache(1 << 20, 4, disk)
    disk.put("a", _layers())
    disk.put("b", _layers(width=7))  # consistent with its own checksum, but not this model's shape
    found = cache.lookup(["a", "b"], usable=2, expect=_spec())
    assert len(found) == 1
    assert cache.stats()["corrupt_blocks"] == 1 and not (tmp_path / "b.safetensors").exists()
    assert cache.lookup(["a"], usable=1, expect=_spec(n=3)) == []  # a block for another layer count


def test_a_damaged_prefix_cache_on_disk_costs_a_prefill_not_a_500(tmp_path):
    from vlmc.runtime.prefix_cache import DiskTier
    system = {"role": "system", "content": "Answer with one word. " * 12}
    ask = {"model": "vlmc-demo", "max_tokens": 6, "temperature": 0,
           "messages": [system, *image_message("What color is the circle?", IMG)]}
    args = ("--prefix-cache-dir", str(tmp_path), "--prefix-block-size", "16")
    s = LiveServer(*args)
    try:
        status, first = s.post(CHAT, ask)
        assert status == 200
    finally:
        s.stop()
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) >= 2
    disk = DiskTier(tmp_path)
    for i, path in enumerate(files):
        key = path.stem
        if i % 2:
            data = bytearray(path.read_bytes())
            data[-20] ^= 0x01
            path.write_bytes(bytes(data))
        else:  # a readable block of the wrong shape, with metadata that matches it
            layers = disk.get(key)
            path.unlink()
            disk.put(key, [{name: a[:, :, :, :-1] for name, a in layer.items()} for layer in layers])
    s = LiveServer(*args)
    try:
        for _ in range(2):
            status, again = s.post(CHAT, ask)
            assert status == 200, again
            assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        prefix = s.metrics()["prefix_cache"]
        assert prefix["corrupt_blocks"] + prefix["disk_corrupt_blocks"] >= 1
    finally:
        s.stop()
