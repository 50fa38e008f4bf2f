"""vlmc vs mlx-vlm vs transformers vs llama.cpp on one checkpoint: same prompt ids, same image, fixed token counts.

    python benchmarks/compare_llamacpp.py /tmp/bench/qwen2vl-2b \\
        --vlmc-artifact /tmp/bench/art-bf16 --vlmc-artifact /tmp/bench/art-f32 \\
        --mlx-vlm-python /tmp/mlxvlm-venv/bin/python --prompt-tokens 64 --decode-tokens 8

llama.cpp joins with ``--llama-cpp-build`` and ``--llama-cpp-gguf`` (``llamacpp.py`` builds
its tools and converts the checkpoint); ``--batch N`` adds N sequences at once and
``--rounds R`` repeats everything R times in a rotated order (medians).

Each framework runs in its own subprocess (this file with ``--worker``), one after the
other, so each has a clean process, its own peak memory and the machine to itself; each
may use its own interpreter (mlx-vlm lives in a separate venv so its pins cannot move
ours). Every worker gets the same spec: the same prompt token ids (given as ids, no
tokenizer round trip), the same PNG, the same chat message for the image request.

Per framework: one untimed warm-up (the text prompt with 2 new tokens, then a 56x56 image
request: every kernel runs once and every weight is read in), then ``--runs`` timed runs
(medians reported) of

* text: ``prompt-tokens`` ids, then exactly ``decode-tokens`` + 1 greedy tokens, EOS never
  stops it (vlmc: ``generate_steps``, which leaves stopping to the caller; mlx-vlm: the
  processor's stopping criteria replaced by one that never fires; transformers:
  ``min_new_tokens = max_new_tokens``); the count is checked. TTFT = time to the first token;
  prompt tok/s = prompt tokens / TTFT; decode tok/s = decode-tokens / (last token - first).
* image: the chat template with one image + "Describe this image." through each framework's
  own processor, one token; TTFT from the decoded PIL image to the first token, and within
  that same request the vision tower's share (vlmc: ``encode_images`` wrapped to evaluate and
  time; mlx-vlm: ``model.vision_tower`` wrapped the same way; transformers: forward hooks).

Memory: MLX's peak (``mx.get_peak_memory`` after load, weights included) for the MLX
frameworks, and the process's max RSS (load included) for all three.

Checkpoints written with transformers' in-memory module names (``model.language_model.*``,
``model.visual.*``; what ``make_checkpoint.py`` writes today) are first copied once to
hub names (``model.*``, ``visual.*``: what published checkpoints and ``save_pretrained``
use; mlx-vlm only reads those) next to the original, and all three frameworks read that
copy. See ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# the checkpoint, prompt and timing helpers compare.py has (this script adds llama.cpp, batches
# and rounds of its own): one copy of each
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import (IMAGE_PROMPT, _checkpoint_dtype, _fmt, _image, _loadavg, _max_rss_bytes,  # noqa: E402
                     _median, _read_header, _text_timing, _vocab_size, _weight_files, hub_named_copy,
                     image_messages, prompt_ids)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def uses_module_names(ckpt: Path) -> bool:
    for f in _weight_files(ckpt):
        header, _ = _read_header(f)
        if any(k.startswith(("model.language_model.", "model.visual.", "model.vision_tower.")) for k in header):
            return True
    return False


def _summarize(text_runs: list[dict[str, float]], image_runs: list[dict[str, Any]], spec: dict[str, Any]) -> dict:
    n, d = len(spec["ids"]), spec["decode_tokens"]
    ttft = _median([r["ttft_s"] for r in text_runs])
    dec = _median([r["decode_s"] for r in text_runs])
    out = {"prompt_tokens": n, "decode_tokens": d, "ttft_ms": ttft * 1e3, "prompt_tps": n / ttft,
           "decode_tps": d / dec if dec else None, "text_samples": text_runs}
    if image_runs:
        out.update(image_ttft_ms=_median([r["ttft_ms"] for r in image_runs]),
                   image_vision_ms=_median([r["vision_ms"] for r in image_runs if r.get("vision_ms") is not None]),
                   image_prompt_tokens=image_runs[0]["prompt_tokens"], image_tokens=image_runs[0].get("image_tokens"),
                   image_samples=image_runs)
    return out


def worker_vlmc(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    import mlx.core as mx

    import vlmc
    from vlmc.bench import time_generation, time_image_request, weight_roofline
    from vlmc.runtime.artifact import cpu_widening
    from vlmc.runtime.engine import Prompt

    t = time.perf_counter()
    vlm = vlmc.load(spec["model"], dtype=spec["vlmc_dtype"])
    load_s = time.perf_counter() - t
    image = _image(spec, "image")
    prompt = Prompt(ids=list(spec["ids"]))
    time_generation(vlm, prompt, 2)                       # warm-up
    if image is not None:
        time_image_request(vlm, _image(spec, "warmup_image"))
    mx.reset_peak_memory()
    text_runs, image_runs = [], []
    for _ in range(spec["runs"]):
        tm = time_generation(vlm, prompt, spec["decode_tokens"] + 1)
        text_runs.append({"ttft_s": tm.ttft_s, "decode_s": tm.decode_s})
    for _ in range(spec["runs"] if image is not None else 0):
        r = time_image_request(vlm, image)
        image_runs.append({"ttft_ms": r["ttft_ms"], "vision_ms": r["encode_ms"], "prompt_tokens": r["prompt_tokens"],
                           "image_tokens": r.get("image_tokens"), "preprocess_ms": r["preprocess_ms"]})
    out = _summarize(text_runs, image_runs, spec)
    if spec.get("batch_ids"):
        out.update(_vlmc_batch(vlm, spec))
    manifest = vlm.artifact.manifest
    out.update(framework="vlmc", version=vlmc.__version__, mlx=mx.__version__, load_s=load_s,
               dtype=manifest.get("dtype") or vlm.meta.get("dtype"), artifact=str(vlm.artifact.path),
               passes=[p["name"] for p in manifest.get("passes", [])],
               mlx_peak_bytes=mx.get_peak_memory(), roofline=weight_roofline(manifest, cpu_widening(manifest)))
    return out


def batch_speeds(t0: float, firsts: list[float], finishes: list[float], token_times: list[float],
                 prompt_tokens: int, decode_tokens: int) -> dict[str, float]:
    """Throughput of one batched run, in llama-batched-bench's terms: prompt processing
    until every sequence has its first token (S_PP), generation after that (S_TG: the
    tokens emitted after the last first token over the time they took; with continuous
    batching some sequences may start decoding before the last prompt is in), and the
    total (S: every prompt and decode token over the whole time)."""
    t_pp, t_end = max(firsts) - t0, max(finishes) - t0
    later = sum(1 for t in token_times if t > max(firsts))
    n = len(firsts)
    return {"batch_t_pp_s": t_pp, "batch_t_s": t_end, "batch_prefill_tps": n * prompt_tokens / t_pp,
            "batch_decode_tps": later / (t_end - t_pp) if t_end > t_pp else None,
            "batch_tps": n * (prompt_tokens + decode_tokens) / t_end}


def _vlmc_batch(vlm: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """``len(batch_ids)`` requests through the continuous-batching loop (``Batcher``, what
    ``batch_generate`` and ``vlmc serve`` use), submitted at once, each exactly
    ``decode_tokens`` + 1 greedy tokens (EOS masked): the first ends its prefill, the rest
    are decode steps, as in llama-batched-bench's -ntg. One warm-up batch of the same size
    (16-token prompts, 2 tokens) runs first."""
    import threading

    from vlmc.runtime.batcher import Batcher, FinishEvent, Job
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.sampling import SamplingParams

    def run(prompts: list[list[int]], n_new: int) -> dict[str, Any]:
        firsts: dict[int, float] = {}
        finishes: dict[int, float] = {}
        token_times: list[float] = []
        counts = [0] * len(prompts)
        done = threading.Event()

        def emit(ev: Any, i: int) -> None:
            now = time.perf_counter()
            if isinstance(ev, FinishEvent):
                finishes[i] = now
                if ev.reason not in ("length", "stop") or ev.completion_tokens != n_new:
                    counts[i] = -1
                if len(finishes) == len(prompts):
                    done.set()
                return
            counts[i] += 1
            token_times.append(now)
            firsts.setdefault(i, now)

        batcher = Batcher(vlm, max_batch=len(prompts), max_queue=len(prompts))
        try:
            t0 = time.perf_counter()
            for i, ids in enumerate(prompts):
                batcher.submit(Job(Prompt(ids=list(ids)), lambda ev, i=i: emit(ev, i), SamplingParams(),
                                   max_tokens=n_new, min_tokens=n_new))
            done.wait()
        finally:
            batcher.shutdown()
        if any(c != n_new for c in counts):
            raise RuntimeError(f"batched run: expected {n_new} tokens per request, got {counts}")
        return batch_speeds(t0, list(firsts.values()), list(finishes.values()), token_times,
                            len(prompts[0]), n_new - 1)

    prompts = spec["batch_ids"]
    run([p[:16] for p in prompts], 2)                      # warm-up at the same batch size
    runs = [run(prompts, spec["decode_tokens"] + 1) for _ in range(spec["runs"])]
    out = {k: _median([r[k] for r in runs if r[k] is not None]) for k in runs[0]}
    out.update(batch=len(prompts), batch_samples=runs)
    return out


def worker_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's own tools on a GGUF of the same checkpoint (``llamacpp.py`` builds and
    converts): llama-bench for prefill (``-p N``) and decode (``-n D -d N``: D tokens after
    an N-token context; each after llama-bench's own warm-up run), llama-mtmd-cli in
    single-turn mode for the image request (one process per request: a warm-up with the
    small image, then ``runs`` requests; TTFT is read from its timestamped log, so the
    process's model loading is not in it), llama-batched-bench for the batched run. Max RSS
    is each tool process's own."""
    sys.path.insert(0, str(HERE))
    import llamacpp as lc

    build, gguf, threads = Path(spec["llama_cpp_build"]), spec["gguf"], str(spec["threads"])
    n, d, runs = len(spec["ids"]), spec["decode_tokens"], spec["runs"]
    tools: dict[str, list[dict[str, float]]] = {}

    def run(name: str, args: list[Any], stdin: str | None = None) -> dict[str, Any]:
        r = lc.run_tool([lc.tool(build, name), *args], stdin=stdin, timeout=spec["tool_timeout"])
        if spec.get("log_dir"):   # each tool's own output, kept beside the run's JSON
            stem = f"{spec['slug']}.{name}.{sum(map(len, tools.values()))}"
            (Path(spec["log_dir"]) / f"{stem}.stdout").write_text(r["stdout"])
            (Path(spec["log_dir"]) / f"{stem}.stderr").write_text(r["stderr"])
        lc.check(r, name)
        tools.setdefault(name, []).append({"seconds": r["seconds"], "max_rss_bytes": r["max_rss_bytes"]})
        return r

    common = ["-m", gguf, "-t", threads]
    pp = lc.parse_llama_bench(run("llama-bench", [*common, "-p", n, "-n", 0, "-r", runs, "-o", "json"])["stdout"])
    tg = lc.parse_llama_bench(run("llama-bench", [*common, "-p", 0, "-n", d, "-d", n, "-r", runs, "-o",
                                                  "json"])["stdout"])
    prompt_tps = _median(pp[0]["samples_ts"]) or pp[0]["avg_ts"]
    decode_tps = _median(tg[0]["samples_ts"]) or tg[0]["avg_ts"]
    out: dict[str, Any] = {"prompt_tokens": n, "decode_tokens": d, "prompt_tps": prompt_tps,
                           "ttft_ms": n / prompt_tps * 1e3, "decode_tps": decode_tps,
                           "text_samples": {"prefill_tps": pp[0]["samples_ts"], "decode_tps": tg[0]["samples_ts"]},
                           "llama_bench": {"prefill": pp[0], "decode": tg[0]}}
    if spec.get("image") and spec.get("mmproj"):
        image_args = [*common, "--mmproj", spec["mmproj"], "-c", spec["context"]]
        run("llama-mtmd-cli", [*image_args, *lc.mtmd_args(spec["warmup_image"], IMAGE_PROMPT)])   # warm-up
        image_runs = [lc.parse_mtmd(run("llama-mtmd-cli", [*image_args, *lc.mtmd_args(spec["image"], IMAGE_PROMPT)])
                                    ["stdout"]) for _ in range(runs)]
        out.update(image_ttft_ms=_median([t["ttft_ms"] for t in image_runs]),
                   image_vision_ms=_median([t["vision_ms"] for t in image_runs if t["vision_ms"] is not None]),
                   image_prompt_tokens=image_runs[0]["prompt_tokens"], image_tokens=image_runs[0]["image_tokens"],
                   image_samples=image_runs)
    if spec.get("batch_ids"):
        b = len(spec["batch_ids"])
        rows = []
        for _ in range(runs):
            r = run("llama-batched-bench", [*common, "-c", spec["batch_context"], "-npp", n, "-ntg", d,
                                            "-npl", f"1,{b}", "--output-format", "jsonl"])
            rows.append({int(x["pl"]): x for x in lc.parse_batched_bench(r["stdout"])})
        if any(b not in r for r in rows):
            raise RuntimeError(f"llama-batched-bench printed no row for {b} sequences")
        pick = lambda key, pl=b: _median([r[pl][key] for r in rows if pl in r])  # noqa: E731
        out.update(batch=b, batch_prefill_tps=pick("speed_pp"), batch_decode_tps=pick("speed_tg"),
                   batch_tps=pick("speed"), batch_t_pp_s=pick("t_pp"), batch_t_s=pick("t"),
                   batch_single_tps=pick("speed", 1), batch_single_decode_tps=pick("speed_tg", 1),
                   batch_samples=rows)
    info = lc.build_info(build)
    out.update(framework="llama.cpp", version=info.get("llama_cpp_python"), build=info.get("build"),
               gguf=str(gguf), mmproj=spec.get("mmproj"),
               dtype=spec.get("quant"), threads=int(threads), tools=tools, load_s=None,
               max_rss_bytes=max(x["max_rss_bytes"] for v in tools.values() for x in v))
    return out


