"""User errors through the real CLI: one ``error:`` line on stderr, exit 1, no traceback,
and nothing half-written.

Every case runs ``python -m vlmc.cli`` in a subprocess (with ``VLMC_CACHE`` in a temp
folder), on a tiny qwen2_vl checkpoint that is built once and broken in one way per test.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

try:  # `python -m pytest` from the repo root puts the root on sys.path
    from tests.fixtures import checkpoints as ck
except ImportError:  # plain `pytest` (rootdir/tests on sys.path)
    from fixtures import checkpoints as ck

REPO = Path(__file__).resolve().parents[1]
WEIGHT = "model.layers.1.mlp.down_proj.weight"  # a tensor of the qwen2_vl fixture (saved naming)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    e = dict(os.environ)
    e["VLMC_CACHE"] = str(tmp_path_factory.mktemp("vlmc-cache"))
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        e.pop(var, None)  # the image server is on loopback
    e["NO_PROXY"] = e["no_proxy"] = "127.0.0.1,localhost"
    return e


def vlmc(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmc.cli", *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def error_line(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert the user-error contract and return the one error line."""
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    line = lines[0]
    assert line.startswith("error: "), line
    assert len(line) > len("error: ") + 10, line
    for needle in needles:
        assert needle.lower() in line.lower(), (needle, line)
    return line


def assert_nothing_written(out: Path) -> None:
    """A failed compile leaves neither OUT nor a temp folder beside it."""
    assert not out.exists(), sorted(p.name for p in out.iterdir()) if out.is_dir() else out
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def png_bytes(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    ck.make_test_image(w, h).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "qwen2_vl"
    ck.build_checkpoint(d, "qwen2_vl")
    return d


@pytest.fixture(scope="module")
def artifact(ckpt, env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "qwen2_vl.vlmc"
    res = vlmc(env, "compile", ckpt, "-o", out)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture
def broken(ckpt, tmp_path) -> Path:
    """A private copy of the checkpoint for a test to break."""
    d = tmp_path / "broken"
    shutil.copytree(ckpt, d)
    return d


def _rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = safetensors_numpy.load_file(str(path))
    edit(tensors)
    safetensors_numpy.save_file(tensors, str(path))


# ----------------------------------------------------------------------------- sources


def test_missing_path(env, tmp_path):
    out = tmp_path / "out"
    res = vlmc(env, "compile", tmp_path / "no-such-model", "-o", out)
    error_line(res, "no such checkpoint folder", "no-such-model")
    assert_nothing_written(out)


def test_folder_without_config(env, tmp_path):
    src = tmp_path / "empty-model"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"")
    error_line(vlmc(env, "compile", src, "-o", tmp_path / "out"), "no config.json", str(src))
    assert_nothing_written(tmp_path / "out")


def test_file_instead_of_folder(env, ckpt, tmp_path):
    error_line(vlmc(env, "compile", ckpt / "config.json", "-o", tmp_path / "out"), "is a file", "folder")
    assert_nothing_written(tmp_path / "out")


def test_unsupported_model_type(env, broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (broken / "config.json").write_text(json.dumps(cfg))
    line = error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "gpt2", "not supported")
    from vlmc.models import supported_model_types
    assert "llava" in supported_model_types() and ", ".join(supported_model_types()) in line
    assert_nothing_written(tmp_path / "out")


def test_config_not_json(env, broken, tmp_path):
    (broken / "config.json").write_text('{"model_type": "qwen2_vl", ')
    error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "config.json", "not valid JSON")
    assert_nothing_written(tmp_path / "out")


def test_config_missing_required_field(env, broken, tmp_path):
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["text_config"]["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(cfg))
    error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "num_hidden_layers")
    assert_nothing_written(tmp_path / "out")


# ----------------------------------------------------------------------------- weights


def test_truncated_safetensors(env, broken, tmp_path):
    path = broken / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "model.safetensors", "truncated")
    assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("damage", ["garbage", "not-an-object", "entry-without-offsets"])
