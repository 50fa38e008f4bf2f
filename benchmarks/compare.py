"""vlmc vs mlx-vlm vs transformers on one checkpoint: same prompt ids, same image, fixed token counts.

    python benchmarks/compare.py /tmp/bench/qwen2vl-2b \\
        --vlmc-artifact /tmp/bench/art-bf16 --vlmc-artifact /tmp/bench/art-f32 \\
        --mlx-vlm-python /tmp/mlxvlm-venv/bin/python --prompt-tokens 64 --decode-tokens 8

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
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
IMAGE_PROMPT = "Describe this image."


# ====================================================================== shared helpers (stdlib)
def _max_rss_bytes() -> int:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _median(xs: list[float]) -> float | None:
    return float(statistics.median(xs)) if xs else None


def prompt_ids(checkpoint: Path, n: int, seed: int = 0) -> list[int]:
    """``n`` ordinary token ids of the checkpoint's tokenizer (no added/special tokens),
    the same for every framework."""
    tok = json.loads((checkpoint / "tokenizer.json").read_text())
    added = {t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok["model"]["vocab"]
    ids = sorted(v for v in (vocab.values() if isinstance(vocab, dict) else range(len(vocab))) if v not in added)
    rng = random.Random(seed)
    return [rng.choice(ids) for _ in range(n)]


def image_messages() -> list[dict[str, Any]]:
    """The image request, as vlmc's ``build_prompt(text, images=[img])`` renders it."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}]


def _vocab_size(checkpoint: Path) -> int | None:
    cfg = json.loads((checkpoint / "config.json").read_text())
    return cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")


def _checkpoint_dtype(checkpoint: Path) -> str:
    cfg = json.loads((checkpoint / "config.json").read_text())
    d = cfg.get("torch_dtype") or cfg.get("dtype") or (cfg.get("text_config") or {}).get("dtype") or "float32"
    return str(d)