def worker_mlx_vlm(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_vlm

    t = time.perf_counter()
    model, processor = mlx_vlm.load(spec["checkpoint"])
    load_s = time.perf_counter() - t
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    # Fixed token counts: stream_generate stops when tokenizer.stopping_criteria(token) is
    # true (the hook mlx_vlm.generate(stopping_criteria=...) sets); make it never fire.
    tokenizer.stopping_criteria = lambda _token: False
    # Random weights sample ids past the benchmark tokenizer's last token (the vocab keeps
    # its real size, the tokenizer is small); mlx-vlm's BPE streaming detokenizer indexes a
    # list as long as the tokenizer and raises IndexError on them. Give those ids a
    # one-character entry: the detokenizer does the same work per token, nothing else changes.
    tokenmap = getattr(getattr(processor, "detokenizer", None), "tokenmap", None)
    vocab = _vocab_size(Path(spec["checkpoint"]))
    if isinstance(tokenmap, list) and vocab and len(tokenmap) < vocab:
        tokenmap.extend(["!"] * (vocab - len(tokenmap)))
    image = _image(spec, "image")
    ids = mx.array([spec["ids"]], dtype=mx.int32)

    def run_text(n_new: int) -> dict[str, float]:
        times: list[float] = []
        t0 = time.perf_counter()
        for r in mlx_vlm.stream_generate(model, processor, "", input_ids=ids, max_tokens=n_new, temperature=0.0):
            if r.generation_tokens > len(times):   # the last yield repeats the last token (finish_reason)
                times.append(time.perf_counter())
        if n_new == spec["decode_tokens"] + 1:
            return _text_timing(times, t0, spec)
        return {}

    def render() -> str:
        if getattr(processor, "chat_template", None):
            return processor.apply_chat_template(image_messages(), add_generation_prompt=True, tokenize=False)
        return tokenizer.apply_chat_template(image_messages(), add_generation_prompt=True, tokenize=False)

    class TimedTower:
        """Stands in for model.vision_tower: evaluates and times each call (one sync point
        inside the request; the tower still runs once). Everything else is delegated."""

        def __init__(self, tower: Any) -> None:
            self.tower, self.seconds = tower, []

        def __getattr__(self, name: str) -> Any:
            return getattr(self.tower, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            out = self.tower(*args, **kwargs)
            mx.eval(out)
            self.seconds.append(time.perf_counter() - t)
            return out

    timed = None
    if hasattr(model, "vision_tower"):
        timed = TimedTower(model.vision_tower)
        object.__setattr__(model, "vision_tower", timed)   # an instance attribute wins over the module's entry

    def run_image(img: Any) -> dict[str, Any]:
        if timed is not None:
            timed.seconds.clear()
        t0 = time.perf_counter()
        text = render()
        first = n_prompt = None
        for r in mlx_vlm.stream_generate(model, processor, text, image=[img], max_tokens=1, temperature=0.0):
            if first is None:
                first, n_prompt = time.perf_counter(), r.prompt_tokens
        vision = sum(timed.seconds) * 1e3 if timed is not None and timed.seconds else None
        return {"ttft_ms": (first - t0) * 1e3, "prompt_tokens": n_prompt, "vision_ms": vision}

    run_text(2)                                             # warm-up
    if image is not None:
        run_image(_image(spec, "warmup_image"))
    mx.reset_peak_memory()
    text_runs = [run_text(spec["decode_tokens"] + 1) for _ in range(spec["runs"])]
    image_runs = [run_image(image) for _ in range(spec["runs"] if image is not None else 0)]
    out = _summarize(text_runs, image_runs, spec)
    from mlx.utils import tree_flatten
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())})
    out.update(framework="mlx-vlm", version=mlx_vlm.__version__, mlx=mx.__version__, load_s=load_s,
               dtype=",".join(dtypes), mlx_peak_bytes=mx.get_peak_memory())
    return out


