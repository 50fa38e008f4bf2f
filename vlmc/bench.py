"""``vlmc bench``: how fast a loaded model is, measured the same way every time.

What is measured (see ``benchmarks/README.md`` for how to read the numbers):

* **prefill**: for each prompt length, a prompt of exactly that many text tokens (ids built
  directly, no chat template) is run through ``VLM.generate_steps``; the time to its first
  yield (prefill + the first sampled token) is the TTFT, and length / TTFT the prompt tok/s.
* **decode**: after a prompt of ``decode_context`` tokens, ``decode_tokens`` further tokens
  are generated greedily. Only the decode steps are timed (the first token, which ends the
  prefill, is excluded) and generation never stops at EOS, so every run does the same work.
* **image**: one synthetic ``image_size`` x ``image_size`` image through the chat template
  and the image processor; TTFT from the PIL image to the first token, with the
  preprocessing and the vision encoder (``VLM.encode_images`` + ``mx.eval``, timed on its
  own) reported separately.
* **memory**: MLX's peak (``mx.get_peak_memory``, weights included) and the process's max
  RSS (``getrusage``).
* **roofline**: decode reads every text-decoder weight once per token, plus the LM head
  (the whole embedding matrix when it is tied); bytes/token x tok/s is the memory
  bandwidth the measured decode speed implies. On the cpu target the machine's read
  bandwidth is measured at the end of the same run (``read_bandwidth_gbs``) and the
  implied bandwidth is given as a fraction of it.

One small warm-up pass (a 16-token prompt, two decode steps, a 56x56 image: every kernel
runs once and every weight is read into memory) comes before anything is timed; with
``runs > 1`` each figure is the median of the runs. The prefill at the decode context is
the first token of the decode run itself, so that prompt is not run twice.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import click

from .cli_options import kv_flags, pop_kv
from .errors import InputError, exit_on_user_error

DEFAULT_PROMPT_LENGTHS = (128, 512, 2048)
IMAGE_PROMPT = "Describe this image."
WARMUP_TOKENS = 16      # warm-up prompt length (at most the shortest measured one)
WARMUP_IMAGE = 56       # warm-up image side (the smallest a Qwen2-VL processor takes unchanged)


def _clock() -> str:
    return time.strftime("%H:%M:%S")


# ---------------------------------------------------------------------- environment
def max_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) if sys.platform == "darwin" else int(r) * 1024


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        return None


def system_info() -> dict[str, Any]:
    """Where the numbers come from: machine, load, library versions."""
    import mlx.core as mx
    from . import __version__
    return {"time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "host": platform.node(), "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "load_average": load_average(),
            "python": platform.python_version(), "mlx": mx.__version__, "device": str(mx.default_device()),
            "vlmc": __version__}


# ---------------------------------------------------------------------- roofline
READ_BYTES = 256 << 20  # 8x a 32 MiB L3: the read streams from DRAM


def read_bandwidth_gbs(reps: int = 5) -> float | None:
    """This machine's read bandwidth as the cpu kernels' threads see it: the median of
    ``reps`` streaming sums (C, ``vlmc_stream_read``) over READ_BYTES, in GB/s; None
    without the compiled kernels. Measured in the same run as the decode it is compared
    with: on a shared VM it moves by 10-15% from one run to the next."""
    import numpy as np
    from .kernels import cpu
    lib = cpu._get_lib()
    if lib is None:
        return None
    buf = np.ones(READ_BYTES // 4, np.float32)
    lib.vlmc_stream_read(buf.ctypes.data, buf.size, cpu.n_threads)  # pages touched, threads started
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        lib.vlmc_stream_read(buf.ctypes.data, buf.size, cpu.n_threads)
        times.append(time.perf_counter() - t)
    return buf.nbytes / _median(times) / 1e9


def _tensor_bytes(info: dict[str, Any]) -> int:
    from .ir.core import dtype_size
    n = 1
    for d in info["shape"]:
        n *= int(d)
    return n * dtype_size(info["dtype"])


def weight_roofline(manifest: dict[str, Any], widened: dict[str, int] | None = None) -> dict[str, Any]:
    """Weight bytes one decode step must read, from the artifact's manifest.

    Every decoder weight is read once per token; of the embedding only one row per token
    (negligible), unless the LM head is tied to it: then the whole matrix is read by the
    final projection. Other embedding tables (Gemma 4's per-layer token inputs) stay
    lookups, a row per token, whether or not the head is tied. The vision tower and
    projector are not used by decode. ``widened`` (tensor name -> bits,
    ``runtime.artifact.cpu_widening``) counts codes the runtime repacked at load at their
    wider size: that is what each step reads. A mixture-of-experts decoder
    (``meta["moe"]``) reads top_k / experts of its routed experts' weights per token
    (``routed_expert_bytes``, beside ``all_expert_bytes`` and the dense equivalent that
    would read them all).
    """
    groups = {"decoder": 0, "embedding": 0, "lm_head": 0, "vision": 0}
    moe = manifest.get("meta", {}).get("moe")
    experts = 0  # the routed experts' stacked weights (all of them)
    has_lm_head = False
    tied_table = 0  # the token embedding (its codes, scales and biases): what a tied head reads
    quantized = manifest.get("quantized", {})
    for name, info in manifest["tensors"].items():
        b = _tensor_bytes(info)
        q = quantized.get(name)
        if widened and q and name in widened:
            b = b * widened[name] // q["bits"]
        role, part = info.get("role"), info.get("part")
        if part in ("vision", "projector"):
            groups["vision"] += b
        elif role == "head":
            groups["lm_head"] += b
            has_lm_head = True
        elif role == "embed":
            groups["embedding"] += b
            if name.split(".weight")[0].endswith("embed_tokens"):
                tied_table += b
        elif moe and role in ("experts_gate_up", "experts_down"):
            experts += b
        else:
            groups["decoder"] += b
    tied = not has_lm_head
    head = (tied_table or groups["embedding"]) if tied else groups["lm_head"]  # no embed_tokens: all of it
    out: dict[str, Any] = {}
    if moe:  # a token reads only its top_k routed experts per layer (plus the shared one)
        routed = experts * int(moe["top_k"]) // int(moe["experts"])
        out = {"routed_expert_bytes": routed, "all_expert_bytes": experts,
               "dense_equivalent_decoder_bytes": groups["decoder"] + experts}
        groups["decoder"] += routed
    total = sum(groups.values()) + experts - out.get("routed_expert_bytes", 0)
    return {"decode_bytes_per_token": groups["decoder"] + head, "decoder_bytes": groups["decoder"],
            "lm_head_bytes": head, "lm_head_tied": tied, "embedding_bytes": groups["embedding"],
            "vision_bytes": groups["vision"], "total_bytes": total, **out}


def kv_bytes_per_token(meta: dict[str, Any], context: int, itemsize: int) -> int:
    """KV-cache bytes one decode step reads at a given context length (grows with it); a
    hybrid decoder's linear-attention layers read their fixed recurrent state instead."""
    t = meta["text"]
    plan = meta.get("kv_plan") or {}
    recurrent = int(plan.get("recurrent_layers", 0))
    attention = int(t["num_layers"]) - recurrent
    return (2 * attention * int(t["num_kv_heads"]) * int(t["head_dim"]) * context * itemsize
            + int(plan.get("bytes_per_sequence", 0)))


# ---------------------------------------------------------------------- inputs
def synthetic_ids(tokenizer: Any, n: int, seed: int = 0) -> list[int]:
    """``n`` ordinary (non-special) token ids, the same for a given tokenizer and seed.
    Their content does not change the work a dense model does; their count does."""
    import numpy as np
    special = set(tokenizer.special_ids)
    pool = np.array(sorted(i for i in tokenizer.get_vocab().values() if i not in special), dtype=np.int64)
    if not len(pool):
        raise InputError("the tokenizer has no ordinary tokens to build a prompt from")
    return pool[np.random.default_rng(seed).integers(0, len(pool), n)].tolist()


def synthetic_image(size: int, seed: int = 0, height: int | None = None):
    """A deterministic RGB test image, ``size`` wide and ``height`` (default ``size``) high:
    smooth gradients plus noise (never a flat image, so no processor can take a shortcut)."""
    import numpy as np
    from PIL import Image
    h = size if height is None else height
    y, x = np.mgrid[0:h, 0:size].astype(np.float32)
    y, x = y / max(h - 1, 1), x / max(size - 1, 1)
    noise = np.random.default_rng(seed).integers(0, 48, (h, size, 3)).astype(np.float32)
    rgb = np.stack([200 * x, 200 * y, 200 * (1 - x) * y], axis=-1) + noise
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


# ---------------------------------------------------------------------- timings
@dataclass
class Timing:
    prompt_tokens: int
    ttft_s: float          # prefill + first token
    decode_tokens: int     # timed decode steps (the first token is not one of them)
    decode_s: float

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def _greedy():
    from .runtime.sampling import Sampler, SamplingParams
    return Sampler(SamplingParams())


def time_generation(vlm: Any, prompt: Any, new_tokens: int, speculation: Any = None,
                    stats: dict[str, Any] | None = None) -> Timing:
    """Generate exactly ``new_tokens`` greedy tokens after ``prompt`` (never stopping at
    EOS); time the first yield (TTFT) and the steps after it (decode). With
    ``speculation`` the decode steps speculate (``stats`` receives what was drafted)."""
    t0 = time.perf_counter()
    steps = vlm.generate_steps([prompt], _greedy(), new_tokens) if speculation is None else \
        vlm.speculative_steps(prompt, _greedy(), new_tokens, speculation, stats)
    n, t_first, t_last = 0, t0, t0
    try:
        for _ in steps:  # each yield is already evaluated (generate_steps calls mx.eval)
            t_last = time.perf_counter()
            n += 1
            if n == 1:
                t_first = t_last
    finally:
        steps.close()
    if n < new_tokens:
        raise InputError(f"only {n} of {new_tokens} tokens fit in the model's context after a "
                         f"{len(prompt.ids)}-token prompt")
    return Timing(len(prompt.ids), t_first - t0, n - 1, t_last - t_first)


def time_image_request(vlm: Any, image: Any, text: str = IMAGE_PROMPT) -> dict[str, Any]:
    """TTFT of a one-image chat request from the PIL image, plus its parts.

    The vision encoder is timed inside that same request: ``vlm.encode_images`` is wrapped
    (on this instance, for this call) to evaluate its features and note the time. The
    only change to the request is that sync point, and the tower runs once, not twice.
    """
    import mlx.core as mx
    encode_s: list[float] = []
    original = vlm.encode_images

    def timed_encode(processed: Any) -> Any:
        t = time.perf_counter()
        feats = original(processed)
        mx.eval(feats)
        encode_s.append(time.perf_counter() - t)
        return feats

    vlm.encode_images = timed_encode
    try:
        t0 = time.perf_counter()
        prompt = vlm.build_prompt(text, images=[image])
        t1 = time.perf_counter()
        ttft = time_generation(vlm, prompt, 1).ttft_s + (t1 - t0)
    finally:
        del vlm.encode_images  # back to the class's method
    return {"prompt_tokens": len(prompt.ids), "image_tokens": int(sum(prompt.images.num_tokens)),
            "preprocess_ms": (t1 - t0) * 1e3, "encode_ms": sum(encode_s) * 1e3, "ttft_ms": ttft * 1e3}


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


# ---------------------------------------------------------------------- the benchmark
def fitting_lengths(lengths: Sequence[int], max_context: int, decode_tokens: int) -> tuple[list[int], str | None]:
    """The default prompt lengths a model's context holds (with room for the decode run
    after the shortest): those that fit, or the longest prompt that does, and a note."""
    room = max_context - decode_tokens - 2
    fit = [n for n in lengths if n <= room]
    if fit == list(lengths):
        return fit, None
    fit = fit or [max(room, 1)]
    return fit, (f"the model's context is {max_context} tokens: prompt lengths {','.join(map(str, fit))} "
                 f"instead of {','.join(map(str, lengths))} (--prompt-lengths to choose)")


def run_bench(vlm: Any, *, prompt_lengths: Sequence[int] | None = None, decode_tokens: int = 32,
              decode_context: int | None = None, image_size: int = 448, runs: int = 1, warmup: bool = True,
              log: Callable[[str], None] | None = None, speculation: Any = None) -> dict[str, Any]:
    """Measure a loaded VLM; returns a JSON-ready dict (see the module docstring). Without
    ``prompt_lengths`` the defaults that fit the model's context are measured."""
    import mlx.core as mx
    from .runtime.engine import Prompt

    say = log or (lambda _m: None)
    if prompt_lengths is None:
        prompt_lengths, note = fitting_lengths(DEFAULT_PROMPT_LENGTHS, vlm.max_context, decode_tokens)
        if note:
            say(note)
    lengths = sorted({int(n) for n in prompt_lengths})
    if not lengths or lengths[0] < 1:
        raise InputError("prompt lengths must be positive integers")
    ctx = int(decode_context or lengths[0])
    if lengths[-1] + 1 > vlm.max_context:
        raise InputError(f"a {lengths[-1]}-token prompt and its first new token need {lengths[-1] + 1} tokens; "
                         f"the model's context is {vlm.max_context}: lower --prompt-lengths")
    if ctx + decode_tokens + 1 > vlm.max_context:
        raise InputError(f"a {ctx}-token prompt and {decode_tokens + 1} new tokens need {ctx + decode_tokens + 1} "
                         f"tokens; the model's context is {vlm.max_context}: lower --decode-context or "
                         f"--decode-tokens")
    longest = max(lengths[-1], ctx + decode_tokens + 1)
    if image_size and vlm.image_token_id is None:
        say("this model takes no images: skipping the image request")
        image_size = 0
    ids = synthetic_ids(vlm.tokenizer, longest)
    prompt = lambda n: Prompt(ids=ids[:n])  # noqa: E731 - prefixes of one id list
    image = synthetic_image(image_size) if image_size else None
    out: dict[str, Any] = {"config": {"prompt_lengths": lengths, "decode_tokens": decode_tokens,
                                      "decode_context": ctx, "image_size": image_size, "runs": runs,
                                      "warmup": warmup}}
    t_start = time.perf_counter()
    peaks: list[int] = []

    def phase_peak() -> None:
        peaks.append(mx.get_peak_memory())
        mx.reset_peak_memory()

    mx.reset_peak_memory()
    if warmup:
        # Small on purpose (on a slow CPU a full-size pass costs minutes): it runs every
        # kernel once and pulls every weight (text and vision) into memory.
        n_warm, side = min(lengths[0], WARMUP_TOKENS), min(image_size, WARMUP_IMAGE)
        say(f"{_clock()} warm-up: {n_warm}-token prompt, 2 decode steps"
            + (f", one {side}x{side} image" if image is not None else ""))
        t = time.perf_counter()
        time_generation(vlm, prompt(n_warm), 2)
        if image is not None:
            time_image_request(vlm, synthetic_image(side, seed=1))
        out["warmup_s"] = time.perf_counter() - t
        phase_peak()
    resident = mx.get_active_memory()  # weights load lazily: resident once the warm-up touched them

    prefill, decode_runs = [], []
    for n in lengths:
        say(f"{_clock()} prefill {n} tokens" + (f", then {decode_tokens} decode steps" if n == ctx else ""))
        # At the decode context one run gives both: its first yield is that prefill.
        new = decode_tokens + 1 if n == ctx else 1
        spec_stats: dict[str, Any] = {}
        samples = [time_generation(vlm, prompt(n), new, speculation if n == ctx else None, spec_stats)
                   for _ in range(runs)]
        if n == ctx:
            decode_runs = samples
        ttft = _median([s.ttft_s for s in samples])
        prefill.append({"prompt_tokens": n, "ttft_ms": ttft * 1e3, "prompt_tps": n / ttft,
                        "samples_ms": [s.ttft_s * 1e3 for s in samples], "peak_memory_bytes": mx.get_peak_memory()})
        say(f"{_clock()}   TTFT {ttft * 1e3:.1f} ms, {n / ttft:.1f} tok/s")
        phase_peak()
    out["prefill"] = prefill

    if not decode_runs:
        say(f"{_clock()} decode: {ctx}-token prompt, then {decode_tokens} decode steps")
        spec_stats = {}
        decode_runs = [time_generation(vlm, prompt(ctx), decode_tokens + 1, speculation, spec_stats)
                       for _ in range(runs)]
    dt = _median([s.decode_s for s in decode_runs])
    tps = decode_tokens / dt if dt else 0.0
    out["decode"] = {"context": ctx, "tokens": decode_tokens, "decode_tps": tps,
                     "ms_per_token": dt * 1e3 / decode_tokens, "samples_tps": [s.decode_tps for s in decode_runs],
                     "peak_memory_bytes": mx.get_peak_memory()}
    if speculation is not None and spec_stats:
        steps = spec_stats["verify_steps"] + spec_stats["decode_steps"]
        out["decode"]["speculation"] = {
            "drafter": speculation.drafter.name, "num_draft_tokens": speculation.num_draft_tokens,
            "proposed": spec_stats["draft_proposed"], "accepted": spec_stats["draft_accepted"],
            "acceptance": spec_stats["draft_accepted"] / max(spec_stats["draft_proposed"], 1),
            "tokens_per_step": decode_tokens / max(steps, 1)}
    say(f"{_clock()}   decode {tps:.3f} tok/s")
    phase_peak()

    if image is not None:
        say(f"{_clock()} image request: {image_size}x{image_size}")
        samples_i = [time_image_request(vlm, image) for _ in range(runs)]
        img = {k: (_median([s[k] for s in samples_i]) if k.endswith("_ms") else samples_i[0][k]) for k in samples_i[0]}
        img.update(image_size=image_size, samples_ttft_ms=[s["ttft_ms"] for s in samples_i],
                   peak_memory_bytes=mx.get_peak_memory())
        out["image"] = img
        say(f"{_clock()}   TTFT {img['ttft_ms']:.1f} ms (vision {img['encode_ms']:.1f} ms)")
        phase_peak()

    manifest = vlm.artifact.manifest
    from .runtime.artifact import cpu_widening
    roof = weight_roofline(manifest, cpu_widening(manifest))
    emb = manifest["tensors"].get("text.embed_tokens.weight", {})
    itemsize = 4 if (manifest.get("dtype") or emb.get("dtype")) == "float32" else 2  # the cache's dtype
    roof["kv_bytes_per_token_at_context"] = kv_bytes_per_token(vlm.meta, ctx, itemsize)
    roof["implied_bandwidth_gbs"] = roof["decode_bytes_per_token"] * tps / 1e9
    out["roofline"] = roof
    out["memory"] = {"mlx_peak_bytes": max(peaks) if peaks else mx.get_peak_memory(),
                     "mlx_active_after_warmup_bytes": resident, "max_rss_bytes": max_rss_bytes()}
    if vlm.meta.get("target") == "cpu":  # after the memory figures: its buffer is not the model's
        bw = read_bandwidth_gbs()
        if bw:
            roof["read_bandwidth_gbs"] = bw
            roof["fraction_of_read_bandwidth"] = roof["implied_bandwidth_gbs"] / bw
    out["bench_s"] = time.perf_counter() - t_start
    return out


def run_context_bench(vlm: Any, contexts: Sequence[int], *, decode_tokens: int = 32,
                      log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Decode speed and KV memory at long contexts, in the model's planned KV layout.

    The caches are filled with random keys/values for ``context`` tokens (a prefill that
    long would take this CPU many minutes and computes nothing a decode step depends on
    but the cache's size and layout), then ``decode_tokens`` real decode steps run."""
    import mlx.core as mx
    from .runtime.step import Sequences

    say = log or (lambda _m: None)
    text = vlm.meta["text"]
    dtype = getattr(mx, vlm.meta.get("compute_dtype", "float32"))
    results = []
    for n in sorted({int(c) for c in contexts}):
        if n + decode_tokens + 1 > vlm.max_context:
            raise InputError(f"a {n}-token context and {decode_tokens + 1} decode steps need "
                             f"{n + decode_tokens + 1} tokens; the model's context is {vlm.max_context}: "
                             f"lower --context or --decode-tokens")
        mx.clear_cache()
        mx.reset_peak_memory()
        say(f"{_clock()} context {n}: filling the KV cache with random keys/values")
        seqs = Sequences.empty(vlm.decoder, 1, dtype)
        caches = seqs.caches
        for c in caches:
            for lo in range(0, n, 2048):
                m = min(2048, n - lo)
                shape = (1, text["num_kv_heads"], m, text["head_dim"])
                c.append(mx.random.normal(shape).astype(dtype), mx.random.normal(shape).astype(dtype))
                mx.eval([a for parts in c.buffers.values() for a in parts.values()])
            # room for the decode steps now: a context at a multiple of the cache's growth
            # step would otherwise copy the whole cache inside the timed steps
            c.reserve(decode_tokens + 1)
            mx.eval([a for parts in c.buffers.values() for a in parts.values()])
        kv_bytes = sum(c.nbytes for c in caches)
        token = mx.array([synthetic_ids(vlm.tokenizer, 1)[0]], dtype=mx.int32)
        seqs.next_pos[:] = n
        times = []
        for _ in range(decode_tokens + 1):
            t = time.perf_counter()
            token = mx.argmax(seqs.decode(token), axis=-1).astype(mx.int32)
            mx.eval(token)
            times.append(time.perf_counter() - t)
        dt = sum(times[1:])  # the first step compiles/warms
        r = {"context": n, "decode_tps": decode_tokens / dt, "ms_per_token": dt * 1e3 / decode_tokens,
             "kv_bytes": kv_bytes, "kv_bytes_per_token": kv_bytes / (n + decode_tokens + 1),
             "kv_plan_bytes_per_token": (vlm.kv_plan or {}).get("bytes_per_token"),
             "peak_memory_bytes": mx.get_peak_memory()}
        say(f"{_clock()}   {r['decode_tps']:.2f} tok/s, KV {kv_bytes / 2**20:.1f} MiB allocated, "
            f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB")
        results.append(r)
        del caches, seqs
    return results


def bench(src: str, *, dtype: str = "float32", log: Callable[[str], None] | None = None,
          kv: dict[str, Any] | None = None, contexts: Sequence[int] | None = None, draft: Any = None,
          num_draft_tokens: int = 4, **kwargs: Any) -> dict[str, Any]:
    """Load ``src`` (artifact, checkpoint or hub id, with KV-plan options ``kv``) and run
    :func:`run_bench` on it, or only :func:`run_context_bench` when ``contexts`` are given."""
    from .api import load
    info = system_info()
    t = time.perf_counter()
    vlm = load(src, dtype=dtype, progress=log is not None, draft=draft, num_draft_tokens=num_draft_tokens,
               **(kv or {}))
    load_s = time.perf_counter() - t
    result = {"source": str(src), "artifact": str(vlm.artifact.path), "name": vlm.artifact.manifest.get("name"),
              "dtype": vlm.artifact.manifest.get("dtype") or vlm.meta.get("dtype"), "target": vlm.meta.get("target"), "family": vlm.meta.get("family"),
              "load_s": load_s, "system": info, "kv_plan": vlm.kv_plan, "kv_options": kv or {}}
    if result["target"] == "cpu":
        from .kernels import cpu
        if cpu.available():  # which kernels the numbers come from (several-row GEMVs on AMX tiles or not)
            info["cpu_kernels"] = {"int8_activations": cpu.int8_activations(), "amx_mode": cpu.amx()}
    if contexts:
        result["contexts"] = run_context_bench(vlm, contexts, decode_tokens=kwargs.get("decode_tokens", 32), log=log)
        result["system"]["load_average_after"] = load_average()
        return result
    result.update(run_bench(vlm, log=log, speculation=vlm.speculation, **kwargs))
    result["system"]["load_average_after"] = load_average()
    return result


# ---------------------------------------------------------------------- report
def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB" if b >= 1e8 else f"{b / 1e6:.2f} MB"


def format_context_report(r: dict[str, Any]) -> str:
    plan = r.get("kv_plan") or {}
    lines = [f"vlmc bench --context: {r['source']} ({r.get('family')}, {r.get('dtype')}, {r['system']['device']}); "
             f"KV plan {plan.get('bytes_per_token', '?')} B/token = {plan.get('ratio_to_dense_bfloat16', '?')}x dense bf16",
             f"{'context':>8}{'tok/s':>10}{'ms/token':>10}{'KV MiB':>10}{'B/token':>10}{'peak GiB':>10}"]
    for c in r["contexts"]:
        lines.append(f"{c['context']:>8}{c['decode_tps']:>10.2f}{c['ms_per_token']:>10.1f}{c['kv_bytes'] / 2**20:>10.1f}"
                     f"{c['kv_bytes_per_token']:>10.0f}{c['peak_memory_bytes'] / 2**30:>10.2f}")
    return "\n".join(lines)


def format_report(r: dict[str, Any]) -> str:
    if "contexts" in r:
        return format_context_report(r)
    s = r["system"]
    la = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "n/a"  # noqa: E731
    lines = [f"vlmc bench: {r['source']}  ({r.get('family')}, {r.get('dtype')}, {s['device']}, "
             f"mlx {s['mlx']}, {s['cpu_count']} cpus)",
             f"load average: {la(s['load_average'])} before, {la(s.get('load_average_after'))} after | "
             f"load {r['load_s']:.1f} s, bench {r['bench_s']:.1f} s"
             + (f" (warm-up {r['warmup_s']:.1f} s)" if "warmup_s" in r else ""),
             "",
             f"{'':<8}{'tokens':>8}{'TTFT ms':>12}{'tok/s':>10}"]
    for p in r["prefill"]:
        lines.append(f"{'prefill':<8}{p['prompt_tokens']:>8}{p['ttft_ms']:>12.1f}{p['prompt_tps']:>10.1f}")
    d = r["decode"]
    lines.append(f"{'decode':<8}{d['tokens']:>8}{'':>12}{d['decode_tps']:>10.2f}   "
                 f"({d['ms_per_token']:.1f} ms/token after a {d['context']}-token prompt)")
    if "speculation" in d:
        sp = d["speculation"]
        lines.append(f"{'':<8}speculating with {sp['drafter']} (up to {sp['num_draft_tokens']} tokens): "
                     f"{sp['accepted']}/{sp['proposed']} drafted tokens accepted ({100 * sp['acceptance']:.0f}%), "
                     f"{sp['tokens_per_step']:.2f} tokens per step")
    if "image" in r:
        i = r["image"]
        rest = i["ttft_ms"] - i["preprocess_ms"] - i["encode_ms"]
        lines.append(f"{'image':<8}{i['prompt_tokens']:>8}{i['ttft_ms']:>12.1f}{'':>10}   "
                     f"({i['image_size']}x{i['image_size']}, {i['image_tokens']} image tokens: preprocess "
                     f"{i['preprocess_ms']:.1f} ms, vision {i['encode_ms']:.1f} ms, prefill+rest {rest:.1f} ms)")
    m, ro = r["memory"], r["roofline"]
    lines += ["",
              f"memory: MLX peak {_gb(m['mlx_peak_bytes'])} (active after the warm-up: "
              f"{_gb(m['mlx_active_after_warmup_bytes'])}), max RSS {_gb(m['max_rss_bytes'])}",
              f"roofline: {_gb(ro['decode_bytes_per_token'])} of weights read per decode token (decoder "
              f"{_gb(ro['decoder_bytes'])} + LM head {_gb(ro['lm_head_bytes'])}"
              f"{', tied to the embedding' if ro['lm_head_tied'] else ''}"
              + (f"; routed experts {_gb(ro['routed_expert_bytes'])} of {_gb(ro['all_expert_bytes'])}"
                 if "routed_expert_bytes" in ro else "") + "; KV cache "
              f"{ro['kv_bytes_per_token_at_context'] / 1e6:.1f} MB at {d['context']} tokens) x "
              f"{d['decode_tps']:.2f} tok/s = {ro['implied_bandwidth_gbs']:.2f} GB/s"
              + (f", {ro['fraction_of_read_bandwidth']:.0%} of the {ro['read_bandwidth_gbs']:.1f} GB/s this machine "
                 f"reads (C streaming sum, same run)" if "read_bandwidth_gbs" in ro else "")]
    if "cpu_kernels" in s:
        k = s["cpu_kernels"]
        lines.append(f"cpu kernels: int8 activations {'on' if k['int8_activations'] else 'off'}, AMX mode "
                     f"{k['amx_mode']} (0 off, 1 default, 2 every call of 2+ rows)")
    return "\n".join(lines)


# ---------------------------------------------------------------------- CLI
def write_json(path: Path, data: Any) -> None:
    """``--json PATH`` of every command: the data as JSON to PATH, or to stdout for '-'."""
    text = json.dumps(data, indent=1)
    if str(path) == "-":
        click.echo(text)
        return
    try:
        path.write_text(text + "\n")
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    click.echo(f"wrote {path}", err=True)


def _lengths(_ctx: Any, _param: Any, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}") from None
    if not out or min(out) < 1:
        raise click.BadParameter("give at least one prompt length, each >= 1")
    return out


@click.command("bench")
@click.argument("src")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="Weight dtype when SRC must be compiled first.")
@click.option("--prompt-lengths", default=None, callback=lambda c, p, v: _lengths(c, p, v) if v else None,
              help="Comma-separated prompt lengths (tokens) to time prefill at [default: "
                   f"{','.join(map(str, DEFAULT_PROMPT_LENGTHS))}, those the model's context holds].")
@click.option("--decode-tokens", default=32, show_default=True, type=click.IntRange(min=1),
              help="Decode steps to time (the first generated token is not one of them).")
@click.option("--decode-context", default=None, type=click.IntRange(min=1),
              help="Prompt length before the decode run (default: the shortest prompt length).")
@click.option("--image-size", default=448, show_default=True, type=click.IntRange(min=0),
              help="Side of the synthetic image for the one-image TTFT (0 skips it).")
@click.option("--runs", default=1, show_default=True, type=click.IntRange(min=1),
              help="Timed runs per measurement (medians are reported).")
@click.option("--warmup/--no-warmup", default=True, show_default=True, help="One untimed pass first.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default=None,
              help="Also write every number (and the machine's load) as JSON to this file ('-': stdout).")
@click.option("--quiet", is_flag=True, help="Print only the final table.")
@click.option("--context", "contexts", default=None, callback=lambda c, p, v: _lengths(c, p, v) if v else None,
              help="Comma-separated context lengths: instead of the default runs, decode tok/s and KV "
                   "memory with a cache filled to each length (random keys/values), e.g. 4096,16384,32768.")
@click.option("--prompt-lookup", is_flag=True, help="Decode speculating with prompt lookup.")
@click.option("--draft-model", default=None, help="Decode speculating with this draft model.")
@click.option("--num-draft-tokens", default=4, show_default=True, type=click.IntRange(1, 15))
@kv_flags
@exit_on_user_error
def bench_cmd(src: str, dtype: str, prompt_lengths: list[int] | None, decode_tokens: int, decode_context: int | None,
              image_size: int, runs: int, warmup: bool, json_path: Path | None, quiet: bool,
              contexts: list[int] | None, prompt_lookup: bool, draft_model: str | None, num_draft_tokens: int,
              **kv_kw) -> None:
    """Measure prefill and decode tok/s, one-image TTFT, peak memory and the decode roofline
    of SRC (an artifact, a checkpoint folder or a hub id); or, with --context, decode speed
    and KV memory at long contexts in the planned (or --kv-*) KV layout."""
    log = None if quiet else (lambda m: click.echo(m, err=True))
    if prompt_lookup and draft_model:
        raise InputError("give either --draft-model or --prompt-lookup, not both")
    draft = draft_model or ("prompt-lookup" if prompt_lookup else None)
    result = bench(src, dtype=dtype, log=log, kv=pop_kv(kv_kw), contexts=contexts, prompt_lengths=prompt_lengths,
                   draft=draft, num_draft_tokens=num_draft_tokens,
                   decode_tokens=decode_tokens, decode_context=decode_context, image_size=image_size, runs=runs,
                   warmup=warmup)
    click.echo(format_report(result), err=json_path is not None and str(json_path) == "-")
    if json_path is not None:
        write_json(json_path, result)
