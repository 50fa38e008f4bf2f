"""llama.cpp as a benchmark peer: build its tools, convert a checkpoint to GGUF, run and parse them.

    python benchmarks/llamacpp.py build                       # once: ~/.cache/vlmc-bench/llama.cpp-<version>
    python benchmarks/llamacpp.py convert /tmp/ck2b --build BUILD --out /tmp/llamacpp/ck2b-gguf

``build`` downloads the ``llama-cpp-python`` source distribution with pip (it vendors
llama.cpp, with ``convert_hf_to_gguf.py`` and ``gguf-py``), and builds the tools the
comparison runs with cmake (Release, native CPU, static, nothing that needs the network):
llama-bench, llama-mtmd-cli, llama-batched-bench, llama-quantize. A finished build is
marked by ``BUILD/.complete`` and reused.

``convert`` writes, beside each other: the language model in bfloat16 (or ``--dtype f16``;
``--dtype q8_0`` for big checkpoints: see ``convert``), its Q4_K_M and Q8_0 quantizations
made with llama-quantize, and the vision projector (``mmproj``, f16) made with the
converter's ``--mmproj`` (``--no-mmproj`` skips it). The converter runs in an interpreter
that has its imports (numpy, torch, transformers, safetensors are enough for Qwen2-VL and
LLaVA; sentencepiece only where there is a tokenizer.model) with the vendored ``gguf-py``
first on its path, so the installed ``gguf`` package (if any) is not used.

The rest of this file times the tools for ``compare.py``'s llama.cpp worker (``measure``) and
parses what they print; the parsers are pure functions (``tests/test_llamacpp_parsers.py``).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

TOOLS = ("llama-bench", "llama-mtmd-cli", "llama-batched-bench", "llama-quantize")
PACKAGE = "llama-cpp-python"
QUANTS = ("Q4_K_M", "Q8_0")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(cmd: Sequence[str], log: Callable[[str], None] = _log, **kw: Any) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


# ====================================================================== build
def download_sdist(dest: Path, version: str | None, python: str = sys.executable) -> Path:
    """The llama-cpp-python source distribution (pip's ordinary client, no wheels, no deps)."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = f"{PACKAGE}=={version}" if version else PACKAGE
    _run([python, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec,
          "-d", dest])
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit(f"error: pip left no llama_cpp_python-*.tar.gz in {dest}")
    return found[-1]


def sdist_version(sdist: Path) -> str:
    m = re.match(r"llama_cpp_python-(.+)\.tar\.gz$", sdist.name)
    if not m:
        sys.exit(f"error: {sdist.name} is not a llama_cpp_python-<version>.tar.gz")
    return m.group(1)


def build(sdist: Path, out: Path, threads: int = 2, log: Callable[[str], None] = _log) -> Path:
    """Extract ``sdist`` into ``out/src`` and build the tools into ``out/bin``; reuse a finished build."""
    if (out / ".complete").is_file():
        log(f"llama.cpp build found: {out}")
        return out
    out.mkdir(parents=True, exist_ok=True)
    src = out / "src"
    if not (src / "CMakeLists.txt").is_file():
        with tempfile.TemporaryDirectory(dir=out) as tmp, tarfile.open(sdist) as tar:
            prefix = f"llama_cpp_python-{sdist_version(sdist)}/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            if not members:
                sys.exit(f"error: {sdist} holds no vendor/llama.cpp")
            tar.extractall(tmp, members=members, filter="data")
            shutil.rmtree(src, ignore_errors=True)
            Path(tmp, prefix).rename(src)
    bdir = out / "cmake-build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", src, "-B", bdir, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
          "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
          "-DGGML_CCACHE=OFF"], log)
    t = time.perf_counter()
    _run(["cmake", "--build", bdir, "--config", "Release", "-j", str(threads), "--target", *TOOLS], log)
    (out / "bin").mkdir(exist_ok=True)
    for tool in TOOLS:
        found = [p for p in (bdir / "bin" / tool, bdir / tool) if p.is_file()]
        if not found:
            sys.exit(f"error: the build made no {tool} (looked in {bdir / 'bin'})")
        shutil.copy2(found[0], out / "bin" / tool)
    (out / "version.json").write_text(json.dumps({"llama_cpp_python": sdist_version(sdist),
                                                  "build": tool_version(out), "build_s": time.perf_counter() - t}))
    (out / ".complete").write_text("")
    log(f"llama.cpp tools built in {time.perf_counter() - t:.0f} s: {out / 'bin'}")
    return out