# ---------------------------------------------------------------------- hub-name copy
TO_HUB = {
    "qwen": [("model.language_model.", "model."), ("model.visual.", "visual.")],
    "llava": [("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
              ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector.")],
}


def _weight_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


# families whose transformers 5 in-memory names differ from the published ones (Qwen3-VL,
# Idefics3/SmolVLM publish the in-memory names; make_checkpoint.py writes Gemma's hub names)
RENAMED_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "llava")


def uses_module_names(ckpt: Path) -> bool:
    if json.loads((ckpt / "config.json").read_text()).get("model_type") not in RENAMED_FAMILIES:
        return False
    for f in _weight_files(ckpt):
        header, _ = _read_header(f)
        if any(k.startswith(("model.language_model.", "model.visual.", "model.vision_tower.")) for k in header):
            return True
    return False


def hub_named_copy(ckpt: Path, out: Path, log: Callable[[str], None]) -> Path:
    """Copy ``ckpt`` with its tensors renamed to hub names (headers rewritten, bytes copied
    as they are). Written once: a finished copy (marked by its ``.complete`` file) is reused."""
    if (out / ".complete").is_file():
        return out
    cfg = json.loads((ckpt / "config.json").read_text())
    rules = TO_HUB["llava" if cfg.get("model_type") == "llava" else "qwen"]

    def rename(k: str) -> str:
        for old, new in rules:
            if k.startswith(old):
                return new + k[len(old):]
        return k

    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    for f in ckpt.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            (out / f.name).write_bytes(f.read_bytes())
    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"] = {rename(k): v for k, v in idx["weight_map"].items()}
        (out / index.name).write_text(json.dumps(idx))
    for f in _weight_files(ckpt):
        header, start = _read_header(f)
        new = json.dumps({rename(k): v for k, v in header.items()}, separators=(",", ":")).encode()
        new += b" " * (-len(new) % 8)
        with open(f, "rb") as src, open(out / f.name, "wb") as dst:
            dst.write(struct.pack("<Q", len(new)) + new)
            src.seek(start)
            while chunk := src.read(64 << 20):
                dst.write(chunk)
        log(f"  wrote {out / f.name}")
    (out / ".complete").write_text("")
    log(f"hub-named copy of {ckpt} written to {out} in {time.perf_counter() - t:.1f} s")
    return out


# ====================================================================== workers
def _image(spec: dict[str, Any], key: str) -> Any:
    """The spec's PNG as an RGB PIL image, decoded before any timing (None: no image run)."""
    if not spec.get(key):
        return None
    from PIL import Image
    return Image.open(spec[key]).convert("RGB")


def _text_timing(times: list[float], t0: float, spec: dict[str, Any]) -> dict[str, float]:
    """times: when each new token became available (first = end of prefill)."""
    n_new = spec["decode_tokens"] + 1
    if len(times) != n_new:
        raise RuntimeError(f"expected exactly {n_new} new tokens, got {len(times)}")
    ttft = times[0] - t0
    dec = times[-1] - times[0]
    return {"ttft_s": ttft, "decode_s": dec}


def _summarize(text_runs: list[dict[str, float]], image_runs: list[dict[str, Any]], spec: dict[str, Any]) -> dict:
    n, d = len(spec["ids"]), spec["decode_tokens"]
    ttft = _median([r["ttft_s"] for r in text_runs])
    dec = _median([r["decode_s"] for r in text_runs])
    out = {"prompt_tokens": n, "decode_tokens": d, "ttft_ms": ttft * 1e3, "prompt_tps": n / ttft,
           "decode_tps": d / dec if dec else None, "text_samples": text_runs}
    if image_runs:
        out.update(image_ttft_ms=_median([r["ttft_ms"] for r in image_runs]),
                   image_vision_ms=_median([r["vision_ms"] for r in image_runs if r.get("vision_ms") is not None]),
                   image_prompt_tokens=image_runs[0]["prompt_tokens"], image_samples=image_runs)
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
    for _ in range(spec.get("image_runs", spec["runs"]) if image is not None else 0):
        r = time_image_request(vlm, image)
        image_runs.append({"ttft_ms": r["ttft_ms"], "vision_ms": r["encode_ms"], "prompt_tokens": r["prompt_tokens"],
                           "preprocess_ms": r["preprocess_ms"]})
    out = _summarize(text_runs, image_runs, spec)
    manifest = vlm.artifact.manifest
    out.update(framework="vlmc", version=vlmc.__version__, mlx=mx.__version__, load_s=load_s,
               dtype=manifest.get("dtype") or vlm.meta.get("dtype"), artifact=str(vlm.artifact.path),
               passes=[p["name"] for p in manifest.get("passes", [])],
               mlx_peak_bytes=mx.get_peak_memory(), roofline=weight_roofline(manifest, cpu_widening(manifest)))
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
    tower_attr = next((a for a in ("vision_tower", "vision_model") if hasattr(model, a)), None)
    if tower_attr is not None:
        timed = TimedTower(getattr(model, tower_attr))
        object.__setattr__(model, tower_attr, timed)   # an instance attribute wins over the module's entry

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
    image_runs = [run_image(image) for _ in range(spec.get("image_runs", spec["runs"]) if image is not None else 0)]
    out = _summarize(text_runs, image_runs, spec)
    from mlx.utils import tree_flatten
    dtypes = sorted({str(v.dtype).replace("mlx.core.", "") for _, v in tree_flatten(model.parameters())})
    out.update(framework="mlx-vlm", version=mlx_vlm.__version__, mlx=mx.__version__, load_s=load_s,
               dtype=",".join(dtypes), mlx_peak_bytes=mx.get_peak_memory())
    return out


def _hf_family(ckpt: Path, family: str) -> tuple[Any, Any, Callable[[Any], Any]]:
    """(model class, processor, PIL image -> model inputs of the image request) for
    transformers. Processors are built directly (AutoProcessor wants torchvision for the
    video processors); token counts per image come from the checkpoint's own files."""
    import transformers as tf

    from fixtures import checkpoints as ck

    messages = image_messages()

    def chat(processor: Any) -> Callable[[Any], Any]:
        return lambda img: processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=False)],
                                     images=[img], return_tensors="pt")

    if family in RENAMED_FAMILIES:
        processor = ck.hf_processor(ckpt, family)
        return ck._model_class(family), processor, chat(processor)
    if family == "qwen3_vl":
        from fixtures import qwen3_vl
        processor = qwen3_vl.hf_processor(ckpt)
        return tf.Qwen3VLForConditionalGeneration, processor, chat(processor)
    if family in ("idefics3", "smolvlm"):
        from fixtures import idefics3
        tiles = json.loads((ckpt / "processor_config.json").read_text())["image_seq_len"]
        kw = dict(image_processor=idefics3.hf_image_processor(ckpt, family), tokenizer=ck.hf_tokenizer(ckpt),
                  image_seq_len=tiles, chat_template=ck.read_chat_template(ckpt))
        if family == "idefics3":
            processor, cls = tf.Idefics3Processor(**kw), tf.Idefics3ForConditionalGeneration
        else:
            processor, cls = ck._without_video(tf.SmolVLMProcessor)(video_processor=None, **kw), \
                tf.SmolVLMForConditionalGeneration
        # the tokenizer renders the template (SmolVLMProcessor's own reads its video settings)
        text = processor.tokenizer.apply_chat_template(messages, chat_template=processor.chat_template,
                                                       add_generation_prompt=True, tokenize=False)
        return cls, processor, lambda img: processor(text=[text], images=[[img]], return_tensors="pt")
    if family == "gemma3":
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
        pp = json.loads((ckpt / "preprocessor_config.json").read_text())
        seq = pp.pop("image_seq_length")
        kw = {k: v for k, v in pp.items() if k not in ("image_processor_type", "processor_class") and v is not None}
        processor = tf.Gemma3Processor(image_processor=Gemma3ImageProcessorPil(**kw), tokenizer=ck.hf_tokenizer(ckpt),
                                       chat_template=ck.read_chat_template(ckpt), image_seq_length=seq)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = not text.startswith(processor.tokenizer.bos_token)   # the template writes <bos> itself
        return tf.Gemma3ForConditionalGeneration, processor, \
            lambda img: processor(text=[text], images=[img], add_special_tokens=bos, return_tensors="pt")
    raise SystemExit(f"compare.py has no transformers setup for model_type {family!r}")


