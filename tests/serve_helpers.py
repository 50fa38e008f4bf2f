"""A live ``vlmc serve`` on 127.0.0.1 for the server tests, and small HTTP helpers."""
from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, *args: str, key: str | None = None, timeout: float = 120):
        self.port = free_port()
        self.key = key
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from vlmc.cli import main; main()", "serve", "--port", str(self.port), *args]
        if key:
            cmd += ["--api-key", key]
        self.log = io.BytesIO()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.getvalue().decode(errors='replace')}")
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("server did not become healthy")

    def _drain(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 120) -> tuple[int, dict, bytes]:
        hdrs = {"Content-Type": "application/json"}
        if self.key:
            hdrs["Authorization"] = f"Bearer {self.key}"
        hdrs.update(headers or {})
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def get(self, path: str, **kw) -> tuple[int, dict, bytes]:
        return self.request("GET", path, **kw)

    def post(self, path: str, payload, **kw) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, _, raw = self.request("POST", path, body, **kw)
        return status, json.loads(raw) if raw else {}

    def metrics(self) -> dict:
        return json.loads(self.get("/metrics")[2])


def data_uri(path: Path | bytes, mime: str = "image/png") -> str:
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def image_message(question: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": question}]}]


class NotFoundServer:
    """A local HTTP server that answers 404 to everything (an image URL that does not exist)."""

    def __init__(self):
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                self.send_error(404)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/missing.png"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


class BlackHole:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (an image
    host that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, i: int = 0) -> str:
        return f"http://127.0.0.1:{self.port}/slow-{i}.png"

    def _accept(self):
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
                self.held.append(conn)
            except OSError:
                continue

    def stop(self):
        self._stop.set()
        for conn in self.held:
            conn.close()
        self.sock.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