def worker_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    from fixtures.checkpoints import _model_class, hf_processor  # torchvision-free processor

    ckpt = Path(spec["checkpoint"])
    family = json.loads((ckpt / "config.json").read_text())["model_type"]
    t = time.perf_counter()
    model = _model_class(family).from_pretrained(str(ckpt), dtype=torch.float32).eval()
    processor = hf_processor(ckpt, family)
    load_s = time.perf_counter() - t
    image = _image(spec, "image")
    eos = model.generation_config.eos_token_id
    pad = eos[0] if isinstance(eos, list) else eos

    class Clock(BaseStreamer):
        """generate() puts the prompt once, then each new token as soon as it is sampled."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: Any) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def generate(n_new: int, **inputs: Any) -> tuple[list[float], float, int]:
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                 streamer=clock, pad_token_id=pad)
        n = out.shape[1] - inputs["input_ids"].shape[1]
        if n != n_new:
            raise RuntimeError(f"transformers generated {n} tokens, expected {n_new}")
        return clock.times[1:], t0, n

    ids = torch.tensor([spec["ids"]], dtype=torch.long)

    def run_text(n_new: int) -> dict[str, float]:
        times, t0, _ = generate(n_new, input_ids=ids, attention_mask=torch.ones_like(ids))
        return _text_timing(times, t0, spec) if n_new == spec["decode_tokens"] + 1 else {}

    # Time the vision tower inside the request with forward hooks (torch is eager, so
    # they measure exactly the tower's forward and change nothing else).
    tower = getattr(model.model, "visual", None) or getattr(model.model, "vision_tower", None)
    vision_s: list[float] = []
    started: list[float] = []
    if tower is not None:
        tower.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        tower.register_forward_hook(lambda *_: vision_s.append(time.perf_counter() - started.pop()))

    def run_image(img: Any) -> dict[str, Any]:
        vision_s.clear()
        t0 = time.perf_counter()
        text = processor.apply_chat_template(image_messages(), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[text], images=[img], return_tensors="pt")
        clock = Clock()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False, streamer=clock,
                           pad_token_id=pad)
        return {"ttft_ms": (clock.times[1] - t0) * 1e3, "prompt_tokens": int(inputs["input_ids"].shape[1]),
                "vision_ms": sum(vision_s) * 1e3 if vision_s else None}

    run_text(2)                                             # warm-up
    if image is not None:
        run_image(_image(spec, "warmup_image"))
    text_runs = [run_text(spec["decode_tokens"] + 1) for _ in range(spec["runs"])]
    image_runs = [run_image(image) for _ in range(spec["runs"] if image is not None else 0)]
    out = _summarize(text_runs, image_runs, spec)
    out.update(framework="transformers", version=transformers.__version__, torch=torch.__version__,
               torch_threads=torch.get_num_threads(), load_s=load_s, dtype="float32")
    return out


WORKERS = {"vlmc": worker_vlmc, "mlx-vlm": worker_mlx_vlm, "transformers": worker_transformers,
           "llama.cpp": worker_llama_cpp}


def worker_main(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    la = _loadavg()
    t = time.perf_counter()
    result = WORKERS[name](spec)
    result.setdefault("max_rss_bytes", _max_rss_bytes())   # llama.cpp's: its tools', not this process's
    result.update(label=spec.get("label", name), wall_s=time.perf_counter() - t,
                  load_average_before=la, load_average_after=_loadavg(), python=sys.executable)
    out_path.write_text(json.dumps(result, indent=1))


# ====================================================================== orchestration
def run_worker(python: str, name: str, spec: dict[str, Any], tmp: Path, timeout: float,
               log: Callable[[str], None], tag: str = "") -> dict[str, Any]:
    label = spec.get("label", name)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + tag
    spec_path, out_path = tmp / f"{slug}.spec.json", tmp / f"{slug}.out.json"
    spec_path.write_text(json.dumps({**spec, "slug": slug, "log_dir": str(tmp)}))
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path), "--out", str(out_path)]
    log(f"[{label}] {' '.join(cmd)}  (load average {_loadavg()})")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **spec.get("env", {})})
    except subprocess.TimeoutExpired:
        return {"label": label, "framework": name, "error": f"timed out after {timeout:.0f} s"}
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        log(f"[{label}] failed (exit {proc.returncode}) after {elapsed:.0f} s:\n{tail}")
        return {"label": label, "framework": name, "error": tail.splitlines()[-1] if tail else "failed",
                "process_s": elapsed}
    result = json.loads(out_path.read_text())
    result["process_s"] = elapsed
    log(f"[{label}] done in {elapsed:.0f} s")
    return result


def interleave(jobs: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """Jobs ordered framework by framework in turn (vlmc q4, llama.cpp Q4_K_M, vlmc q8,
    llama.cpp Q8_0, ...), so that each run sits next to its peers in time."""
    groups: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for job in jobs:
        groups.setdefault(job[1], []).append(job)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


MEDIAN_KEYS = ("prompt_tps", "ttft_ms", "decode_tps", "image_ttft_ms", "image_vision_ms", "load_s", "process_s",
               "batch_prefill_tps", "batch_decode_tps", "batch_tps", "batch_t_pp_s", "batch_t_s",
               "batch_single_tps", "batch_single_decode_tps")
MAX_KEYS = ("max_rss_bytes", "mlx_peak_bytes")


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per label from its rounds: medians of the per-round speeds and times, the
    largest memory; each round's own row is kept under ``rounds``."""
    ok = [r for r in rows if "error" not in r]
    if not ok:
        return {**rows[-1], "rounds": rows}
    merged = dict(ok[0])
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        merged[k] = _median(vals) if vals else None
    for k in MAX_KEYS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        merged[k] = max(vals) if vals else None
    merged.update(load_average_before=ok[0].get("load_average_before"),
                  load_average_after=ok[-1].get("load_average_after"), rounds=rows,
                  failed_rounds=len(rows) - len(ok))
    return merged


