"""checkpoint -> IR -> passes -> artifact, and the content-addressed compile cache."""
from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

from . import __version__
from .backends.artifact import FORMAT_VERSION, write_artifact
from .backends.codegen import CODEGEN_REVISION
from .backends.quantize import QUANT_REVISION
from .errors import PerformanceWarning, SourceError, VlmcError
from .frontend import Checkpoint, import_checkpoint, open_checkpoint
from .frontend.source import read_json
from .passes import PRESETS, run_passes
from .passes.dtype import FLOAT_DTYPES
from .passes.fuse import FUSIONS
from .passes.quantize import ACTIVATION_MODES, MICROSCALING, SCHEMES, auto_head, scheme_spec

TARGETS = ("cpu", "metal", "cuda")


def default_target() -> str:
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "metal"
    try:
        import mlx.core as mx
        if mx.cuda.is_available():  # type: ignore[attr-defined]
            return "cuda"
    except Exception:
        pass
    return "cpu"


def cache_dir() -> Path:
    return Path(os.environ.get("VLMC_CACHE", Path.home() / ".cache" / "vlmc")).expanduser()


def _options(dtype: str, target: str, preset: str, quantize: str | None, group_size: int, quantize_vision: bool,
             head: str, recipe: str, no_fuse: tuple[str, ...], fuse: tuple[str, ...] = (),
             quantize_activations: bool = False) -> dict[str, Any]:
    if dtype not in FLOAT_DTYPES:
        raise VlmcError(f"--dtype must be one of {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    if target not in TARGETS:
        raise VlmcError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if preset not in PRESETS:
        raise VlmcError(f"unknown pass preset {preset!r}; known: {', '.join(PRESETS)}")
    if quantize is not None and quantize not in SCHEMES:
        raise VlmcError(f"--quantize must be one of {', '.join(SCHEMES)}, got {quantize!r}")
    if head not in ("auto", "none") and head not in SCHEMES:
        raise VlmcError(f"--head must be auto, none or one of {', '.join(SCHEMES)}, got {head!r}")
    if recipe not in ("uniform", "mixed"):
        raise VlmcError(f"--recipe must be uniform or mixed, got {recipe!r}")
    if group_size not in (32, 64, 128):
        raise VlmcError(f"--group-size must be 32, 64 or 128, got {group_size}")
    if quantize_activations and quantize not in ACTIVATION_MODES:
        raise VlmcError(f"--quantize-activations needs --quantize {' or '.join(ACTIVATION_MODES)} "
                        f"(the block formats both operands of a matmul can take), got {quantize or 'none'}")
    if quantize_activations and target != "cuda":
        raise VlmcError("--quantize-activations is for --target cuda, where MLX's qqmm multiplies the two "
                        "quantized operands (an artifact for cuda also runs elsewhere, emulating it)")
    bad = (set(no_fuse) | set(fuse)) - set(FUSIONS)
    if bad:
        raise VlmcError(f"--fuse/--no-fuse take {', '.join(FUSIONS)}; got {', '.join(sorted(bad))}")
    return {"dtype": dtype, "target": target, "preset": preset, "quantize": quantize, "group_size": group_size,
            "quantize_vision": quantize_vision, "head": head, "recipe": recipe, "no_fuse": sorted(no_fuse),
            "fuse": sorted(fuse), **({"quantize_activations": True} if quantize_activations else {})}


def _pass_options(o: dict[str, Any]) -> dict[str, dict[str, Any]]:
    fusing = {"disable": o["no_fuse"]} if o["no_fuse"] else {}
    if o.get("fuse"):
        fusing["enable"] = o["fuse"]
    return {"fuse": fusing,
            "storage_dtype": {"dtype": o["dtype"]},
            "quantize": {"scheme": o["quantize"], "group_size": o["group_size"], "vision": o["quantize_vision"],
                         "head": o["head"], "recipe": o["recipe"],
                         "activations": o.get("quantize_activations", False)} if o["quantize"] else {},
            "lower": {"target": o["target"], "decode_layer": "decode_layer" not in o["no_fuse"]},
            "kv_layout": o.get("kv", {})}


def kv_options(**given: Any) -> dict[str, Any]:
    """The KV-plan options that differ from the defaults, checked early (a bad value is a
    user error before any weight is read)."""
    from .kvplan import requested_spec
    defaults = {"kv_quant_scheme": "uniform", "quantize_last": False}
    out = {k: v for k, v in given.items() if v is not None and defaults.get(k, None) != v}
    if given.get("kv_bits") is not None:
        requested_spec(float(given["kv_bits"]), given.get("kv_quant_scheme") or "uniform", given.get("kv_group_size"))
    for key in ("max_kv_size", "kv_memory_budget", "context"):
        if key in out and int(out[key]) < 1:
            raise VlmcError(f"{key.replace('_', '-')} must be a positive number, got {out[key]}")
    return out


def cache_key(ckpt: Checkpoint, options: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps({"fingerprint": ckpt.fingerprint, "options": options,
                                   "format": FORMAT_VERSION, "codegen": CODEGEN_REVISION, "quant": QUANT_REVISION,
                                   "vlmc": __version__},
                                  sort_keys=True).encode())
    return h.hexdigest()[:24]


def compile(src: str | os.PathLike, out: str | os.PathLike | None = None, *, dtype: str = "float32",
            target: str | None = None, preset: str = "default", quantize: str | None = None, group_size: int = 64,
            quantize_vision: bool = True, head: str = "auto", recipe: str = "uniform",
            no_fuse: tuple[str, ...] | list[str] = (), fuse: tuple[str, ...] | list[str] = (), kv_bits: float | None = None,
            kv_quant_scheme: str = "uniform", kv_group_size: int | None = None, max_kv_size: int | None = None,
            kv_memory_budget: int | None = None, kv_context: int | None = None, kv_quantize_last: bool = False,
            quantize_activations: bool = False, progress: bool = False) -> Path:
    """Compile a checkpoint folder or hub id. Without ``out`` the artifact goes to the
    compile cache and an existing one for the same source and options is reused.
    The ``kv_*`` / ``max_kv_size`` options plan the KV caches (``vlmc.kvplan``);
    ``quantize_activations`` (mxfp8/nvfp4, cuda target) rounds linear inputs to the weights' format."""
    options = _options(dtype, target or default_target(), preset, quantize, group_size, quantize_vision, head,
                       recipe, tuple(no_fuse), tuple(fuse), quantize_activations)
    _warn_slow_on_target(options)
    options["kv"] = kv_options(kv_bits=kv_bits, kv_quant_scheme=kv_quant_scheme, kv_group_size=kv_group_size,
                               max_kv_size=max_kv_size, kv_memory_budget=kv_memory_budget, context=kv_context,
                               quantize_last=kv_quantize_last)
    ckpt = open_checkpoint(src, progress=progress)
    if out is None:
        out = cache_dir() / "artifacts" / cache_key(ckpt, options)
        if (Path(out) / "manifest.json").is_file():
            return Path(out)
    prog = import_checkpoint(ckpt)
    names = PRESETS[preset]
    all_options = _pass_options(options)
    prog = run_passes(prog, names, {n: all_options[n] for n in names if n in all_options})
    prog.meta["target"] = options["target"]
    return write_artifact(prog, Path(out), read=ckpt.store.read, source_folder=ckpt.folder,
                          extra_files=_runtime_files(ckpt, prog.meta), target=options["target"],
                          progress=_progress_bar(prog) if progress else None)


def _warn_slow_on_target(options: dict[str, Any]) -> None:
    """Microscaling weights on the cpu target run through MLX's own quantized matmul: a
    Qwen2-VL-2B 8960x1536 decode GEMV measured 9.8 ms (mxfp4), 6.6 (nvfp4) and 27.3 (mxfp8)
    against 1.0 ms for q4 on vlmc's kernels. The artifact works; the user should know."""
    scheme, head = options["quantize"], options["head"]
    if scheme and head == "auto":
        head = auto_head(scheme_spec(scheme, options["group_size"]))
    slow = sorted({s for s in (scheme, head) if s in MICROSCALING})
    if options["target"] == "cpu" and slow:
        warnings.warn(f"{'/'.join(slow)} weights on the cpu target run through MLX's own quantized matmul, "
                      f"7-27x slower than vlmc's CPU kernels run q4/q8 (affine) weights; for --target cpu "
                      f"prefer -q q4 or q8", PerformanceWarning, stacklevel=3)


def _runtime_files(ckpt: Checkpoint, meta: dict[str, Any]) -> dict[str, Any]:
    """processor.json (the image preprocessing spec) and generation.json (stop ids, defaults)."""
    from .runtime.preprocess import spec_from_preprocessor_config
    pre = read_json(ckpt.folder / "preprocessor_config.json", required=False)
    if pre is None:
        raise SourceError(f"{ckpt.folder} has no preprocessor_config.json; vlmc needs it to prepare images")
    extra = {"tokens_per_image": meta["vision"]["tokens_per_image"]} if meta.get("processor_kind") == "clip" else {}
    spec = spec_from_preprocessor_config(pre, meta["processor_kind"], **extra)
    gen = read_json(ckpt.folder / "generation_config.json", required=False) or {}
    eos: list[int] = []
    for src in (gen.get("eos_token_id"), ckpt.config.get("eos_token_id"),
                (ckpt.config.get("text_config") or {}).get("eos_token_id")):
        for e in ([src] if isinstance(src, int) else (src or [])):
            if e not in eos:
                eos.append(int(e))
    defaults = {k: gen[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty") if k in gen}
    return {"processor.json": spec, "generation.json": {"eos_token_ids": eos, "defaults": defaults}}


def _progress_bar(prog):
    """Percent of weight bytes written, on one self-updating line (a final line when not a tty)."""
    total_bytes = prog.param_bytes()
    state = {"bytes": 0, "shown": -1}
    tty = sys.stderr.isatty()

    def report(done: int, total: int, nbytes: int) -> None:
        state["bytes"] += nbytes
        pct = int(100 * state["bytes"] / max(total_bytes, 1))
        if done == total:
            sys.stderr.write(f"{chr(13) if tty else ''}wrote {total} tensors, {total_bytes / 2**20:.1f} MiB\n")
        elif tty and pct != state["shown"]:
            sys.stderr.write(f"\rwriting weights {pct:3d}% ({done}/{total} tensors)")
        state["shown"] = pct
        sys.stderr.flush()
    return report
