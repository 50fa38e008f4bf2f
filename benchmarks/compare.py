"""vlmc vs mlx-vlm vs transformers vs llama.cpp on one checkpoint: same prompt ids, same image, fixed token counts.

    python benchmarks/compare.py /tmp/bench/qwen2vl-2b \\
        --vlmc-artifact /tmp/bench/art-bf16 --vlmc-artifact /tmp/bench/art-f32 \\
        --mlx-vlm-python /tmp/mlxvlm-venv/bin/python --prompt-tokens 64 --decode-tokens 8

llama.cpp joins with ``--llama-cpp-build`` and ``--llama-cpp-gguf`` (``llamacpp.py`` builds
its tools and converts the checkpoint); ``--batch N`` adds N sequences at once (vlmc's
continuous-batching loop, llama-batched-bench); ``--rounds R`` repeats every framework R
times in fresh processes, each round starting with the next one (medians of the rounds).

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
  llama.cpp: llama-bench's prefill and decode (``llamacpp.measure``).
* image: the chat template with one image + "Describe this image." through each framework's
  own processor, one token; TTFT from the decoded PIL image to the first token, and within
  that same request the vision tower's share (vlmc: ``encode_images`` wrapped to evaluate and
  time; mlx-vlm: ``model.vision_tower`` wrapped the same way; transformers: forward hooks;
  llama.cpp: llama-mtmd-cli's timestamped log).

Memory: MLX's peak (``mx.get_peak_memory`` after load, weights included) for the MLX
frameworks, and the process's max RSS (load included; llama.cpp: its tool processes').

Checkpoints written with transformers' in-memory module names (``model.language_model.*``,
``model.visual.*``; what ``make_checkpoint.py`` writes today) are first copied once to
hub names (``model.*``, ``visual.*``: what published checkpoints and ``save_pretrained``
use; mlx-vlm only reads those) next to the original, and all frameworks read that
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


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    for _ in range(spec.get("image_runs", spec["runs"]) if image is not None else 0):
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


def worker_mlx_vlm(spec: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx
    import mlx_vlm

    t = time.perf_counter()
    model, processor = mlx_vlm.load(spec["checkpoint"])
    if spec.get("mlx_vlm_quantize"):
        from mlx.utils import tree_flatten as _flat
        from mlx_vlm.quant_utils import quantize_model
        model, _ = quantize_model(model, {}, 64, spec["mlx_vlm_quantize"])
        mx.eval([v for _, v in _flat(model.parameters())])
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
    if family == "qwen3_5_moe":
        from fixtures import qwen3_5
        processor = qwen3_5.hf_processor(ckpt)
        return tf.Qwen3_5MoeForConditionalGeneration, processor, chat(processor)
    if family == "qwen3_5":
        from fixtures import qwen3_5
        processor = qwen3_5.hf_processor(ckpt)
        return tf.Qwen3_5ForConditionalGeneration, processor, chat(processor)
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
    if family == "mistral3":
        from fixtures import pixtral
        pp = json.loads((ckpt / "preprocessor_config.json").read_text())
        pc = json.loads((ckpt / "processor_config.json").read_text())
        image_processor = pixtral.hf_image_processor(
            **{k: v for k, v in pp.items() if k not in ("image_processor_type", "processor_class")})
        processor = pixtral._processor_class()(
            image_processor=image_processor, tokenizer=ck.hf_tokenizer(ckpt), patch_size=pc["patch_size"],
            spatial_merge_size=pc["spatial_merge_size"], chat_template=ck.read_chat_template(ckpt))
        return tf.Mistral3ForConditionalGeneration, processor, chat(processor)
    if family == "gemma4":
        from fixtures import gemma4
        processor = gemma4.hf_processor(ckpt, family)
        return tf.Gemma4ForConditionalGeneration, processor, \
            lambda img: gemma4.hf_inputs(processor, family, messages, [img])[1]
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
    dtype = spec.get("torch_dtype", "float32")
    model = model_class.from_pretrained(str(ckpt), dtype=getattr(torch, dtype)).eval()
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
               torch_threads=torch.get_num_threads(), load_s=load_s, dtype=dtype)
    return out


def worker_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    import llamacpp

    return llamacpp.measure(spec, IMAGE_PROMPT)


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
               log: Callable[[str], None]) -> dict[str, Any]:
    label, rnd = spec.get("label", name), spec.get("round", 0)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) + f".r{rnd}"
    spec_path, out_path = tmp / f"{slug}.spec.json", tmp / f"{slug}.out.json"
    spec_path.write_text(json.dumps({**spec, "slug": slug, "log_dir": str(tmp)}))
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--spec", str(spec_path), "--out", str(out_path)]
    log(f"[{label}] {' '.join(cmd)}  (load average {_loadavg()})")
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **spec.get("env", {})})
    except subprocess.TimeoutExpired:
        log(f"[{label}] timed out after {timeout:.0f} s (load average {_loadavg()})")
        return {"label": label, "framework": name, "error": f"timed out after {timeout:.0f} s", "round": rnd}
    elapsed = time.perf_counter() - t
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        log(f"[{label}] failed (exit {proc.returncode}) after {elapsed:.0f} s:\n{tail}")
        return {"label": label, "framework": name, "error": tail.splitlines()[-1] if tail else "failed",
                "process_s": elapsed, "round": rnd}
    result = json.loads(out_path.read_text())
    result.update(process_s=elapsed, round=rnd)
    log(f"[{label}] done in {elapsed:.0f} s")
    return result


WorkerJob = tuple[str, str, dict[str, Any]]   # (interpreter, worker name, spec)


def interleave(jobs: list[WorkerJob]) -> list[WorkerJob]:
    """Jobs ordered framework by framework in turn (vlmc q4, llama.cpp Q4_K_M, vlmc q8,
    llama.cpp Q8_0, ...), so that each run sits next to its peers in time."""
    groups: dict[str, list[WorkerJob]] = {}
    for job in jobs:
        groups.setdefault(job[1], []).append(job)
    out = []
    for i in range(max((len(g) for g in groups.values()), default=0)):
        out += [g[i] for g in groups.values() if i < len(g)]
    return out


def round_order(jobs: list[WorkerJob], r: int) -> list[WorkerJob]:
    """Round ``r`` starts with job ``r`` and goes on in turn: over as many rounds as there
    are jobs, every job runs once in every position (first, second, ..., last), so a load
    that drifts over the sitting reaches them all alike."""
    k = r % len(jobs) if jobs else 0
    return jobs[k:] + jobs[:k]


MEDIAN_KEYS = ("prompt_tps", "ttft_ms", "decode_tps", "image_ttft_ms", "image_vision_ms", "load_s", "process_s",
               "batch_prefill_tps", "batch_decode_tps", "batch_tps", "batch_t_pp_s", "batch_t_s",
               "batch_single_tps", "batch_single_decode_tps")
MAX_KEYS = ("max_rss_bytes", "mlx_peak_bytes")
FIRST_KEYS = ("image_prompt_tokens", "image_tokens", "batch")   # the same in every round that has them


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row per label from its rounds: the median of the rounds' figures (a round
    without the image request leaves those out), the largest memory, the load average
    before the first round and after the last; each round's own row is kept under
    ``rounds`` and each failed one, with its error, under ``failed_rounds``."""
    if len(rows) == 1:
        return rows[0]
    ok = [r for r in rows if "error" not in r]
    failed = [f"round {r.get('round', i) + 1}: {r['error']}" for i, r in enumerate(rows) if "error" in r]
    if not ok:
        return {**rows[-1], "rounds": rows, "failed_rounds": failed}
    merged = {k: v for k, v in ok[0].items() if not k.endswith("_samples")}   # the samples stay in their round
    for k in MEDIAN_KEYS:
        merged[k] = _median([r[k] for r in ok if r.get(k) is not None])
    for k in MAX_KEYS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        merged[k] = max(vals) if vals else None
    for k in FIRST_KEYS:
        merged[k] = next((r[k] for r in ok if r.get(k) is not None), None)
    merged.pop("round", None)
    merged.update(load_average_before=ok[0].get("load_average_before"),
                  load_average_after=ok[-1].get("load_average_after"), rounds=rows, failed_rounds=failed)
    return merged


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


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
    lines = []
    if any(isinstance(r.get("rounds"), list) and len(r["rounds"]) > 1 for r in rows):
        lines = ["", "per round (decode tok/s | prefill tok/s | image TTFT ms | batch total tok/s):"]
        for r in rows:
            cells = []
            for x in r.get("rounds") if isinstance(r.get("rounds"), list) else []:
                if "error" in x:
                    cells.append("error")
                    continue
                cells.append(" | ".join(_fmt(x.get(k), f) for k, f in (
                    ("decode_tps", ".2f"), ("prompt_tps", ".1f"), ("image_ttft_ms", ".0f"), ("batch_tps", ".1f"))))
            if cells:
                lines.append(f"  {r['label']}: " + ";  ".join(cells))
    # files written before every round's row was kept list each round's decode speed alone
    spread = [f"{r['label']}: {', '.join(f'{x:.2f}' for x in r['round_decode_tps'] if x)}"
              for r in rows if r.get("round_decode_tps")]
    if spread:
        lines.append("decode tok/s by round: " + "; ".join(spread))
    failed = []
    for r in rows:
        f = r.get("failed_rounds")
        failed += [f"{r['label']} {x}" for x in f] if isinstance(f, list) else [f"{r['label']}: {f}"] if f else []
    if failed:
        lines.append("failed rounds (left out of the medians): " + "; ".join(failed))
    return lines