def ratio_lines(rows: list[dict[str, Any]]) -> list[str]:
    """vlmc / every other framework, per metric (speeds: >1 = vlmc faster; memory: <1 = vlmc smaller)."""
    def ratio(x: Any, y: Any) -> str:
        return "-" if not x or not y else f"{x / y:.2f}x"
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["framework"] == "vlmc"]
    others = [r for r in ok if r["framework"] != "vlmc"]
    if not (ours and others):
        return []
    lines = ["", "ratios (speed: vlmc / other, >1 = vlmc faster; memory: vlmc / other, <1 = vlmc smaller)"]
    for a in ours:
        for b in others:
            line = (f"  {a['label']} / {b['label']}: decode {ratio(a['decode_tps'], b['decode_tps'])}, "
                    f"prefill {ratio(a['prompt_tps'], b['prompt_tps'])}, image TTFT "
                    f"{ratio(b.get('image_ttft_ms'), a.get('image_ttft_ms'))}")
            if a.get("batch_tps") and b.get("batch_tps"):
                line += (f", batch {a['batch']} total {ratio(a['batch_tps'], b['batch_tps'])}, batch {a['batch']} "
                         f"generation {ratio(a.get('batch_decode_tps'), b.get('batch_decode_tps'))}")
            lines.append(line + f", max RSS {ratio(a.get('max_rss_bytes'), b.get('max_rss_bytes'))}")
    return lines