def tool(build_dir: Path, name: str) -> Path:
    p = Path(build_dir) / "bin" / name
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing: build llama.cpp with `python benchmarks/llamacpp.py build`")
    return p


def tool_version(build_dir: Path) -> str | None:
    """What ``llama-bench --version`` says (e.g. "version: 1 (0c1e570)")."""
    try:
        r = subprocess.run([str(tool(build_dir, "llama-bench")), "--version"], capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version: .*", r.stdout + r.stderr)
    return m.group(0).strip() if m else None


def build_info(build_dir: Path) -> dict[str, Any]:
    """What ``build`` recorded (the llama-cpp-python version whose vendored tree it built)."""
    try:
        return json.loads((Path(build_dir) / "version.json").read_text())
    except (OSError, ValueError):
        return {"build": tool_version(build_dir)}


# ====================================================================== convert
# The pre-tokenizer regex of Qwen2's tokenizer.json, which llama.cpp implements as "qwen2".
QWEN2_PRETOKENIZER = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def split_regex(tokenizer_json: dict[str, Any]) -> str | None:
    """The Split pre-tokenizer's regex in a tokenizer.json (None: none there)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    for p in pre.get("pretokenizers", [pre]):
        if p.get("type") == "Split":
            return (p.get("pattern") or {}).get("Regex")
    return None


def run_converter(src: Path, argv: list[str]) -> None:
    """Run ``convert_hf_to_gguf.py`` in this process with two allowances for benchmark
    checkpoints, and nothing else changed:

    * their tokenizer is a small BPE trained for the tests, so the converter's hash of its
      output on a probe string matches no published model and it refuses ("BPE
      pre-tokenizer was not recognized"); when the tokenizer.json's Split regex is exactly
      Qwen2's, the name llama.cpp implements it under ("qwen2") is used;
    * Qwen2-VL's ``set_vocab`` imports sentencepiece before it looks for a tokenizer.model
      (when there is none it falls back to the BPE vocab): the file is looked for first, so
      a checkpoint without one converts where sentencepiece is not installed.
    """
    import runpy
    sys.path[:0] = [str(src / "gguf-py"), str(src)]
    from conversion import base  # type: ignore[import-not-found]
    original = base.TextModel.get_vocab_base_pre
    sentencepiece_vocab = base.TextModel._create_vocab_sentencepiece

    def create_vocab_sentencepiece(self: Any) -> Any:
        if not (Path(self.dir_model) / "tokenizer.model").is_file():
            raise FileNotFoundError(f"File not found: {Path(self.dir_model) / 'tokenizer.model'}")
        return sentencepiece_vocab(self)
    base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece

    def get_vocab_base_pre(self: Any, tokenizer: Any) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            tj = Path(self.dir_model) / "tokenizer.json"
            if tj.is_file() and split_regex(json.loads(tj.read_text())) == QWEN2_PRETOKENIZER:
                _log("pre-tokenizer hash not recognized; tokenizer.json's Split regex is Qwen2's: using 'qwen2'")
                return "qwen2"
            raise
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(src / "convert_hf_to_gguf.py"), *argv]
    runpy.run_path(str(src / "convert_hf_to_gguf.py"), run_name="__main__")


def convert(checkpoint: Path, out: Path, build_dir: Path, python: str = sys.executable, dtype: str = "bf16",
            quants: Sequence[str] = QUANTS, threads: int = 2, mmproj: bool = True,
            log: Callable[[str], None] = _log) -> dict[str, Path]:
    """Write ``model-<dtype>.gguf``, ``model-<quant>.gguf`` per quant and ``mmproj-f16.gguf``
    under ``out`` (each file kept once made; a partial one is written under a temporary name).

    ``dtype="q8_0"`` has the converter write Q8_0 itself (``model-Q8_0.gguf``, half the disk of
    bf16, for 7B checkpoints) and the other quants are made from it (``--allow-requantize``:
    a second rounding, which changes the values, not the bytes or the work per token)."""
    src = Path(build_dir) / "src"
    if not (src / "convert_hf_to_gguf.py").is_file():
        sys.exit(f"error: {src} holds no convert_hf_to_gguf.py")
    out.mkdir(parents=True, exist_ok=True)
    base = "Q8_0" if dtype == "q8_0" else dtype
    files = {base: out / f"model-{base}.gguf"}
    steps = [(base, dtype, [])]
    if mmproj:
        files["mmproj"] = out / "mmproj-f16.gguf"
        steps.append(("mmproj", "f16", ["--mmproj"]))
    for key, outtype, extra in steps:
        dst = files[key]
        if dst.is_file():
            continue
        part = dst.with_suffix(".part")
        t = time.perf_counter()
        _run([python, Path(__file__).resolve(), "run-converter", src, "--", checkpoint, "--outfile", part,
              "--outtype", outtype, *extra], log)
        produced = part if part.is_file() else next(iter(sorted(out.glob(f"*{part.name}*"))), None)
        if produced is None:
            sys.exit(f"error: the converter wrote no {part}")
        produced.rename(dst)
        log(f"  {dst} ({dst.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
    requant = ["--allow-requantize"] if base == "Q8_0" else []
    for q in quants:
        dst = files[q] = out / f"model-{q}.gguf"
        if dst.is_file():
            continue
        part = dst.with_suffix(".part")
        _run([tool(build_dir, "llama-quantize"), *requant, files[base], part, q, str(threads)], log)
        part.rename(dst)
    return files


# ====================================================================== run the tools
def run_tool(cmd: Sequence[Any], stdin: str | None = None, timeout: float = 3600,
             env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one tool to the end: its stdout, stderr, exit code, wall seconds and max RSS (of
    that process alone: ``os.wait4`` on its pid, not the children of the whole worker)."""
    import signal
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryFile("w+") as inp:
        if stdin is not None:
            inp.write(stdin)
            inp.seek(0)
        t = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdin=inp if stdin is not None else subprocess.DEVNULL,
                                stdout=out, stderr=err, env=env, start_new_session=True)
        deadline = t + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        seconds = time.perf_counter() - t
        out.seek(0)
        err.seek(0)
        rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {"cmd": [str(c) for c in cmd], "returncode": proc.returncode, "seconds": seconds,
                "max_rss_bytes": rss, "stdout": out.read(), "stderr": err.read(),
                "timed_out": time.perf_counter() > deadline}


def check(result: dict[str, Any], what: str) -> dict[str, Any]:
    if result["returncode"] != 0:
        tail = "\n".join((result["stdout"] + result["stderr"]).strip().splitlines()[-12:])
        raise RuntimeError(f"{what} failed (exit {result['returncode']}): {' '.join(result['cmd'])}\n{tail}")
    return result


def measure(spec: dict[str, Any], image_prompt: str) -> dict[str, Any]:
    """llama.cpp's own tools on a GGUF of the checkpoint (``build`` and ``convert`` make them),
    with the spec ``compare.py`` gives every worker: llama-bench for prefill (``-p N``) and
    decode (``-n D -d N``: D tokens after an N-token context; each after llama-bench's own
    warm-up run), llama-mtmd-cli in single-turn mode for the image request (one process per
    request: a warm-up with the small image, then ``image_runs`` requests; TTFT is read from
    its timestamped log, so the process's model loading is not in it), llama-batched-bench
    for the batched run. Max RSS is the largest of the tool processes' own."""
    build_dir, gguf, threads = Path(spec["llama_cpp_build"]), spec["gguf"], str(spec["threads"])
    n, d, runs = len(spec["ids"]), spec["decode_tokens"], spec["runs"]
    tools: dict[str, list[dict[str, float]]] = {}

    def median(xs: list[float]) -> float | None:
        return float(statistics.median(xs)) if xs else None

    def run(name: str, args: list[Any]) -> dict[str, Any]:
        r = run_tool([tool(build_dir, name), *args], timeout=spec["tool_timeout"])
        if spec.get("log_dir"):   # each tool's own output, kept beside the run's JSON
            stem = f"{spec['slug']}.{name}.{sum(map(len, tools.values()))}"
            (Path(spec["log_dir"]) / f"{stem}.stdout").write_text(r["stdout"])
            (Path(spec["log_dir"]) / f"{stem}.stderr").write_text(r["stderr"])
        check(r, name)
        tools.setdefault(name, []).append({"seconds": r["seconds"], "max_rss_bytes": r["max_rss_bytes"]})
        return r

    common = ["-m", gguf, "-t", threads]
    pp = parse_llama_bench(run("llama-bench", [*common, "-p", n, "-n", 0, "-r", runs, "-o", "json"])["stdout"])
    tg = parse_llama_bench(run("llama-bench", [*common, "-p", 0, "-n", d, "-d", n, "-r", runs, "-o",
                                               "json"])["stdout"])
    prompt_tps = median(pp[0]["samples_ts"]) or pp[0]["avg_ts"]
    decode_tps = median(tg[0]["samples_ts"]) or tg[0]["avg_ts"]
    out: dict[str, Any] = {"prompt_tokens": n, "decode_tokens": d, "prompt_tps": prompt_tps,
                           "ttft_ms": n / prompt_tps * 1e3, "decode_tps": decode_tps,
                           "text_samples": {"prefill_tps": pp[0]["samples_ts"], "decode_tps": tg[0]["samples_ts"]},
                           "llama_bench": {"prefill": pp[0], "decode": tg[0]}}
    if spec.get("image") and spec.get("mmproj"):
        image_args = [*common, "--mmproj", spec["mmproj"], "-c", spec["context"]]
        run("llama-mtmd-cli", [*image_args, *mtmd_args(spec["warmup_image"], image_prompt)])   # warm-up
        image_runs = [parse_mtmd(run("llama-mtmd-cli", [*image_args, *mtmd_args(spec["image"], image_prompt)])
                                 ["stdout"]) for _ in range(spec.get("image_runs", runs))]
        out.update(image_ttft_ms=median([t["ttft_ms"] for t in image_runs]),
                   image_vision_ms=median([t["vision_ms"] for t in image_runs if t["vision_ms"] is not None]),
                   image_prompt_tokens=image_runs[0]["prompt_tokens"], image_tokens=image_runs[0]["image_tokens"],
                   image_samples=image_runs)
    if spec.get("batch_ids"):
        b = len(spec["batch_ids"])
        rows = []
        for _ in range(runs):
            r = run("llama-batched-bench", [*common, "-c", spec["batch_context"], "-npp", n, "-ntg", d,
                                            "-npl", f"1,{b}", "--output-format", "jsonl"])
            rows.append({int(x["pl"]): x for x in parse_batched_bench(r["stdout"])})
        if any(b not in r for r in rows):
            raise RuntimeError(f"llama-batched-bench printed no row for {b} sequences")
        pick = lambda key, pl=b: median([r[pl][key] for r in rows if pl in r])  # noqa: E731
        out.update(batch=b, batch_prefill_tps=pick("speed_pp"), batch_decode_tps=pick("speed_tg"),
                   batch_tps=pick("speed"), batch_t_pp_s=pick("t_pp"), batch_t_s=pick("t"),
                   batch_single_tps=pick("speed", 1), batch_single_decode_tps=pick("speed_tg", 1),
                   batch_samples=rows)
    info = build_info(build_dir)
    out.update(framework="llama.cpp", version=info.get("llama_cpp_python"), build=info.get("build"),
               gguf=str(gguf), mmproj=spec.get("mmproj"),
               dtype=spec.get("quant"), threads=int(threads), tools=tools, load_s=None,
               max_rss_bytes=max(x["max_rss_bytes"] for v in tools.values() for x in v))
    return out


# ====================================================================== parse what they print
def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """``llama-bench -o json``: one entry per test with its token counts and per-repetition
    tokens/s (``samples_ts``)."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON array in llama-bench's output")
    rows = json.loads(text[start:text.rindex("]") + 1])
    return [{"n_prompt": int(r["n_prompt"]), "n_gen": int(r["n_gen"]), "n_depth": int(r.get("n_depth", 0)),
             "avg_ts": float(r["avg_ts"]), "samples_ts": [float(x) for x in r.get("samples_ts", [])],
             "n_threads": r.get("n_threads"), "type_k": r.get("type_k"), "flash_attn": r.get("flash_attn"),
             "model_type": r.get("model_type"), "model_size": r.get("model_size"),
             "build_commit": r.get("build_commit")} for r in rows]


def parse_batched_bench(text: str) -> list[dict[str, Any]]:
    """``llama-batched-bench --output-format jsonl``: one row per (pp, tg, pl): prompt
    processing (all sequences' prompts), text generation (``tg`` steps of ``pl`` tokens)
    and the total, each as seconds and tokens/s."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            rows.append(json.loads(line))
    return rows


def _log_records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "time" in rec:
                out.append(rec)
    return out


def mtmd_args(image: str, text: str) -> list[str]:
    """One image request for ``llama-mtmd-cli`` in single-turn mode, logging every line as
    JSON with its time in microseconds (``parse_mtmd``). Each request is its own process:
    in chat mode a second image in one session aborts (``GGML_ASSERT(offset <=
    batch->output_embd.size())`` in ``mtmd_batch_get_output_embd``: the previous turn's
    media batch is searched for the new image)."""
    return ["--image", image, "-p", text, "-n", "1", "--temp", "0", "--log-jsonl", "--log-timestamps", "-lv", "4"]


def parse_mtmd(text: str) -> dict[str, Any]:
    """TTFT, vision time and prompt length of one ``mtmd_args`` run, from its log.

    In single-turn mode llama-mtmd-cli prints its "experimental CLI" warning, then reads
    and decodes the image file, evaluates the message (chat template, tokenize, image
    preprocess, "encoding mtmd batch" ... "mtmd batch encoding done" around the vision
    encoder + projector, then the image embeddings and text through the LM), prints "\\n",
    samples and prints the first piece. TTFT runs from the second warning line (so it
    includes reading the PNG, a few ms) to that piece; vision is the time between the two
    encoding lines; prompt tokens are what ``llama_perf_context_print`` counts as prompt eval
    and image tokens what the image's decode batches held (both logged at ``-lv 4``)."""
    recs = _log_records(text)
    t0 = t_enc = t_done = first = None
    n_prompt = n_image = None
    newline_seen = False
    for r in recs:
        msg, level = str(r.get("msg", "")), str(r.get("level", ""))
        if t0 is None:
            if level == "warn" and "For normal use cases" in msg:
                t0 = r["time"]
            continue
        if "encoding mtmd batch" in msg and t_enc is None:
            t_enc = r["time"]
        elif "mtmd batch encoding done" in msg:
            t_done = r["time"]
        elif level == "none" and first is None:
            if newline_seen:
                first = r["time"]
            elif msg == "\n" and t_done is not None:
                newline_seen = True
        m = re.search(r"prompt eval time =\s*[\d.]+ ms /\s*(\d+) tokens", msg)
        if m:
            n_prompt = int(m.group(1))
        m = re.search(r"decoding image batch \d+/\d+, n_tokens_batch = (\d+)", msg)
        if m:
            n_image = (n_image or 0) + int(m.group(1))
    if t0 is None or first is None:
        raise ValueError("llama-mtmd-cli's log has no first token after its start marker")
    return {"ttft_ms": (first - t0) / 1e3, "vision_ms": (t_done - t_enc) / 1e3 if t_enc and t_done else None,
            "prompt_tokens": n_prompt, "image_tokens": n_image}


# ====================================================================== CLI
def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmc-bench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="Download the llama-cpp-python sdist and build the tools (once).")
    b.add_argument("--sdist", type=Path, default=None,
                   help="A llama_cpp_python-<version>.tar.gz (default: pip download).")
    b.add_argument("--version", default=None, help="llama-cpp-python version to download (default: the newest).")
    b.add_argument("--out", type=Path, default=None,
                   help="Build folder (default: ~/.cache/vlmc-bench/llama.cpp-<version>).")
    b.add_argument("--threads", type=int, default=2, help="Parallel compile jobs (default 2).")
    c = sub.add_parser("convert", help="Checkpoint -> GGUF (bf16/f16, Q4_K_M, Q8_0) + mmproj (f16).")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--build", type=Path, required=True, help="A folder `build` made.")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--python", default=sys.executable, help="Interpreter for convert_hf_to_gguf.py (default: this).")
    c.add_argument("--dtype", default="bf16", choices=("bf16", "f16", "f32", "q8_0"),
                   help="What the converter writes, which the quants are made from (default bf16).")
    c.add_argument("--no-mmproj", action="store_true", help="Skip the vision projector (text timings only).")
    c.add_argument("--quant", action="append", default=None,
                   help=f"llama-quantize types (default: {', '.join(QUANTS)}).")
    r = sub.add_parser("run-converter", help=argparse.SUPPRESS)
    r.add_argument("src", type=Path)
    r.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.cmd == "run-converter":
        run_converter(a.src, a.args[1:] if a.args[:1] == ["--"] else a.args)
    elif a.cmd == "build":
        sdist = a.sdist
        if sdist is None:
            sdist = download_sdist(default_cache() / "sdist", a.version)
        out = a.out or default_cache() / f"llama.cpp-{sdist_version(sdist)}"
        print(build(sdist.resolve(), out.expanduser().resolve(), a.threads))
    else:
        files = convert(a.checkpoint.resolve(), a.out.resolve(), a.build.resolve(), a.python, a.dtype,
                        a.quant or QUANTS, mmproj=not a.no_mmproj)
        for k, v in files.items():
            print(f"{k}\t{v}")


if __name__ == "__main__":
    main()