def worker_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    ckpt = Path(spec["checkpoint"])
    family = json.loads((ckpt / "config.json").read_text())["model_type"]
    t = time.perf_counter()
    model_class, processor, image_inputs = _hf_family(ckpt, family)
    model = model_class.from_pretrained(str(ckpt), dtype=torch.float32).eval()
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
    tower = next((getattr(model.model, a) for a in ("visual", "vision_tower", "vision_model")
                  if getattr(model.model, a, None) is not None), None)
    vision_s: list[float] = []
    started: list[float] = []
    if tower is not None:
        tower.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        tower.register_forward_hook(lambda *_: vision_s.append(time.perf_counter() - started.pop()))

    def run_image(img: Any) -> dict[str, Any]:
        vision_s.clear()
        t0 = time.perf_counter()
        inputs = image_inputs(img)
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
    image_runs = [run_image(image) for _ in range(spec.get("image_runs", spec["runs"]) if image is not None else 0)]
    out = _summarize(text_runs, image_runs, spec)
    out.update(framework="transformers", version=transformers.__version__, torch=torch.__version__,
               torch_threads=torch.get_num_threads(), load_s=load_s, dtype="float32")
    return out


WORKERS = {"vlmc": worker_vlmc, "mlx-vlm": worker_mlx_vlm, "transformers": worker_transformers}