def round_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each round's numbers, to show the spread behind the medians."""
    if not any(len(r.get("rounds", [])) > 1 for r in rows):
        return []
    lines = ["", "per round (decode tok/s | prefill tok/s | image TTFT ms | batch total tok/s):"]
    for r in rows:
        cells = []
        for x in r.get("rounds", []):
            if "error" in x:
                cells.append("error")
                continue
            cells.append(" | ".join(_fmt(x.get(k), f) for k, f in (("decode_tps", ".2f"), ("prompt_tps", ".1f"),
                                                                    ("image_ttft_ms", ".0f"), ("batch_tps", ".1f"))))
        lines.append(f"  {r['label']}: " + ";  ".join(cells))
    return lines


def batch_lines(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    have = [r for r in rows if "error" not in r and r.get("batch_tps")]
    if not have:
        return []
    b = have[0]["batch"]
    head = f"{'run':<22}{'prefill tok/s':>14}{'gen tok/s':>11}{'total tok/s':>13}{'total s':>9}{'1-seq total':>13}"
    lines = ["", f"batched: {b} sequences x ({meta['prompt_tokens']} prompt + {meta['decode_tokens']} generated "
             "tokens)",
             head, "-" * len(head)]
    for r in have:
        lines.append(f"{r['label']:<22}{_fmt(r.get('batch_prefill_tps'), '.1f'):>14}"
                     f"{_fmt(r.get('batch_decode_tps'), '.2f'):>11}{_fmt(r.get('batch_tps'), '.1f'):>13}"
                     f"{_fmt(r.get('batch_t_s'), '.1f'):>9}{_fmt(r.get('batch_single_tps'), '.1f'):>13}")
    return lines


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"{'run':<22}{'version':<9}{'dtype':<10}{'prefill tok/s':>14}{'TTFT ms':>10}{'decode tok/s':>13}"
            f"{'img TTFT ms':>12}{'vision ms':>11}{'img toks':>9}{'MLX peak':>9}{'max RSS':>9}{'load s':>8}"
            f"{'total s':>9}")
    lines = [f"checkpoint {meta['checkpoint']}  |  {meta['prompt_tokens']} prompt tokens, {meta['decode_tokens']} "
             f"decode tokens (no EOS stop), "
             + (f"{meta['image_size']}x{meta['image_size']} image, " if meta['image_size'] else "no image, ")
             + f"{meta['runs']} run(s) after 1 warm-up"
             + (f", {meta['rounds']} rounds (medians)" if meta.get("rounds", 1) > 1 else "")
             + f"  |  {meta['cpu_count']} cpus"
             + (f", {meta['threads']} threads" if meta.get("threads") else ""), head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label']:<22}error: {r['error']}")
            continue
        gb = lambda b: "-" if b is None else f"{b / 1e9:.2f}G"  # noqa: E731
        lines.append(f"{r['label']:<22}{str(r.get('version')):<9}{str(r.get('dtype')):<10}"
                     f"{_fmt(r['prompt_tps'], '.1f'):>14}{_fmt(r['ttft_ms'], '.0f'):>10}"
                     f"{_fmt(r['decode_tps'], '.3f'):>13}{_fmt(r.get('image_ttft_ms'), '.0f'):>12}"
                     f"{_fmt(r.get('image_vision_ms'), '.0f'):>11}{_fmt(r.get('image_prompt_tokens'), 'd'):>9}"
                     f"{gb(r.get('mlx_peak_bytes')):>9}{gb(r.get('max_rss_bytes')):>9}{_fmt(r.get('load_s'), '.1f'):>8}"
                     f"{_fmt(r.get('process_s'), '.0f'):>9}")
    loads = [f"{r['label']}: {r.get('load_average_before')} -> {r.get('load_average_after')}"
             for r in rows if "error" not in r]
    lines += ["", "load average (1/5/15 min) before -> after each run: " + "; ".join(loads)]
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["framework"] == "vlmc"]
    lines += batch_lines(rows, meta) + ratio_lines(rows) + round_lines(rows)
    llama = [r for r in ok if r["framework"] == "llama.cpp"]
    if llama:
        lines.append("")
        for r in llama:
            rss = ", ".join(f"{k} {max(x['max_rss_bytes'] for x in v) / 1e9:.2f}G" for k, v in r["tools"].items())
            lines.append(f"{r['label']}: {Path(r['gguf']).name}, llama-cpp-python {r.get('version')} sdist "
                         f"({r.get('build')}), {r.get('threads')} threads; max RSS per tool: {rss}")
    roofs = [r for r in ours if r.get("roofline") and r.get("decode_tps")]
    if roofs:
        lines.append("")
        for r in roofs:
            b = r["roofline"]["decode_bytes_per_token"]
            lines.append(f"roofline {r['label']}: {b / 1e9:.2f} GB of weights per decode token x "
                         f"{r['decode_tps']:.3f} tok/s = {b * r['decode_tps'] / 1e9:.2f} GB/s")
    tok = {r["label"]: r.get("image_prompt_tokens") for r in ok if r.get("image_prompt_tokens")}
    if len(set(tok.values())) > 1:
        lines.append(f"note: the image prompts differ in length across frameworks: {tok}")
    return "\n".join(lines)