def test_corrupt_safetensors_header(env, broken, tmp_path, damage):
    path = broken / "model.safetensors"
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    if damage == "garbage":
        data[8:40] = b"#" * 32
    else:
        header = json.loads(data[8:8 + n])
        if damage == "not-an-object":
            new = json.dumps(list(header), separators=(",", ":"))
        else:
            del header[WEIGHT]["data_offsets"]
            new = json.dumps(header, separators=(",", ":"))
        assert len(new) <= n
        data[8:8 + n] = new.encode().ljust(n)  # same length: the tensor bytes stay where they were
    path.write_bytes(bytes(data))
    error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "model.safetensors", "corrupt")
    assert_nothing_written(tmp_path / "out")


def test_missing_weight(env, broken, tmp_path):
    _rewrite_weights(broken, lambda t: t.pop(WEIGHT))
    error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "missing weight", "layers.1.mlp.down_proj")
    assert_nothing_written(tmp_path / "out")


def test_misshaped_weight(env, broken, tmp_path):
    import numpy as np

    def edit(t):
        w = t[WEIGHT]
        t[WEIGHT] = np.zeros((w.shape[0], w.shape[1] + 1), w.dtype)

    _rewrite_weights(broken, edit)
    line = error_line(vlmc(env, "compile", broken, "-o", tmp_path / "out"), "layers.1.mlp.down_proj", "shape")
    assert "[64, 129]" in line and "expected [64, 128]" in line
    assert_nothing_written(tmp_path / "out")


def test_weight_errors_also_reach_run_and_inspect(env, broken):
    _rewrite_weights(broken, lambda t: t.pop(WEIGHT))
    error_line(vlmc(env, "run", broken, "-p", "hi"), "missing weight")
    error_line(vlmc(env, "inspect", broken), "missing weight")
    cached = Path(env["VLMC_CACHE"]) / "artifacts"
    assert not cached.exists() or not any(p.name.startswith(".") for p in cached.iterdir())


# ----------------------------------------------------------------------------- output folder


def test_compile_refuses_foreign_folder(env, ckpt, tmp_path):
    out = tmp_path / "my-notes"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    (out / "manifest.json").write_text('{"name": "some other tool"}')  # not a vlmc manifest
    before = tree_digest(out)
    error_line(vlmc(env, "compile", ckpt, "-o", out), str(out), "not a vlmc artifact", "refusing")
    assert tree_digest(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".my-notes.")]


def test_compile_refuses_file_as_output(env, ckpt, tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text("precious")
    error_line(vlmc(env, "compile", ckpt, "-o", out), str(out), "is a file")
    assert out.read_text() == "precious"
    error_line(vlmc(env, "compile", ckpt, "-o", out / "sub"), "cannot create")
    assert out.read_text() == "precious"


_SLOW_WRITER = r"""
import os, sys, time
from pathlib import Path
from vlmc.backends import safetensors_io

_write = safetensors_io.ShardWriter.write

def write_then_stall(self, name, data):
    _write(self, name, data)
    Path(os.environ["VLMC_TEST_WRITING"]).touch()   # the test kills us from here on
    time.sleep(120)

safetensors_io.ShardWriter.write = write_then_stall
from vlmc.cli import main
sys.argv[0] = "vlmc"
main()
"""


def _kill_mid_write(env, ckpt, out: Path, tmp_path: Path) -> None:
    """Start ``vlmc compile`` whose weight writing stalls after the first tensor, and
    SIGKILL it once that tensor is on disk (so the kill lands mid-write, every time)."""
    flag = tmp_path / f"writing-{out.name}"
    e = dict(env, VLMC_TEST_WRITING=str(flag))
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, "compile", str(ckpt), "-o", str(out)],
                            env=e, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "compile never started writing"
            time.sleep(0.02)
        partial = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial-")]
        assert partial and any(partial[0].glob("weights-*.safetensors")), "not mid-write"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_killed_compile_leaves_no_artifact(env, ckpt, tmp_path):
    out = tmp_path / "model.vlmc"
    _kill_mid_write(env, ckpt, out, tmp_path)
    assert not out.exists()
    error_line(vlmc(env, "run", out, "-p", "hi"), "no such", str(out))
    # The temp folder it was writing is not an artifact, and says what happened.
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".model.vlmc.partial-")]
    assert len(partial) == 1 and not (partial[0] / "manifest.json").exists()
    error_line(vlmc(env, "run", partial[0], "-p", "hi"), "unfinished vlmc artifact", "compile again")
    error_line(vlmc(env, "inspect", partial[0]), "unfinished vlmc artifact")
    # Compiling again works despite the leftover.
    res = vlmc(env, "compile", ckpt, "-o", out)
    assert res.returncode == 0, res.stderr
    assert vlmc(env, "run", out, "-p", "hi", "--max-tokens", "2").returncode == 0