def worker_main(name: str, spec_path: Path, out_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    la = _loadavg()
    t = time.perf_counter()
    result = WORKERS[name](spec)
    result.update(label=spec.get("label", name), wall_s=time.perf_counter() - t, max_rss_bytes=_max_rss_bytes(),
                  load_average_before=la, load_average_after=_loadavg(), python=sys.executable)
    out_path.write_text(json.dumps(result, indent=1))


# ====================================================================== orchestration
def run_worker(python: str, name: str, spec: dict[str, Any], tmp: Path, timeout: float,
               log: Callable[[str], None]) -> dict[str, Any]:
    label = spec.get("label", name)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + f".r{spec.get('round', 0)}"
    spec_path, out_path = tmp / f"{slug}.spec.json", tmp / f"{slug}.out.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path), "--out", str(out_path)]
    log(f"[{label}] {' '.join(cmd)}  (load average {_loadavg()})")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    except subprocess.TimeoutExpired:
        log(f"[{label}] timed out after {timeout:.0f} s (load average {_loadavg()})")
        return {"label": label, "framework": name, "error": f"timed out after {timeout:.0f} s",
                "round": spec.get("round", 0)}
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        log(f"[{label}] failed (exit {proc.returncode}) after {elapsed:.0f} s:\n{tail}")
        return {"label": label, "framework": name, "error": tail.splitlines()[-1] if tail else "failed",
                "process_s": elapsed, "round": spec.get("round", 0)}
    result = json.loads(out_path.read_text())
    result["process_s"] = elapsed
    log(f"[{label}] done in {elapsed:.0f} s")
    return result


def merge_rounds(results: list[dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """One row per framework from its rounds: medians over every round's samples, the
    largest memory figures, and each round's own decode tok/s and load average."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[-1]
    if len(results) == 1:
        return ok[0]
    text = [s for r in ok for s in r["text_samples"]]
    images = [s for r in ok for s in r.get("image_samples", [])]
    row = {**ok[0], **_summarize(text, images, spec)}
    for key in ("mlx_peak_bytes", "max_rss_bytes"):
        if any(r.get(key) is not None for r in ok):
            row[key] = max(r.get(key) or 0 for r in ok)
    row.update(load_s=_median([r["load_s"] for r in ok]), process_s=sum(r.get("process_s", 0) for r in ok),
               rounds=len(ok), failed_rounds=[f"round {r.get('round')}: {r['error']}" for r in results if "error" in r],
               round_decode_tps=[r["decode_tps"] for r in ok],
               load_average_before=[r.get("load_average_before") for r in ok],
               load_average_after=[r.get("load_average_after") for r in ok])
    return row


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"{'run':<22}{'version':<9}{'dtype':<10}{'prefill tok/s':>14}{'TTFT ms':>10}{'decode tok/s':>13}"
            f"{'img TTFT ms':>12}{'vision ms':>11}{'img toks':>9}{'MLX peak':>9}{'max RSS':>9}{'load s':>8}"
            f"{'total s':>9}")
    lines = [f"checkpoint {meta['checkpoint']}  |  {meta['prompt_tokens']} prompt tokens, {meta['decode_tokens']} "
             f"decode tokens (no EOS stop), "
             + (f"{meta['image_size']}x{meta['image_size']} image, " if meta['image_size'] else "no image, ")
             + f"{meta['runs']} run(s)"
             + (f" ({meta.get('image_runs', meta['runs'])} with the image)" if meta['image_size'] else "")
             + f" after 1 warm-up, x {meta.get('rounds', 1)} round(s)"
             + (f" ({meta.get('image_rounds', 1)} with the image)" if meta['image_size'] else "") + "  |  "
             f"{meta['cpu_count']} cpus", head, "-" * len(head)]
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
    spread = [f"{r['label']}: {', '.join(f'{x:.2f}' for x in r['round_decode_tps'] if x)}"
              for r in rows if r.get("round_decode_tps")]
    if spread:
        lines.append("decode tok/s by round: " + "; ".join(spread))
    failed = [f"{r['label']} {f}" for r in rows for f in r.get("failed_rounds", [])]
    if failed:
        lines.append("failed rounds (left out of the medians): " + "; ".join(failed))
    ok = [r for r in rows if "error" not in r]
    ours = [r for r in ok if r["framework"] == "vlmc"]
    others = [r for r in ok if r["framework"] != "vlmc"]
    if ours and others:
        lines += ["", "ratios (speed: vlmc / other, >1 = vlmc faster; memory: vlmc / other, <1 = vlmc smaller)"]
        for a in ours:
            for b in others:
                def ratio(x: Any, y: Any) -> str:
                    return "-" if not x or not y else f"{x / y:.2f}x"
                lines.append(
                    f"  {a['label']} / {b['label']}: decode {ratio(a['decode_tps'], b['decode_tps'])}, "
                    f"prefill {ratio(a['prompt_tps'], b['prompt_tps'])}, image TTFT "
                    f"{ratio(b.get('image_ttft_ms'), a.get('image_ttft_ms'))}, max RSS "
                    f"{ratio(a.get('max_rss_bytes'), b.get('max_rss_bytes'))}")
    roofs = [r for r in ours if r.get("roofline") and r.get("decode_tps")]
    if roofs:
        lines.append("")
        for r in roofs:
            b = r["roofline"]["decode_bytes_per_token"]
            lines.append(f"roofline {r['label']}: {b / 1e9:.2f} GB of weights per decode token x "
                         f"{r['decode_tps']:.3f} tok/s = {b * r['decode_tps'] / 1e9:.2f} GB/s")
    tok = {r["label"]: r.get("image_prompt_tokens") for r in ok}
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
    keys = ("checkpoint", "prompt_tokens", "decode_tokens", "image_size", "runs")
    if any(tuple(m[k] for k in keys) != tuple(metas[0][k] for k in keys) for m in metas):
        sys.exit("error: these files were measured with different settings: " + str([{k: m[k] for k in keys}
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
    ap.add_argument("--skip", action="append", default=[], choices=sorted(WORKERS), help="Leave a framework out.")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=448, help="Synthetic image side (0: no image request).")
    ap.add_argument("--runs", type=int, default=1, help="Timed runs per worker process (medians).")
    ap.add_argument("--image-runs", type=int, default=None, help="Timed image requests per worker (default: --runs).")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Run every framework this many times in fresh processes, alternating their order; "
                         "medians over all rounds' samples.")
    ap.add_argument("--image-rounds", type=int, default=None,
                    help="Rounds that include the image request (default: all; the rest time text only).")
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
    a.image_runs = a.runs if a.image_runs is None else a.image_runs
    a.image_rounds = a.rounds if a.image_rounds is None else a.image_rounds
    if min(a.prompt_tokens, a.decode_tokens, a.runs, a.rounds, a.image_runs, a.image_rounds) < 1 or 0 < a.image_size < 28:
        ap.error("--prompt-tokens, --decode-tokens, --runs, --image-runs, --rounds and --image-rounds must be >= 1, "
                 "--image-size 0 (none) or >= 28")
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
    png, warm_png = tmp / "image.png", tmp / "warmup.png"
    if a.image_size:
        synthetic_image(a.image_size).save(png)
        synthetic_image(min(a.image_size, WARMUP_IMAGE), seed=1).save(warm_png)
    base = {"checkpoint": str(ckpt), "ids": prompt_ids(ckpt, a.prompt_tokens), "decode_tokens": a.decode_tokens,
            "image": str(png) if a.image_size else None,
            "warmup_image": str(warm_png) if a.image_size else None, "runs": a.runs, "image_runs": a.image_runs}
    jobs: list[tuple[str, str, dict[str, Any]]] = []
    if "vlmc" not in a.skip:
        if a.vlmc_artifact:
            for art in a.vlmc_artifact:
                jobs.append((a.vlmc_python, "vlmc", {**base, "model": str(Path(art).resolve()), "vlmc_dtype": "float32",
                                                     "label": f"vlmc {Path(art).name}"}))
        else:
            d = a.vlmc_dtype or _checkpoint_dtype(ckpt)
            jobs.append((a.vlmc_python, "vlmc", {**base, "model": str(ckpt), "vlmc_dtype": d, "label": f"vlmc {d}"}))
    if "mlx-vlm" not in a.skip:
        if a.mlx_vlm_python:
            jobs.append((a.mlx_vlm_python, "mlx-vlm", {**base, "label": "mlx-vlm"}))
        else:
            log("mlx-vlm skipped: pass --mlx-vlm-python (a venv with mlx-vlm) or set MLX_VLM_PYTHON")
    if "transformers" not in a.skip:
        jobs.append((a.transformers_python, "transformers", {**base, "label": "transformers f32"}))

    per_label: dict[str, list[dict[str, Any]]] = {}
    for r in range(a.rounds):
        # alternate the order so no framework always runs first (or after the same neighbour)
        for py, name, spec in (jobs if r % 2 == 0 else jobs[::-1]):
            spec = {**spec, "round": r}
            if r >= a.image_rounds:
                spec.update(image=None, warmup_image=None)
            per_label.setdefault(spec["label"], []).append(run_worker(py, name, spec, tmp, a.timeout, log))
    rows = [merge_rounds(results, base) for results in per_label.values()]
    meta = {"checkpoint": str(ckpt), "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
            "image_size": a.image_size, "runs": a.runs, "image_runs": a.image_runs, "rounds": a.rounds,
            "image_rounds": min(a.image_rounds, a.rounds), "cpu_count": os.cpu_count(),
            "total_s": time.perf_counter() - t_all}
    print(format_table(rows, meta))
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
