"""Load generator for OpenAI-compatible servers: throughput and TTFT under concurrency.

    python benchmarks/serve_load.py --server vlmc                          # bundled demo model
    python benchmarks/serve_load.py --server vlmc /tmp/bench/cpu-q4 --levels 1,4,8
    python benchmarks/serve_load.py --server mlx-vlm /tmp/bench/qwen2vl-2b-hub \\
        --mlx-vlm-python /tmp/mlxvlm-venv/bin/python
    python benchmarks/serve_load.py --url http://127.0.0.1:8080            # a running server
    python benchmarks/serve_load.py --server vlmc -- --kv-bits 8           # after --: server args
    python benchmarks/serve_load.py --make-padded-copy SRC DST [--pad-vocab N]
    python benchmarks/serve_load.py --server vlmc --hostile 120            # normal vs normal + hostile

The script starts the server itself (``--server vlmc``: ``vlmc serve MODEL --port P
--max-batch-size 16``; ``--server mlx-vlm``: ``python -m mlx_vlm.server --model MODEL
--port P``), or uses a running one (``--url``). It waits for ``/health``, sends one
warm-up request (with an image, ``--warmup-max-tokens`` 4), then runs each concurrency level C in turn: a fixed
number of requests (default ``max(2*C, 8)``) is shared by C worker threads, each sending
one streaming ``/v1/chat/completions`` request at a time (stdlib ``http.client``,
``stream_options.include_usage``, temperature 0, fixed ``max_tokens``). Every other
request carries one of ``examples/shapes-*.png`` as a ``data:`` URI; by default each
image gets one pixel changed per request so that no server answers it from a vision
feature cache (``--same-images`` turns that off).

Per level:
* tok/s: the completion tokens of all its requests (``usage.completion_tokens``) over the
  level's wall time (first request sent to last response finished);
* ratio: tok/s(C) / tok/s(1) (or over the lowest level measured);
* TTFT p50/p99: from sending a request to its first non-empty ``delta.content``;
* e2e p50/p99: from sending to the end of the stream; per-request decode tok/s:
  (completion tokens - 1) / (end - first content);
* req/s, errors (HTTP status != 200, an error in the stream, no usage, transport errors);
* completion tokens: mean / min / max, and how many requests stopped before ``max_tokens``
  (``finish_reason != "length"`` or fewer tokens): a server that stops at EOS generates
  less and its tok/s is not comparable — the table shows it, nothing is hidden;
* server RSS peak (the started server process and its children, sampled every 0.25 s) and
  the load average before and after.

``--check-serial``: after the levels, the highest level's requests are sent again one at a
time and every reply's text and token count must equal what it got under concurrency
(greedy decoding: continuous batching must not change a reply); mismatches count as failures.

``--make-padded-copy SRC DST``: a copy of a random-weight benchmark checkpoint (or vlmc
artifact) whose small tokenizer is padded to the model's vocab size, so that every sampled
id streams text (see ``make_padded_copy``); the other files are symlinks.

mlx-vlm (0.7.10) serves with continuous batching too: one generation thread owns a
``BatchGenerator`` (up to 32 sequences decode together, prompts are prefilled up to 8 at a
time); each request's vision tower runs on that thread when the request is admitted.

``--hostile SECONDS``: instead of the levels, two phases of that length each, on one
server: ``--hostile-normal`` workers (default 4) send normal streaming requests (as above,
one after another) alone, then the same workers again beside ``--hostile-workers``
(default 2) that cycle through hostile requests (``HOSTILE``: a prompt of nearly the body
cap, non-streaming requests whose client hangs up after 0.3 s, image URLs to loopback and
to a silent port, a FIFO in the media folder, 8 huge PNGs in one request, lone surrogates,
reserved template kwargs, NUL paths, tiny temperatures, unknown paths with quotes, idle
and half-sent connections, an over-cap chunked body). It reports the normal requests' p50/p99
latency in both phases and their ratio, every status the hostile requests got, the 5xx and
hung requests (no answer within ``--hang-after`` s) of both kinds, and the server's RSS at
the start, peak and end of each phase. It exits 1 on any 5xx, hang or failed normal request.
A started vlmc gets ``--allowed-local-media-path`` (a temporary folder holding a FIFO).

Prints a table, writes ``--out FILE`` (JSON), exits 1 if any request failed (2 if the
server could not be started).
"""
from __future__ import annotations

import argparse
import base64
import glob
import http.client
import io
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# the vlmc of the environment running this script (its console script beside the Python)
DEFAULT_VLMC = str(Path(sys.executable).parent / "vlmc")
DEFAULT_MLX_VLM_PYTHON = "/tmp/mlxvlm-venv/bin/python"

TEXT_PROMPTS = [
    "Write a short story about a lighthouse keeper and a lost cat.",
    "Explain in simple words how a bicycle stays upright while moving.",
    "List some ideas for a rainy afternoon with children at home.",
    "Describe the smell of a bakery early in the morning.",
]
IMAGE_PROMPTS = [
    "Describe this image.",
    "What shapes and colours do you see in this picture?",
    "Count the objects in this image and say where they are.",
]