def test_killed_recompile_keeps_the_old_artifact(env, ckpt, tmp_path):
    out = tmp_path / "model.vlmc"
    assert vlmc(env, "compile", ckpt, "-o", out).returncode == 0
    before = tree_digest(out)
    _kill_mid_write(env, ckpt, out, tmp_path)
    assert tree_digest(out) == before
    res = vlmc(env, "run", out, "-p", "hi", "--max-tokens", "2")
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------- run inputs


def test_corrupt_image_file(env, artifact, tmp_path):
    img = tmp_path / "photo.png"
    img.write_bytes(b"this is not a picture at all" * 10)
    error_line(vlmc(env, "run", artifact, "-p", "Describe.", "--image", img), "cannot decode image", str(img))


def test_truncated_png(env, artifact, tmp_path):
    data = png_bytes()
    img = tmp_path / "cut.png"
    img.write_bytes(data[: len(data) // 2])
    error_line(vlmc(env, "run", artifact, "-p", "Describe.", "--image", img), "truncated", str(img))


def test_nonexistent_image(env, artifact, tmp_path):
    img = tmp_path / "nowhere.jpg"
    error_line(vlmc(env, "run", artifact, "-p", "Describe.", "--image", img), "not found", str(img))


def test_bad_image_leaves_artifact_usable(env, artifact, tmp_path):
    before = tree_digest(artifact)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    error_line(vlmc(env, "run", artifact, "-p", "Describe.", "--image", bad), str(bad))
    assert tree_digest(artifact) == before
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes())
    res = vlmc(env, "run", artifact, "-p", "Describe.", "--image", good, "--max-tokens", "3")
    assert res.returncode == 0, res.stderr
    assert "error" not in res.stderr


class _ImageServer:
    """Loopback HTTP server: /missing.png -> 404, /slow.png -> never answers in time."""

    def __init__(self):
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path == "/slow.png":
                    release.wait(60)  # longer than vlmc's image timeout
                    return
                self.send_error(404, "Not Found")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def image_server():
    server = _ImageServer()
    yield server
    server.close()


def test_image_url_404(env, artifact, image_server):
    url = f"{image_server.url}/missing.png"
    error_line(vlmc(env, "run", artifact, "-p", "Describe.", "--image", url), "cannot fetch image", url, "404")


def test_image_url_timeout(env, artifact, image_server):
    # vlmc's image timeout is 10 s (runtime.images.load_image); the server never answers.
    url = f"{image_server.url}/slow.png"
    t0 = time.monotonic()
    res = vlmc(env, "run", artifact, "-p", "Describe.", "--image", url)
    elapsed = time.monotonic() - t0
    error_line(res, "cannot fetch image", url, "timed out")
    assert elapsed < 30, elapsed


def test_prompt_longer_than_context(env, ckpt, tmp_path):
    small = tmp_path / "short-context"
    shutil.copytree(ckpt, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 64
    (small / "config.json").write_text(json.dumps(cfg))
    art = tmp_path / "short.vlmc"
    assert vlmc(env, "compile", small, "-o", art).returncode == 0
    res = vlmc(env, "run", art, "-p", "tell me about the river " * 20)
    error_line(res, "prompt is", "context is 64 tokens")
    assert res.stdout.strip() == ""


def test_artifact_from_an_older_format_asks_for_a_recompile(env, artifact, tmp_path):
    """Each format changed what the runtime reads (format 3: the family's inputs in
    meta["inputs"]): an artifact written in an older one is refused with one line saying to
    recompile, not run with the new runtime."""
    import json
    import shutil
    from vlmc.artifact_format import FORMAT_VERSION
    old = tmp_path / "old.vlmc"
    shutil.copytree(artifact, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION - 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    error_line(vlmc(env, "run", old, "-p", "hi", "--max-tokens", "2"), f"format {FORMAT_VERSION - 1}",
               f"format {FORMAT_VERSION}", "recompile")