def print_merged(paths: list[Path], out: Path | None) -> None:
    rows: dict[str, dict[str, Any]] = {}
    metas = []
    for p in paths:
        data = json.loads(p.read_text())
        metas.append(data["meta"])
        for r in data["results"]:
            if "error" not in r or r["label"] not in rows:
                rows[r["label"]] = r
    keys = ("checkpoint", "prompt_tokens", "decode_tokens", "image_size", "runs", "batch")
    if any(tuple(m.get(k) for k in keys) != tuple(metas[0].get(k) for k in keys) for m in metas):
        sys.exit("error: these files were measured with different settings: " + str([{k: m.get(k) for k in keys}
                                                                                     for m in metas]))
    print(format_table(list(rows.values()), metas[0]))
    if out:
        out.write_text(json.dumps({"meta": metas[0], "merged_from": [str(p) for p in paths],
                                   "results": list(rows.values())}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?", help="Hugging Face checkpoint folder.")
    ap.add_argument("--vlmc-artifact", action="append", default=[],
                    help="vlmc artifact compiled from CHECKPOINT (repeatable; default: compile CHECKPOINT).")
    ap.add_argument("--vlmc-dtype", default=None, help="dtype when vlmc compiles CHECKPOINT (default: its own).")
    ap.add_argument("--vlmc-python", default=sys.executable, help="Interpreter with vlmc (default: this one).")
    ap.add_argument("--mlx-vlm-python", default=os.environ.get("MLX_VLM_PYTHON"),
                    help="Interpreter of a venv with mlx-vlm (default: $MLX_VLM_PYTHON; unset skips mlx-vlm).")
    ap.add_argument("--transformers-python", default=sys.executable,
                    help="Interpreter with torch + transformers (default: this one).")
    ap.add_argument("--llama-cpp-build", type=Path, default=os.environ.get("LLAMA_CPP_BUILD"),
                    help="A llama.cpp build made by `benchmarks/llamacpp.py build` (default: $LLAMA_CPP_BUILD; "
                         "unset skips llama.cpp).")
    ap.add_argument("--llama-cpp-gguf", action="append", default=[], type=Path,
                    help="The checkpoint's language model as GGUF (repeatable: e.g. Q4_K_M and Q8_0).")
    ap.add_argument("--llama-cpp-mmproj", type=Path, default=None,
                    help="Its vision projector GGUF (mmproj; without it llama.cpp has no image request).")
    ap.add_argument("--llama-cpp-context", type=int, default=4096, help="llama-mtmd-cli's context (-c, default 4096).")
    ap.add_argument("--threads", type=int, default=_cpus(),
                    help="Threads for llama.cpp (-t) and vlmc's CPU kernels (VLMC_CPU_THREADS); default: the "
                         "cpus this process may use.")
    ap.add_argument("--batch", type=int, default=0,
                    help="Also time N sequences at once (vlmc's batching loop, llama-batched-bench), each "
                         "PROMPT_TOKENS + DECODE_TOKENS; 0 (default) skips it.")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Run every framework this many times, in a rotated order each round; medians over rounds.")
    ap.add_argument("--skip", action="append", default=[], choices=sorted(WORKERS), help="Leave a framework out.")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=448, help="Synthetic image side (0: no image request).")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--hub-copy", type=Path, default=None,
                    help="Where to write the hub-named copy if CHECKPOINT needs one (default: CHECKPOINT-hub).")
    ap.add_argument("--timeout", type=float, default=3600, help="Seconds per framework.")
    ap.add_argument("--json", type=Path, default=None, help="Write every number to this file.")
    ap.add_argument("--from-json", action="append", default=[], type=Path,
                    help="Print one table from earlier --json files (repeatable) instead of running; "
                         "a failed run is replaced by a later successful one with the same label.")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker, a.spec, a.out)
        return
    if a.from_json:
        print_merged(a.from_json, a.json)
        return
    if a.checkpoint is None:
        ap.error("CHECKPOINT is required")
    if a.prompt_tokens < 1 or a.decode_tokens < 1 or a.runs < 1 or 0 < a.image_size < 28:
        ap.error("--prompt-tokens, --decode-tokens and --runs must be >= 1, --image-size 0 (none) or >= 28")
    if a.rounds < 1 or a.batch < 0 or a.threads < 1:
        ap.error("--rounds and --threads must be >= 1, --batch >= 0")
    if a.llama_cpp_build and "llama.cpp" not in a.skip:
        sys.path.insert(0, str(HERE))
        import llamacpp
        missing = [t for t in llamacpp.TOOLS if not (a.llama_cpp_build / "bin" / t).is_file()]
        if missing:
            ap.error(f"--llama-cpp-build {a.llama_cpp_build} lacks {', '.join(missing)} in bin/: "
                     "make it with `python benchmarks/llamacpp.py build`")
        if not a.llama_cpp_gguf:
            ap.error("--llama-cpp-build needs --llama-cpp-gguf FILE (make them with `python benchmarks/llamacpp.py "
                     "convert`)")
        for f in [*a.llama_cpp_gguf, *([a.llama_cpp_mmproj] if a.llama_cpp_mmproj else [])]:
            if not f.is_file():
                ap.error(f"{f} is not a file")
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    t_all = time.perf_counter()
    ckpt = a.checkpoint.expanduser().resolve()
    if not (ckpt / "config.json").is_file():
        sys.exit(f"error: {ckpt} is not a checkpoint folder (no config.json)")
    if uses_module_names(ckpt):
        hub = (a.hub_copy or ckpt.with_name(ckpt.name + "-hub")).resolve()
        log(f"{ckpt} uses transformers' in-memory tensor names; all frameworks read a hub-named copy: {hub}")
        ckpt = hub_named_copy(ckpt, hub, log)

    from PIL import Image  # noqa: F401 - the orchestrator draws the shared image
    sys.path.insert(0, str(REPO))
    from vlmc.bench import WARMUP_IMAGE, synthetic_image

    tmp = Path(tempfile.mkdtemp(prefix="vlmc-compare-"))
    log(f"specs, results and the llama.cpp tools' output go to {tmp}")
    png, warm_png = tmp / "image.png", tmp / "warmup.png"
    if a.image_size:
        synthetic_image(a.image_size).save(png)
        synthetic_image(min(a.image_size, WARMUP_IMAGE), seed=1).save(warm_png)
    base = {"checkpoint": str(ckpt), "ids": prompt_ids(ckpt, a.prompt_tokens), "decode_tokens": a.decode_tokens,
            "image": str(png) if a.image_size else None,
            "warmup_image": str(warm_png) if a.image_size else None, "runs": a.runs,
            "batch_ids": [prompt_ids(ckpt, a.prompt_tokens, seed=1 + i) for i in range(a.batch)]}
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    vlmc_env = {"env": {"VLMC_CPU_THREADS": str(a.threads)}}
    if "vlmc" not in a.skip:
        if a.vlmc_artifact:
            for art in a.vlmc_artifact:
                jobs.append((a.vlmc_python, "vlmc", {**base, **vlmc_env, "model": str(Path(art).resolve()),
                                                     "vlmc_dtype": "float32", "label": f"vlmc {Path(art).name}"}))
        else:
            d = a.vlmc_dtype or _checkpoint_dtype(ckpt)
            jobs.append((a.vlmc_python, "vlmc", {**base, **vlmc_env, "model": str(ckpt), "vlmc_dtype": d,
                                                 "label": f"vlmc {d}"}))
    if "mlx-vlm" not in a.skip:
        if a.mlx_vlm_python:
            jobs.append((a.mlx_vlm_python, "mlx-vlm", {**base, "label": "mlx-vlm"}))
        else:
            log("mlx-vlm skipped: pass --mlx-vlm-python (a venv with mlx-vlm) or set MLX_VLM_PYTHON")
    if "transformers" not in a.skip:
        jobs.append((a.transformers_python, "transformers", {**base, "label": "transformers f32"}))
    if "llama.cpp" not in a.skip:
        if a.llama_cpp_build:
            if a.image_size and not a.llama_cpp_mmproj:
                log("llama.cpp: no --llama-cpp-mmproj, so no image request for it")
            per_seq = a.prompt_tokens + a.decode_tokens
            for g in a.llama_cpp_gguf:
                quant = g.stem.split("-")[-1] if "-" in g.stem else g.stem
                mmproj = str(a.llama_cpp_mmproj.resolve()) if a.llama_cpp_mmproj else None
                jobs.append((sys.executable, "llama.cpp", {
                    **base, "label": f"llama.cpp {quant}", "quant": quant,
                    "llama_cpp_build": str(a.llama_cpp_build.resolve()), "gguf": str(g.resolve()), "mmproj": mmproj,
                    "threads": a.threads, "context": a.llama_cpp_context, "tool_timeout": a.timeout,
                    "batch_context": -(-a.batch * per_seq // 256) * 256 + 256}))
        else:
            log("llama.cpp skipped: pass --llama-cpp-build DIR and --llama-cpp-gguf FILE (see "
                "`python benchmarks/llamacpp.py --help`) or set LLAMA_CPP_BUILD")

    jobs = interleave(jobs)
    per_label: dict[str, list[dict[str, Any]]] = {spec.get("label", name): [] for _, name, spec in jobs}
    for r in range(a.rounds):
        k = r % len(jobs) if jobs else 0
        if a.rounds > 1:
            log(f"round {r + 1} of {a.rounds}")
        for py, name, spec in jobs[k:] + jobs[:k]:      # each round starts with the next framework
            row = run_worker(py, name, spec, tmp, a.timeout, log, tag=f".r{r}" if a.rounds > 1 else "")
            per_label[spec.get("label", name)].append(row)
    rows = [merge_rounds(v) if len(v) > 1 else v[0] for v in per_label.values()]
    meta = {"checkpoint": str(ckpt), "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
            "image_size": a.image_size, "runs": a.runs, "rounds": a.rounds, "batch": a.batch, "threads": a.threads,
            "cpu_count": os.cpu_count(), "load_average_end": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(sys.argv), "total_s": time.perf_counter() - t_all}
    print(format_table(rows, meta))
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