# ====================================================================== helpers
def quantile(values: list[float], q: float) -> float | None:
    """Linear-interpolated quantile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    out = []
    for task in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            out += [int(x) for x in Path(task).read_text().split()]
        except OSError:
            pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants (Linux /proc; 0 elsewhere)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


class RssSampler:
    """Samples a process tree's RSS in the background; ``peak()`` since the last ``reset()``."""

    def __init__(self, pid: int | None, every: float = 0.25):
        self.pid, self.every = pid, every
        self._peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if pid is not None:
            threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = tree_rss_bytes(self.pid)
            with self._lock:
                self._peak = max(self._peak, rss)
            self._stop.wait(self.every)

    def now(self) -> int | None:
        return tree_rss_bytes(self.pid) if self.pid is not None else None

    def reset(self) -> None:
        with self._lock:
            self._peak = self.now() or 0

    def peak(self) -> int | None:
        if self.pid is None:
            return None
        with self._lock:
            return max(self._peak, self.now() or 0)

    def stop(self) -> None:
        self._stop.set()


# ====================================================================== HTTP
class Endpoint:
    def __init__(self, url: str, api_key: str | None = None):
        u = urllib.parse.urlparse(url if "://" in url else "http://" + url)
        self.scheme, self.host = u.scheme, u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.prefix = u.path.rstrip("/")
        if self.prefix.endswith("/v1"):
            self.prefix = self.prefix[:-3]
        self.api_key = api_key

    def conn(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def get_json(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        c = self.conn(timeout)
        try:
            c.request("GET", self.prefix + path, headers=self.headers())
            r = c.getresponse()
            body = r.read()
            try:
                return r.status, json.loads(body)
            except ValueError:
                return r.status, body.decode("utf-8", "replace")
        finally:
            c.close()


def stream_chat(ep: Endpoint, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One streaming chat completion; timestamps relative to the send."""
    rec: dict[str, Any] = {"ok": False, "error": None, "status": None, "ttft_s": None, "first_chunk_s": None,
                           "e2e_s": None, "completion_tokens": None, "prompt_tokens": None,
                           "finish_reason": None, "content_chunks": 0, "chars": 0, "text": ""}
    payload = json.dumps(body).encode()
    t0 = time.perf_counter()
    rec["t_send"] = t0
    c = ep.conn(timeout)
    try:
        c.request("POST", ep.prefix + "/v1/chat/completions", body=payload, headers=ep.headers())
        r = c.getresponse()
        rec["status"] = r.status
        if r.status != 200:
            rec["error"] = f"HTTP {r.status}: {r.read()[:300].decode('utf-8', 'replace')}"
            rec["e2e_s"] = time.perf_counter() - t0
            return rec
        saw_done = False
        while True:
            line = r.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                saw_done = True
                break
            now = time.perf_counter() - t0
            try:
                obj = json.loads(data)
            except ValueError:
                rec["error"] = f"bad SSE data: {data[:200]!r}"
                continue
            if "error" in obj and obj["error"]:
                rec["error"] = f"error in stream: {json.dumps(obj['error'])[:300]}"
                continue
            if rec["first_chunk_s"] is None:
                rec["first_chunk_s"] = now
            for ch in obj.get("choices") or []:
                delta = ch.get("delta") or {}
                text = delta.get("content")
                if text:
                    if rec["ttft_s"] is None:
                        rec["ttft_s"] = now
                    rec["content_chunks"] += 1
                    rec["chars"] += len(text)
                    rec["text"] += text
                if ch.get("finish_reason"):
                    rec["finish_reason"] = ch["finish_reason"]
            if obj.get("usage"):
                rec["completion_tokens"] = obj["usage"].get("completion_tokens")
                rec["prompt_tokens"] = obj["usage"].get("prompt_tokens")
        rec["e2e_s"] = time.perf_counter() - t0
        if rec["error"] is None and rec["completion_tokens"] is None:
            rec["error"] = "no usage in the stream" + ("" if saw_done else " (and no [DONE])")
        rec["ok"] = rec["error"] is None
    except Exception as e:  # transport errors, timeouts
        rec["error"] = f"{type(e).__name__}: {e}"
        rec["e2e_s"] = time.perf_counter() - t0
    finally:
        c.close()
    return rec


# ====================================================================== requests
class RequestMaker:
    def __init__(self, model: str, max_tokens: int, image_every: int, unique_images: bool,
                 image_paths: list[Path], fixed_length: bool = False):
        self.model, self.max_tokens, self.fixed_length = model, max_tokens, fixed_length
        self.image_every, self.unique = image_every, unique_images
        self.images = [p.read_bytes() for p in image_paths]
        self.image_names = [p.name for p in image_paths]
        self._pil = None
        if unique_images and self.images:
            try:
                from PIL import Image
                self._pil = Image
            except ImportError:
                print("serve_load: Pillow missing: images are sent unchanged (vision caches may hit)",
                      file=sys.stderr)
                self.unique = False

    def image_uri(self, n: int) -> str:
        raw = self.images[n % len(self.images)]
        if self.unique:
            im = self._pil.open(io.BytesIO(raw)).convert("RGB")
            # one pixel, a value unique to request n: defeats content-keyed vision caches
            im.putpixel((0, 0), (n % 256, (n // 256) % 256, 77))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            raw = buf.getvalue()
        return "data:image/png;base64," + base64.b64encode(raw).decode()

    def has_image(self, n: int) -> bool:
        return bool(self.images) and self.image_every > 0 and n % self.image_every == self.image_every - 1

    def body(self, n: int) -> dict[str, Any]:
        if self.has_image(n):
            content: Any = [{"type": "image_url", "image_url": {"url": self.image_uri(n)}},
                            {"type": "text", "text": IMAGE_PROMPTS[n % len(IMAGE_PROMPTS)]}]
        else:
            content = f"{TEXT_PROMPTS[n % len(TEXT_PROMPTS)]} (request {n})"
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.fixed_length:  # vlmc/vLLM extension: no EOS before max_tokens
            body["min_tokens"] = self.max_tokens
        return body


def run_level(ep: Endpoint, maker: RequestMaker, concurrency: int, n_requests: int, first_id: int,
              timeout: float, rss: RssSampler) -> dict[str, Any]:
    bodies = [(first_id + i, maker.body(first_id + i)) for i in range(n_requests)]   # built before timing
    lock = threading.Lock()
    todo = list(reversed(bodies))
    results: list[dict[str, Any]] = []

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                n, body = todo.pop()
            rec = stream_chat(ep, body, timeout)
            rec["id"], rec["image"] = n, maker.has_image(n)
            with lock:
                results.append(rec)

    la_before = loadavg()
    rss.reset()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return summarize(concurrency, results, wall, t0, maker.max_tokens, la_before, loadavg(), rss.peak())


def serial_check(ep: Endpoint, maker: RequestMaker, row: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The replies of one level against the same requests sent again one at a time."""
    done = [r for r in row["per_request"] if r["ok"]]
    print(f"serve_load: serial check: {len(done)} requests of C={row['concurrency']} again, one at a time ...",
          file=sys.stderr, flush=True)
    differ, errors = [], 0
    for r in done:
        rec = stream_chat(ep, maker.body(r["id"]), timeout)
        if not rec["ok"]:
            errors += 1
        elif rec["text"] != r["text"] or rec["completion_tokens"] != r["completion_tokens"]:
            differ.append(r["id"])
    out = {"concurrency": row["concurrency"], "requests": len(done), "identical": len(done) - len(differ) - errors,
           "differ": differ, "errors": errors}
    print(f"serve_load: serial check: {out['identical']} of {len(done)} identical"
          + (f", differing: request(s) {differ}" if differ else "") + (f", {errors} failed" if errors else ""),
          file=sys.stderr, flush=True)
    return out


def summarize(concurrency: int, results: list[dict[str, Any]], wall: float, t0: float, max_tokens: int,
              la_before, la_after, rss_peak) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    errors = [r for r in results if not r["ok"]]
    toks = [r["completion_tokens"] for r in ok]
    total = sum(toks)
    early = [r for r in ok if r["completion_tokens"] < max_tokens or r["finish_reason"] not in ("length", None)]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    e2e = [r["e2e_s"] for r in ok]
    dec = [(r["completion_tokens"] - 1) / (r["e2e_s"] - r["ttft_s"]) for r in ok
           if r["ttft_s"] is not None and r["completion_tokens"] > 1 and r["e2e_s"] > r["ttft_s"]]

    def ms(x):
        return None if x is None else round(1000 * x, 1)

    reqs = []
    for r in sorted(results, key=lambda r: r["id"]):
        reqs.append({"id": r["id"], "image": r["image"], "ok": r["ok"], "error": r["error"],
                     "start_s": round(r["t_send"] - t0, 4), "ttft_ms": ms(r["ttft_s"]),
                     "first_chunk_ms": ms(r["first_chunk_s"]), "e2e_ms": ms(r["e2e_s"]),
                     "prompt_tokens": r["prompt_tokens"], "completion_tokens": r["completion_tokens"],
                     "finish_reason": r["finish_reason"], "content_chunks": r["content_chunks"],
                     "text": r["text"]})
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": len(errors),
        "error_samples": sorted({r["error"] for r in errors})[:5],
        "wall_s": round(wall, 3),
        "completion_tokens_total": total,
        "completion_tokens_mean": round(total / len(ok), 2) if ok else None,
        "completion_tokens_min": min(toks) if toks else None,
        "completion_tokens_max": max(toks) if toks else None,
        "stopped_early": len(early),
        "no_content": sum(1 for r in ok if r["ttft_s"] is None),
        "tok_s": round(total / wall, 3) if wall > 0 else None,
        "req_s": round(len(ok) / wall, 4) if wall > 0 else None,
        "ttft_p50_ms": ms(quantile(ttft, 0.5)), "ttft_p99_ms": ms(quantile(ttft, 0.99)),
        "ttft_max_ms": ms(max(ttft)) if ttft else None,
        "ttft_text_p50_ms": ms(quantile([r["ttft_s"] for r in ok if r["ttft_s"] is not None and not r["image"]], 0.5)),
        "ttft_image_p50_ms": ms(quantile([r["ttft_s"] for r in ok if r["ttft_s"] is not None and r["image"]], 0.5)),
        "e2e_p50_ms": ms(quantile(e2e, 0.5)), "e2e_p99_ms": ms(quantile(e2e, 0.99)),
        "per_request_decode_tok_s_mean": round(sum(dec) / len(dec), 3) if dec else None,
        "server_rss_peak_mb": None if rss_peak is None else round(rss_peak / 2**20, 1),
        "loadavg_before": la_before, "loadavg_after": la_after,
        "per_request": reqs,
    }


# ====================================================================== hostile traffic
HOSTILE_BODY_BYTES = 30_000_000  # under vlmc's default --max-body-bytes (32 MiB)
HUNG = -1                        # the status recorded for a hostile request that hung


def _png(width: int, height: int) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


class Hostile:
    """The hostile requests, built once; ``send(kind)`` returns (kind, status or None, seconds)."""

    SLOW = ("idle_connection", "half_body", "silent_url")  # answered only when a server timeout ends them

    def __init__(self, ep: Endpoint, model: str, media_dir: Path | None, hang_after: float):
        self.ep, self.model, self.media_dir, self.hang_after = ep, model, media_dir, hang_after
        chat = {"model": model, "temperature": 0, "max_tokens": 8}
        huge = "circle square " * (HOSTILE_BODY_BYTES // 14)
        big_png = "data:image/png;base64," + base64.b64encode(_png(6300, 6300)).decode()
        self.silent_port = self._silent_port()
        url_msg = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                            {"type": "text", "text": "hi"}]}]
        self.bodies: dict[str, bytes] = {
            "huge_prompt": json.dumps({**chat, "messages": [{"role": "user", "content": huge}]}).encode(),
            "loopback_url": json.dumps({**chat, "messages": url_msg(f"http://127.0.0.1:{ep.port}/health")}).encode(),
            "silent_url": json.dumps({**chat, "messages": url_msg(f"http://127.0.0.1:{self.silent_port}/x.png")}).encode(),
            "huge_images": json.dumps({**chat, "messages": [{"role": "user", "content": [
                *[{"type": "image_url", "image_url": {"url": big_png}}] * 8, {"type": "text", "text": "hi"}]}]}).encode(),
            "surrogate": b'{"messages":[{"role":"user","content":"x\\ud800y"}],"max_tokens":4}',
            "template_kwargs": json.dumps({**chat, "messages": [{"role": "user", "content": "hi"}],
                                           "chat_template_kwargs": {"add_generation_prompt": False}}).encode(),
            "nul_path": json.dumps({**chat, "messages": url_msg(str(media_dir or "/tmp") + "/a\u0000b.png")}).encode(),
            "tiny_temperature": json.dumps({**chat, "temperature": 1e-38,
                                            "messages": [{"role": "user", "content": "hi"}]}).encode(),
            "hang_up": json.dumps({**chat, "max_tokens": 400,
                                   "messages": [{"role": "user", "content": "Tell me about shapes"}]}).encode(),
        }
        if media_dir is not None:
            self.bodies["fifo"] = json.dumps({**chat, "messages": url_msg(str(media_dir / "pipe.png"))}).encode()
        chunk = b"x" * (1 << 20)
        self.chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                        + b"".join(b"%x\r\n" % len(chunk) + chunk + b"\r\n" for _ in range(40)) + b"0\r\n\r\n")
        self.kinds = [*self.bodies, "quote_path", "idle_connection", "half_body", "chunked_over_cap"]
        self.kinds.remove("hang_up")
        self.kinds += ["hang_up"] * 3  # the one that costs the server work unless it is cancelled
        self.kinds.remove("huge_prompt")
        self.kinds.append("huge_prompt")

    @staticmethod
    def _silent_port() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        held = []

        def accept():
            while True:
                conn, _ = sock.accept()
                held.append(conn)  # never answered

        threading.Thread(target=accept, daemon=True).start()
        return sock.getsockname()[1]

    def _raw(self, *payload: bytes, read: bool = True, close_after: float | None = None) -> int | None:
        with socket.create_connection((self.ep.host, self.ep.port), timeout=self.hang_after) as sock:
            for part in payload:  # (parts sent one by one: no copy of a 30 MB body per request)
                sock.sendall(part)
            if close_after is not None:
                time.sleep(close_after)
                return 499
            if not read:
                return None
            head = b""
            while b"\r\n" not in head:
                piece = sock.recv(4096)
                if not piece:
                    return None
                head += piece
            return int(head.split(b" ", 2)[1])

    def _post(self, path: str, body: bytes, **kw) -> int | None:
        auth = f"Authorization: Bearer {self.ep.api_key}\r\n" if self.ep.api_key else ""
        head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n{auth}"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return self._raw(head, body, **kw)

    def send(self, kind: str) -> tuple[str, int | None, float]:
        t0 = time.perf_counter()
        try:
            if kind == "hang_up":
                status = self._post("/v1/chat/completions", self.bodies[kind], close_after=0.3)
            elif kind in self.bodies:
                status = self._post("/v1/chat/completions", self.bodies[kind])
            elif kind == "quote_path":
                status = self._raw(b'GET /probe/%22x"y/' + str(time.time_ns()).encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n")
            elif kind == "idle_connection":  # nothing sent: the server must close it (header deadline)
                status = self._raw(b"")
            elif kind == "half_body":         # Content-Length, then silence
                status = self._raw(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            else:                             # chunked body over the cap
                try:
                    status = self._raw(self.chunked)
                except (BrokenPipeError, ConnectionResetError):
                    status = 413  # the server answered and closed while the body was still being sent
        except socket.timeout:
            return kind, HUNG, time.perf_counter() - t0    # no answer and not closed within --hang-after
        except (BrokenPipeError, ConnectionResetError):
            status = 0                                     # closed by the server (counted, not a hang)
        return kind, status, time.perf_counter() - t0


def _cache_mb(ep: Endpoint) -> dict[str, Any]:
    """What the server's caches hold (they grow with unique prompts and images, by design)."""
    try:
        status, snap = ep.get_json("/metrics", timeout=10)
    except OSError:
        return {}
    if status != 200 or not isinstance(snap, dict):
        return {}
    mb = lambda v: None if v is None else round(v / 2**20, 1)  # noqa: E731
    return {"prefix": mb(snap.get("prefix_cache", {}).get("bytes")), "vision": mb(snap.get("vision_cache", {}).get("bytes")),
            "mlx_active": mb(snap.get("mlx_active_memory_bytes")), "mlx_cache": mb(snap.get("mlx_cache_memory_bytes"))}


def hostile_run(args, ep: Endpoint, maker: "RequestMaker", rss: RssSampler, media_dir: Path | None) -> dict[str, Any]:
    """Two phases of ``args.hostile`` seconds: normal traffic alone, then with hostile traffic."""
    hostile = Hostile(ep, maker.model, media_dir, args.hang_after)
    counter = [0]
    lock = threading.Lock()

    def phase(with_hostile: bool) -> dict[str, Any]:
        stop = time.perf_counter() + args.hostile
        normal: list[dict[str, Any]] = []
        bad: list[tuple[str, int | None, float]] = []
        samples: list[int] = []

        def normal_worker():
            while time.perf_counter() < stop:
                with lock:
                    n = counter[0]
                    counter[0] += 1
                rec = stream_chat(ep, maker.body(n), args.hang_after)
                rec["image"] = maker.has_image(n)
                with lock:
                    normal.append(rec)

        waiting: list[threading.Thread] = []

        def record(kind: str) -> None:
            result = hostile.send(kind)
            with lock:
                bad.append(result)

        def hostile_worker(k: int):
            i = k
            while time.perf_counter() < stop:
                kind = hostile.kinds[i % len(hostile.kinds)]
                i += args.hostile_workers
                if kind in Hostile.SLOW:  # they wait on the server's timeouts: on the side, not in line
                    t = threading.Thread(target=record, args=(kind,), daemon=True)
                    t.start()
                    with lock:
                        waiting.append(t)
                else:
                    record(kind)
                time.sleep(args.hostile_pause)

        def sample():
            while time.perf_counter() < stop:
                samples.append(rss.now() or 0)
                time.sleep(1.0)

        threads = [threading.Thread(target=normal_worker) for _ in range(args.hostile_normal)]
        threads.append(threading.Thread(target=sample))
        if with_hostile:
            threads += [threading.Thread(target=hostile_worker, args=(k,)) for k in range(args.hostile_workers)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for t in waiting:
            t.join(args.hang_after + 5)
        e2e = [r["e2e_s"] for r in normal if r["ok"]]
        statuses: dict[str, dict[str, int]] = {}
        for kind, status, _ in bad:
            statuses.setdefault(kind, {}).setdefault(str(status), 0)
            statuses[kind][str(status)] += 1
        return {
            "seconds": round(time.perf_counter() - t0, 1),
            "normal_requests": len(normal), "normal_failed": sum(1 for r in normal if not r["ok"]),
            "normal_5xx": sum(1 for r in normal if (r["status"] or 0) >= 500),
            "normal_hung": sum(1 for r in normal if r["error"] and "timed out" in r["error"]),
            "normal_error_samples": sorted({r["error"] for r in normal if r["error"]})[:5],
            "normal_e2e_p50_ms": None if not e2e else round(1000 * quantile(e2e, 0.5), 1),
            "normal_e2e_p99_ms": None if not e2e else round(1000 * quantile(e2e, 0.99), 1),
            "hostile_requests": len(bad), "hostile_statuses": statuses,
            "hostile_5xx": sum(1 for _, s, _ in bad if s is not None and s >= 500),
            "hostile_hung": sum(1 for _, s, _ in bad if s == HUNG),
            "rss_mb": {"start": round(samples[0] / 2**20, 1) if samples else None,
                       "peak": round(max(samples) / 2**20, 1) if samples else None,
                       "end": round(samples[-1] / 2**20, 1) if samples else None,
                       "every_10s": [round(x / 2**20) for x in samples[::10]]},
            "caches_mb": _cache_mb(ep),
        }

    print(f"serve_load: hostile mode: {args.hostile:g} s of normal traffic ({args.hostile_normal} workers) ...",
          file=sys.stderr, flush=True)
    alone = phase(False)
    print(f"serve_load:   normal alone: p99 {alone['normal_e2e_p99_ms']} ms over {alone['normal_requests']} requests",
          file=sys.stderr, flush=True)
    print(f"serve_load: ... then {args.hostile:g} s with {args.hostile_workers} hostile workers", file=sys.stderr,
          flush=True)
    mixed = phase(True)
    time.sleep(10)  # idle: the server hands freed memory back
    mixed["rss_mb"]["after_10s_idle"] = round((rss.now() or 0) / 2**20, 1)
    ratio = (mixed["normal_e2e_p99_ms"] / alone["normal_e2e_p99_ms"]
             if alone["normal_e2e_p99_ms"] and mixed["normal_e2e_p99_ms"] else None)
    out = {"alone": alone, "with_hostile": mixed, "normal_p99_ratio": None if ratio is None else round(ratio, 3)}
    print(json.dumps(out, indent=2))
    return out


# ====================================================================== servers
def start_server(args, port: int, log_path: Path) -> tuple[subprocess.Popen, list[str]]:
    extra = list(args.server_args)
    if args.server == "vlmc":
        cmd = [args.vlmc]
        if args.model:
            cmd.append(args.model)
        cmd = cmd[:1] + ["serve"] + cmd[1:] + ["--host", "127.0.0.1", "--port", str(port),
                                               "--max-batch-size", str(args.max_batch_size)] + extra
        if args.media_dir is not None:
            cmd += ["--allowed-local-media-path", str(args.media_dir)]
    else:
        if not args.model:
            raise SystemExit("serve_load: --server mlx-vlm needs MODEL (a checkpoint folder or hub id)")
        cmd = [args.mlx_vlm_python, "-m", "mlx_vlm.server", "--model", args.model,
               "--host", "127.0.0.1", "--port", str(port)] + extra
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, cmd


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)     # its own session: only the server and its children
    except ProcessLookupError:
        return
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wait_health(ep: Endpoint, proc: subprocess.Popen | None, timeout: float, server: str | None) -> dict[str, Any]:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was healthy")
        try:
            status, body = ep.get_json("/health")
            last = (status, body)
            if status == 200:
                # mlx-vlm answers /health before its preloaded model is in; vlmc loads before it listens
                if server == "mlx-vlm" and isinstance(body, dict) and not body.get("loaded_model"):
                    pass
                else:
                    return body if isinstance(body, dict) else {"body": body}
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s (last /health: {last})")


def served_model_id(ep: Endpoint, health: dict[str, Any]) -> str:
    for key in ("loaded_model", "model"):
        if isinstance(health.get(key), str) and health[key]:
            return health[key]
    status, body = ep.get_json("/v1/models")
    if status == 200 and isinstance(body, dict) and body.get("data"):
        loaded = [m for m in body["data"] if m.get("loaded")]
        return (loaded or body["data"])[0]["id"]
    raise RuntimeError("cannot tell the served model id: pass --model-id")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ====================================================================== report
def fmt(x, nd=1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def print_table(report: dict[str, Any]) -> None:
    rows = report["levels"]
    print(f"\n{report['server_label']}  model={report['model_id']}  max_tokens={report['max_tokens']}")
    head = ["C", "reqs", "err", "wall s", "tok/s", "x C1", "req/s", "TTFT p50 ms", "TTFT p99 ms",
            "e2e p50 ms", "e2e p99 ms", "tok/req", "early", "RSS MB"]
    lines = [head]
    for r in rows:
        lines.append([str(r["concurrency"]), str(r["requests"]), str(r["errors"]), fmt(r["wall_s"], 2),
                      fmt(r["tok_s"], 2), fmt(r.get("ratio_vs_base"), 2), fmt(r["req_s"], 3),
                      fmt(r["ttft_p50_ms"], 0), fmt(r["ttft_p99_ms"], 0), fmt(r["e2e_p50_ms"], 0),
                      fmt(r["e2e_p99_ms"], 0), fmt(r["completion_tokens_mean"], 1), str(r["stopped_early"]),
                      fmt(r["server_rss_peak_mb"], 0)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for i, line in enumerate(lines):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    base = report.get("ratio_base_concurrency")
    if base is not None and base != 1:
        print(f"(x C1 is over the lowest level measured, C={base})")
    for r in rows:
        if r["stopped_early"]:
            print(f"C={r['concurrency']}: {r['stopped_early']} request(s) stopped before max_tokens "
                  f"(tokens min {r['completion_tokens_min']}, mean {r['completion_tokens_mean']}): "
                  "their tok/s is not comparable")
        if r["no_content"]:
            print(f"C={r['concurrency']}: {r['no_content']} request(s) streamed no non-empty content (no TTFT)")
        for e in r["error_samples"]:
            print(f"C={r['concurrency']} error: {e}")


# ====================================================================== padded tokenizer copy
def make_padded_copy(src: str, dst: str, vocab_size: int | None = None) -> None:
    """DST = SRC with every file symlinked except ``tokenizer.json``, whose BPE vocabulary is padded
    with made-up words (" ab", " ac", ...) up to the model's vocab size.

    Random-weight benchmark checkpoints keep the real ``vocab_size`` (151936 for Qwen2-VL)
    but carry the test suite's small tokenizer (488 entries), and their greedy tokens are
    almost all ids past it: vlmc decodes those to "" (so a stream carries no content and no
    TTFT can be seen) and mlx-vlm's streaming detokenizer raises IndexError. With every id
    decodable, each token streams a non-empty delta, as with a real tokenizer of that size.
    Encoding is unchanged (no merges reach the new entries)."""
    src_p, dst_p = Path(src).resolve(), Path(dst)
    if vocab_size is None:
        cfg = json.loads((src_p / "config.json").read_text()) if (src_p / "config.json").exists() else {}
        vocab_size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
        if not vocab_size:
            raise SystemExit("serve_load: no config.json vocab_size in SRC: pass --pad-vocab N")
    dst_p.mkdir(parents=True, exist_ok=True)
    for f in src_p.iterdir():
        if f.name != "tokenizer.json" and not (dst_p / f.name).exists():
            (dst_p / f.name).symlink_to(f)
    tok = json.loads((src_p / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    # tokenizers gives an added token that is not in the model's vocabulary the next free id
    # after the vocabulary, whatever the file says: enter each in the vocabulary at its id
    for a in tok.get("added_tokens", []):
        vocab.setdefault(a["content"], a["id"])
    used_ids = set(vocab.values()) | {a["id"] for a in tok.get("added_tokens", [])}
    used_strs = set(vocab) | {a["content"] for a in tok.get("added_tokens", [])}

    def words():
        letters = "abcdefghijklmnopqrstuvwxyz"
        frontier = [""]
        while True:
            frontier = [w + c for w in frontier for c in letters]
            for w in frontier:
                if len(w) >= 2:
                    yield "\u0120" + w       # byte-level BPE's space: decodes to " " + w
    gen = words()
    added = 0
    for i in range(vocab_size):
        if i in used_ids:
            continue
        w = next(gen)
        while w in used_strs:
            w = next(gen)
        vocab[w] = i
        added += 1
    (dst_p / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    print(f"serve_load: {dst_p}: tokenizer padded with {added} entries to {vocab_size} ids; "
          f"other files link to {src_p}", file=sys.stderr)


# ====================================================================== main
def parse_args(argv: list[str]) -> argparse.Namespace:
    if argv[:1] == ["--make-padded-copy"]:
        p = argparse.ArgumentParser(prog="serve_load.py --make-padded-copy")
        p.add_argument("src")
        p.add_argument("dst")
        p.add_argument("--pad-vocab", type=int, default=None, help="default: config.json vocab_size of SRC")
        a = p.parse_args(argv[1:])
        make_padded_copy(a.src, a.dst, a.pad_vocab)
        raise SystemExit(0)
    server_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, server_args = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Arguments after -- go to the server command line.")
    p.add_argument("model", nargs="?", default=None,
                   help="checkpoint / artifact for the started server (vlmc: none = bundled demo model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--server", choices=["vlmc", "mlx-vlm"], help="start this server")
    src.add_argument("--url", help="use a running server, e.g. http://127.0.0.1:8080")
    p.add_argument("--model-id", help="the 'model' field of the requests (default: asked from the server)")
    p.add_argument("--port", type=int, default=0, help="port for the started server (default: a free one)")
    p.add_argument("--levels", default="1,4,8,16", help="concurrency levels (default 1,4,8,16)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per level (default max(REQUESTS_FACTOR*C, MIN_REQUESTS))")
    p.add_argument("--requests-factor", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--fixed-length", action="store_true",
                   help="send min_tokens = max_tokens (vlmc, vLLM) so every reply has exactly max_tokens")
    p.add_argument("--check-serial", action="store_true",
                   help="after the levels, send the highest level's requests again one at a time and check "
                        "that every reply's text is the same (greedy decoding: batching must not change outputs)")
    p.add_argument("--image-every", type=int, default=2,
                   help="every Nth request carries an image (0: text only; default 2 = half)")
    p.add_argument("--same-images", action="store_true",
                   help="send the example PNGs unchanged (vision feature caches may answer them)")
    p.add_argument("--images", default=str(REPO / "examples" / "shapes-*.png"), help="glob of PNGs")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--warmup-max-tokens", type=int, default=4,
                   help="max_tokens of the warm-up request (default 4: enough to run every kernel once)")
    p.add_argument("--max-batch-size", type=int, default=16, help="vlmc serve --max-batch-size (default 16)")
    p.add_argument("--vlmc", default=DEFAULT_VLMC, help=f"vlmc executable (default {DEFAULT_VLMC})")
    p.add_argument("--mlx-vlm-python", default=os.environ.get("MLX_VLM_PYTHON", DEFAULT_MLX_VLM_PYTHON),
                   help="python of the mlx-vlm venv (default $MLX_VLM_PYTHON or /tmp/mlxvlm-venv/bin/python)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for /health")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per request")
    p.add_argument("--server-log", default=None, help="server output (default /tmp/serve_load-SERVER-PORT.log)")
    p.add_argument("--label", default=None, help="name of this run in the table and the JSON")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--per-request", action="store_true", help="keep every request's timings in the JSON")
    p.add_argument("--hostile", type=float, default=None, metavar="SECONDS",
                   help="normal traffic alone, then beside hostile traffic, this long each (instead of --levels)")
    p.add_argument("--hostile-normal", type=int, default=4, help="normal workers in --hostile mode")
    p.add_argument("--hostile-workers", type=int, default=2, help="hostile workers in --hostile mode")
    p.add_argument("--hostile-pause", type=float, default=0.25, help="seconds between a hostile worker's requests")
    p.add_argument("--hang-after", type=float, default=60.0, help="a request unanswered this long is a hang")
    args = p.parse_args(argv)
    args.server_args = server_args
    args.levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if not args.levels or min(args.levels) < 1:
        p.error("--levels must be positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    images = [Path(x) for x in sorted(glob.glob(args.images))]
    if args.image_every and not images:
        print(f"serve_load: no images match {args.images}: text-only requests", file=sys.stderr)

    proc, cmd, log_path = None, None, None
    args.media_dir = None
    if args.hostile and args.server == "vlmc":
        import tempfile
        args.media_dir = Path(tempfile.mkdtemp(prefix="serve_load-media-"))
        os.mkfifo(args.media_dir / "pipe.png")
    if args.server:
        port = args.port or free_port()
        log_path = Path(args.server_log or f"/tmp/serve_load-{args.server}-{port}.log")
        proc, cmd = start_server(args, port, log_path)
        print(f"serve_load: started pid {proc.pid}: {shlex.join(cmd)}  (log {log_path})", file=sys.stderr)
        ep = Endpoint(f"http://127.0.0.1:{port}", args.api_key)
    else:
        ep = Endpoint(args.url, args.api_key)
    rss = RssSampler(proc.pid if proc else None)
    report: dict[str, Any] = {
        "server": args.server or "url", "server_label": args.label or (args.server or args.url),
        "server_command": shlex.join(cmd) if cmd else None, "url": None if proc else args.url,
        "model": args.model, "max_tokens": args.max_tokens, "fixed_length": args.fixed_length,
        "image_every": args.image_every,
        "unique_images": not args.same_images, "images": [p.name for p in images],
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else None,
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "levels": [],
    }
    failed = 0
    try:
        t_start = time.perf_counter()
        try:
            health = wait_health(ep, proc, args.start_timeout, args.server)
        except RuntimeError as e:
            print(f"serve_load: {e}", file=sys.stderr)
            if log_path:
                print(f"--- last lines of {log_path}:\n{tail(log_path)}", file=sys.stderr)
            report["error"] = str(e)
            if log_path:
                report["server_log_tail"] = tail(log_path)
            _write(args.out, report)
            return 2
        report["startup_s"] = round(time.perf_counter() - t_start, 2)
        report["health"] = health
        model_id = args.model_id or served_model_id(ep, health)
        report["model_id"] = model_id
        report["server_rss_after_start_mb"] = None if proc is None else round(rss.now() / 2**20, 1)
        print(f"serve_load: healthy after {report['startup_s']} s, model id {model_id!r}", file=sys.stderr)
        maker = RequestMaker(model_id, args.max_tokens, args.image_every, not args.same_images, images,
                             args.fixed_length)

        next_id = 0
        if not args.no_warmup:
            wid = args.image_every - 1 if args.image_every > 0 and images else 0
            body = maker.body(wid)
            body["max_tokens"] = args.warmup_max_tokens
            if "min_tokens" in body:
                body["min_tokens"] = args.warmup_max_tokens
            rec = stream_chat(ep, body, args.timeout)
            next_id = max(next_id, wid + 1)
            report["warmup"] = {k: rec[k] for k in ("ok", "error", "ttft_s", "e2e_s", "completion_tokens",
                                                    "prompt_tokens", "finish_reason")}
            print(f"serve_load: warm-up ({'image' if maker.has_image(wid) else 'text'}) "
                  f"{'ok' if rec['ok'] else 'FAILED: ' + str(rec['error'])} in {fmt(rec['e2e_s'], 2)} s, "
                  f"{rec['completion_tokens']} tokens, finish {rec['finish_reason']}", file=sys.stderr)
            if not rec["ok"]:
                failed += 1
        report["server_rss_after_warmup_mb"] = None if proc is None else round(rss.now() / 2**20, 1)

        if args.hostile:
            report["hostile"] = hostile_run(args, ep, maker, rss, args.media_dir)
            for ph in report["hostile"].values():
                if isinstance(ph, dict):
                    failed += ph["normal_failed"] + ph["normal_5xx"] + ph["hostile_5xx"] + ph["hostile_hung"]
            args.levels = []
        for c in args.levels:
            n = args.requests or max(args.requests_factor * c, args.min_requests)
            # keep the image/text alternation of each level the same whatever next_id is
            if args.image_every > 1:
                next_id += (-next_id) % args.image_every
            print(f"serve_load: level C={c}: {n} requests ...", file=sys.stderr, flush=True)
            row = run_level(ep, maker, c, n, next_id, args.timeout, rss)
            next_id += n
            report["levels"].append(row)
            failed += row["errors"]
            print(f"serve_load:   {row['tok_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms, "
                  f"{row['errors']} errors, {row['stopped_early']} early, wall {row['wall_s']} s",
                  file=sys.stderr, flush=True)
            if proc is not None and proc.poll() is not None:
                print(f"serve_load: the server exited ({proc.returncode}) during C={c}", file=sys.stderr)
                report["server_exit"] = proc.returncode
                break
        if args.check_serial and report["levels"]:
            report["serial_check"] = serial_check(ep, maker, max(report["levels"], key=lambda r: r["concurrency"]),
                                                  args.timeout)
            failed += len(report["serial_check"]["differ"]) + report["serial_check"]["errors"]
        for row in report["levels"]:
            if not args.per_request:
                row.pop("per_request")
        base = next((r for r in report["levels"] if r["concurrency"] == 1), None)
        if base is None and report["levels"]:
            base = min(report["levels"], key=lambda r: r["concurrency"])
        report["ratio_base_concurrency"] = base["concurrency"] if base else None
        for r in report["levels"]:
            r["ratio_vs_base"] = round(r["tok_s"] / base["tok_s"], 3) if base and base["tok_s"] else None
        try:
            status, snap = ep.get_json("/metrics", timeout=10)
            if status == 200 and isinstance(snap, dict):
                report["server_metrics"] = snap
        except OSError:
            pass
        report["total_s"] = round(time.perf_counter() - t_start, 1)
        print_table(report)
        if failed:
            print(f"\nserve_load: {failed} request(s) failed", file=sys.stderr)
            if log_path:
                print(f"--- last lines of {log_path}:\n{tail(log_path, 20)}", file=sys.stderr)
    finally:
        rss.stop()
        if proc is not None:
            stop_server(proc)
            report["server_log_tail"] = tail(log_path, 15)
    report["failed_requests"] = failed
    _write(args.out, report)
    return 1 if failed else 0


def _write(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"serve_load: wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