def batch_lines(rows: list[dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    have = [r for r in rows if "error" not in r and r.get("batch_tps")]
    if not have:
        return []
    head = f"{'run':<22}{'prefill tok/s':>14}{'gen tok/s':>11}{'total tok/s':>13}{'total s':>9}{'1-seq total':>13}"
    lines = ["", f"batched: {have[0]['batch']} sequences x ({meta['prompt_tokens']} prompt + {meta['decode_tokens']} "
             "generated tokens)", head, "-" * len(head)]
    for r in have:
        lines.append(f"{r['label']:<22}{_fmt(r.get('batch_prefill_tps'), '.1f'):>14}"
                     f"{_fmt(r.get('batch_decode_tps'), '.2f'):>11}{_fmt(r.get('batch_tps'), '.1f'):>13}"
                     f"{_fmt(r.get('batch_t_s'), '.1f'):>9}{_fmt(r.get('batch_single_tps'), '.1f'):>13}")
    return lines


def _setup_line(meta: dict[str, Any]) -> str:
    image, runs, rounds = meta["image_size"], meta["runs"], meta.get("rounds", 1)
    height = meta.get("image_height") or image
    image_rounds = min(meta.get("image_rounds") or rounds, rounds)
    return (f"checkpoint {meta['checkpoint']}  |  {meta['prompt_tokens']} prompt tokens, {meta['decode_tokens']} "
            "decode tokens (no EOS stop), " + (f"{image}x{height} image, " if image else "no image, ")
            + f"{runs} run(s)" + (f" ({meta.get('image_runs') or runs} with the image)" if image else "")
            + " after 1 warm-up"
            + (f", {rounds} rounds (medians of the rounds)" if rounds > 1 else "")
            + (f", the image in the first {image_rounds}" if image and image_rounds < rounds else "")
            + f"  |  {meta['cpu_count']} cpus" + (f", {meta['threads']} threads" if meta.get("threads") else ""))


def format_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    head = (f"{'run':<22}{'version':<9}{'dtype':<10}{'prefill tok/s':>14}{'TTFT ms':>10}{'decode tok/s':>13}"
            f"{'img TTFT ms':>12}{'vision ms':>11}{'img toks':>9}{'MLX peak':>9}{'max RSS':>9}{'load s':>8}"
            f"{'total s':>9}")
    lines = [_setup_line(meta), head, "-" * len(head)]
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
    ok = [r for r in rows if "error" not in r]
    loads = [f"{r['label']}: {r.get('load_average_before')} -> {r.get('load_average_after')}" for r in ok]
    lines += ["", "load average (1/5/15 min) before -> after each run: " + "; ".join(loads)]
    lines += batch_lines(rows, meta) + ratio_lines(rows) + round_lines(rows)
    llama = [r for r in ok if r["framework"] == "llama.cpp"]
    if llama:
        lines.append("")
        for r in llama:
            rss = ", ".join(f"{k} {max(x['max_rss_bytes'] for x in v) / 1e9:.2f}G" for k, v in r["tools"].items())
            lines.append(f"{r['label']}: {Path(r['gguf']).name}, llama-cpp-python {r.get('version')} sdist "
                         f"({r.get('build')}), {r.get('threads')} threads; max RSS per tool: {rss}")
    roofs = [r for r in ok if r["framework"] == "vlmc" and r.get("roofline") and r.get("decode_tps")]
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


SAME_SETTINGS = ("checkpoint", "prompt_tokens", "decode_tokens", "image_size", "image_height", "runs", "batch")


def print_merged(paths: list[Path], out: Path | None) -> None:
    """One table from earlier --json files (also those written before llama.cpp and the
    batched run joined, whose meta has no ``batch``: no batched run)."""
    rows: dict[str, dict[str, Any]] = {}
    metas = []
    for p in paths:
        data = json.loads(p.read_text())
        metas.append({**data["meta"], "batch": data["meta"].get("batch") or 0})
        for r in data["results"]:
            if "error" not in r or r["label"] not in rows:
                rows[r["label"]] = r
    settings = [{k: m.get(k) for k in SAME_SETTINGS} for m in metas]
    if any(x != settings[0] for x in settings):
        sys.exit(f"error: these files were measured with different settings: {settings}")
    print(format_table(list(rows.values()), metas[0]))
    if out:
        out.write_text(json.dumps({"meta": metas[0], "merged_from": [str(p) for p in paths],
                                   "results": list(rows.values())}, indent=1))


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", type=Path, nargs="?", help="Hugging Face checkpoint folder.")
    ap.add_argument("--vlmc-artifact", action="append", default=[],
                    help="vlmc artifact compiled from CHECKPOINT (repeatable; default: compile CHECKPOINT).")
    ap.add_argument("--vlmc-dtype", default=None, help="dtype when vlmc compiles CHECKPOINT (default: its own).")
    ap.add_argument("--vlmc-python", default=sys.executable, help="Interpreter with vlmc (default: this one).")
    ap.add_argument("--mlx-vlm-python", default=os.environ.get("MLX_VLM_PYTHON"),
                    help="Interpreter of a venv with mlx-vlm (default: $MLX_VLM_PYTHON; unset skips mlx-vlm).")
    ap.add_argument("--transformers-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="transformers' weights (default float32; bfloat16 where float32 would not fit in RAM).")
    ap.add_argument("--mlx-vlm-quantize", type=int, default=0, choices=[0, 4, 8],
                    help="mlx-vlm quantizes the loaded model in memory to these bits (affine, group 64: what "
                         "mlx_vlm.convert -q writes, without the disk copy; 0: as stored). MLX's CPU backend runs "
                         "bfloat16 mixture-of-experts layers not at all (gather_mm: float32 only).")
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
    ap.add_argument("--skip", action="append", default=[], choices=sorted(WORKERS), help="Leave a framework out.")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=448, help="Synthetic image side (0: no image request).")
    ap.add_argument("--image-height", type=int, default=None,
                    help="Its height, for a non-square image (default: --image-size; the width stays --image-size).")
    ap.add_argument("--batch", type=int, default=0,
                    help="Also time N sequences at once (vlmc's batching loop, llama-batched-bench), each "
                         "PROMPT_TOKENS + DECODE_TOKENS; 0 (default) skips it.")
    ap.add_argument("--runs", type=int, default=1, help="Timed runs per worker process (medians).")
    ap.add_argument("--image-runs", type=int, default=None, help="Timed image requests per worker (default: --runs).")
    ap.add_argument("--rounds", type=int, default=1,
                    help="Run every framework this many times in fresh processes, each round starting with the "
                         "next one; medians of the rounds, every round's figures listed.")
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


def _check_arguments(ap: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.checkpoint is None:
        ap.error("CHECKPOINT is required")
    a.image_runs = a.runs if a.image_runs is None else a.image_runs
    a.image_rounds = a.rounds if a.image_rounds is None else a.image_rounds
    counts = (a.prompt_tokens, a.decode_tokens, a.runs, a.rounds, a.image_runs, a.image_rounds, a.threads)
    if min(counts) < 1 or a.batch < 0 or 0 < a.image_size < 28 or (a.image_height is not None and a.image_height < 28):
        ap.error("--prompt-tokens, --decode-tokens, --runs, --image-runs, --rounds, --image-rounds and --threads "
                 "must be >= 1, --batch >= 0, --image-size 0 (none) or >= 28, --image-height >= 28")
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


def _jobs(a: argparse.Namespace, ckpt: Path, base: dict[str, Any], log: Callable[[str], None]) -> list[WorkerJob]:
    """One job per row of the table: each vlmc artifact, mlx-vlm, transformers, each GGUF."""
    jobs: list[WorkerJob] = []
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
            q = a.mlx_vlm_quantize
            jobs.append((a.mlx_vlm_python, "mlx-vlm", {**base, "mlx_vlm_quantize": q,
                                                       "label": f"mlx-vlm q{q}" if q else "mlx-vlm"}))
        else:
            log("mlx-vlm skipped: pass --mlx-vlm-python (a venv with mlx-vlm) or set MLX_VLM_PYTHON")
    if "transformers" not in a.skip:
        short = {"float32": "f32", "bfloat16": "bf16"}[a.transformers_dtype]
        jobs.append((a.transformers_python, "transformers", {**base, "torch_dtype": a.transformers_dtype,
                                                              "label": f"transformers {short}"}))
    if "llama.cpp" not in a.skip:
        if a.llama_cpp_build:
            if a.image_size and not a.llama_cpp_mmproj:
                log("llama.cpp: no --llama-cpp-mmproj, so no image request for it")
            per_seq = a.prompt_tokens + a.decode_tokens
            mmproj = str(a.llama_cpp_mmproj.resolve()) if a.llama_cpp_mmproj else None
            for g in a.llama_cpp_gguf:
                quant = g.stem.split("-")[-1] if "-" in g.stem else g.stem
                jobs.append((sys.executable, "llama.cpp", {
                    **base, "label": f"llama.cpp {quant}", "quant": quant,
                    "llama_cpp_build": str(a.llama_cpp_build.resolve()), "gguf": str(g.resolve()), "mmproj": mmproj,
                    "threads": a.threads, "context": a.llama_cpp_context, "tool_timeout": a.timeout,
                    "batch_context": -(-a.batch * per_seq // 256) * 256 + 256}))
        else:
            log("llama.cpp skipped: pass --llama-cpp-build DIR and --llama-cpp-gguf FILE (see "
                "`python benchmarks/llamacpp.py --help`) or set LLAMA_CPP_BUILD")
    return interleave(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker, a.spec, a.out)
        return
    if a.from_json:
        print_merged(a.from_json, a.json)
        return
    _check_arguments(ap, a)
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
        synthetic_image(a.image_size, height=a.image_height).save(png)
        synthetic_image(min(a.image_size, WARMUP_IMAGE), seed=1).save(warm_png)
    base = {"checkpoint": str(ckpt), "ids": prompt_ids(ckpt, a.prompt_tokens), "decode_tokens": a.decode_tokens,
            "image": str(png) if a.image_size else None,
            "warmup_image": str(warm_png) if a.image_size else None, "runs": a.runs, "image_runs": a.image_runs,
            "batch_ids": [prompt_ids(ckpt, a.prompt_tokens, seed=1 + i) for i in range(a.batch)]}
    jobs = _jobs(a, ckpt, base, log)
    per_label: dict[str, list[dict[str, Any]]] = {spec["label"]: [] for _, _, spec in jobs}
    for r in range(a.rounds):
        if a.rounds > 1:
            log(f"round {r + 1} of {a.rounds}")
        for py, name, spec in round_order(jobs, r):
            spec = {**spec, "round": r}
            if r >= a.image_rounds:
                spec.update(image=None, warmup_image=None)
            per_label[spec["label"]].append(run_worker(py, name, spec, tmp, a.timeout, log))
    rows = [merge_rounds(v) for v in per_label.values()]
    meta = {"checkpoint": str(ckpt), "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
            "image_size": a.image_size, "image_height": a.image_height, "runs": a.runs, "image_runs": a.image_runs,
            "rounds": a.rounds,
            "image_rounds": min(a.image_rounds, a.rounds), "batch": a.batch, "threads": a.threads,
            "cpu_count": os.cpu_count(), "load_average_end": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "command": " ".join(sys.argv), "total_s": time.perf_counter() - t_all}
    print(format_table(rows, meta))
    if a.json:
        a.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
        log(f"wrote {a.json}")


if __name__ == "__main__":
    main()
