"""checkpoint -> IR -> passes -> artifact, the content-addressed compile cache, and the KV
re-plan of an existing artifact (``replan``: the plan and lowering passes run again on the
program the artifact saved before them; the weights are shared)."""
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
from .artifact_format import FORMAT_VERSION
from .backends.artifact import write_artifact, write_replanned
from .backends.codegen import CODEGEN_REVISION
from .backends.quantize import QUANT_REVISION
from .errors import ArtifactError, PerformanceWarning, SourceError
from .frontend import Checkpoint, open_checkpoint
from .frontend.source import read_json
from .ir.core import Program
from .ir.serialize import from_json
from .models import family, import_checkpoint
from .options import MICROSCALING_SCHEMES, CompileOptions, KVOptions
from .passes import PRESETS, run_passes
from .passes.manager import PLAN_PASSES
from .passes.quantize import auto_head, scheme_spec


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


def _revisions() -> dict[str, Any]:
    """Everything besides the source and the options that decides an artifact's bytes."""
    return {"format": FORMAT_VERSION, "codegen": CODEGEN_REVISION, "quant": QUANT_REVISION, "vlmc": __version__}


def cache_key(ckpt: Checkpoint, options: CompileOptions) -> str:
    h = hashlib.sha256(json.dumps({"fingerprint": ckpt.fingerprint, "options": options.key(), **_revisions()},
                                  sort_keys=True).encode())
    return h.hexdigest()[:24]


def compile(src: str | os.PathLike, out: str | os.PathLike | None = None, *, target: str | None = None,
            progress: bool = False, kv_bits: float | None = None, kv_quant_scheme: str = "uniform",
            kv_group_size: int | None = None, max_kv_size: int | None = None, kv_memory_budget: int | None = None,
            kv_context: int | None = None, kv_quantize_last: bool = False, **options: Any) -> Path:
    """Compile a checkpoint folder or hub id. Without ``out`` the artifact goes to the
    compile cache and an existing one for the same source and options is reused.

    Keyword options are ``vlmc.options.CompileOptions`` fields (dtype, quantize,
    group_size, quantize_vision, head, recipe, no_fuse, fuse, quantize_activations,
    preset) and ``KVOptions`` fields (kv_bits, kv_quant_scheme, kv_group_size,
    max_kv_size, kv_memory_budget, kv_context, kv_quantize_last)."""
    kv = KVOptions(kv_bits=kv_bits, kv_quant_scheme=kv_quant_scheme, kv_group_size=kv_group_size,
                   max_kv_size=max_kv_size, kv_memory_budget=kv_memory_budget, kv_context=kv_context,
                   kv_quantize_last=kv_quantize_last)
    opts = CompileOptions(target=target or default_target(), kv=kv, **options)
    return compile_with(src, out, opts, progress=progress)


def compile_with(src: str | os.PathLike, out: str | os.PathLike | None, options: CompileOptions, *,
                 progress: bool = False) -> Path:
    """``compile`` with its options already typed."""
    _warn_slow_on_target(options)
    ckpt = open_checkpoint(src, progress=progress)
    fam = family(ckpt.config.get("model_type"))
    if out is None:
        out = cache_dir() / "artifacts" / cache_key(ckpt, options)
        if (Path(out) / "manifest.json").is_file():
            return Path(out)
    prog = import_checkpoint(ckpt)  # (a checkpoint it cannot read fails here, before anything is said)
    if progress and Path(out).parent == cache_dir() / "artifacts":
        print(f"vlmc: compiling {src} into the cache {out} (once: later runs reuse it)", file=sys.stderr)
    names = PRESETS[options.preset]
    pass_options = options.pass_options()
    plan_names = [n for n in names if n in PLAN_PASSES]
    pre_plan = run_passes(prog, [n for n in names if n not in PLAN_PASSES],
                          {n: pass_options[n] for n in names if n in pass_options})
    prog = run_passes(pre_plan, plan_names, {n: pass_options[n] for n in plan_names})
    prog.meta["target"] = options.target
    return write_artifact(prog, Path(out), read=ckpt.store.read, source_folder=ckpt.folder, pre_plan=pre_plan,
                          extra_files=_runtime_files(ckpt, fam, prog.meta), target=options.target,
                          progress=_progress_bar(prog) if progress else None)


def replan(artifact: str | os.PathLike, kv: KVOptions | None = None, *, capture: list[int] | None = None) -> Path:
    """The artifact with its KV caches planned by ``kv`` instead (None: as the artifact
    planned them) and, with ``capture``, text entry points that also return the hidden states
    entering those decoder layers (the ``capture_hidden`` pass, for a drafter that reads
    them): the plan and lowering passes run again on its program.json (so fast paths follow
    the new layouts), the result is cached by content next to compiled artifacts, and the
    weights are shared."""
    base = Path(artifact).expanduser().resolve()
    manifest = json.loads((base / "manifest.json").read_text())
    if "program.json" not in manifest.get("files", []):
        raise ArtifactError(f"{base} has no program.json to re-plan its KV cache from: recompile it")
    if kv is None:  # the plan the artifact was made with
        recorded = next((h["options"] for h in manifest["passes"] if h["name"] == "kv_layout"), {})
        kv = KVOptions(**(recorded.get("options") or {}))
    lowered = next((h["options"] for h in manifest["passes"] if h["name"] == "lower"), None)
    base_id = hashlib.sha256((base / "manifest.json").read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps({"base": base_id, "kv": kv.changed(), "capture": capture, **_revisions()},
                                    sort_keys=True).encode()).hexdigest()[:24]
    out = cache_dir() / "artifacts" / f"replan-{key}"
    if (out / "manifest.json").is_file():
        return out
    pre_plan = from_json(json.loads((base / "program.json").read_text()))
    options: dict[str, Any] = {"kv_layout": {"options": kv, "target": manifest["target"]}}
    names = [n for n in PLAN_PASSES if n != "lower" or lowered is not None]
    if capture:
        names.insert(0, "capture_hidden")
        options["capture_hidden"] = {"layers": list(capture)}
    if lowered is not None:
        options["lower"] = lowered
    prog: Program = run_passes(pre_plan, names, options)
    prog.meta["target"] = manifest["target"]
    return write_replanned(prog, out, base=base, base_manifest=manifest, pre_plan=pre_plan)


def _warn_slow_on_target(options: CompileOptions) -> None:
    """Microscaling weights on the cpu target run through MLX's own quantized matmul, many
    times slower than vlmc's kernels on affine codes. The artifact works; the user should know."""
    scheme, head = options.quantize, options.head
    if scheme and head == "auto":
        head = auto_head(scheme_spec(scheme, options.group_size))
    slow = sorted({s for s in (scheme, head) if s in MICROSCALING_SCHEMES})
    if options.target == "cpu" and slow:
        warnings.warn(f"{'/'.join(slow)} weights on the cpu target run through MLX's own quantized matmul, "
                      f"7-27x slower than vlmc's CPU kernels run q4/q8 (affine) weights; for --target cpu "
                      f"prefer -q q4 or q8", PerformanceWarning, stacklevel=4)


def _runtime_files(ckpt: Checkpoint, fam, meta: dict[str, Any]) -> dict[str, Any]:
    """processor.json (the family's image preprocessing spec) and generation.json (stop ids, defaults)."""
    pre = read_json(ckpt.folder / "preprocessor_config.json", required=False)
    nested = read_json(ckpt.folder / "processor_config.json", required=False) or {}
    if pre is None:  # transformers 5 checkpoints may keep it in processor_config.json only
        pre = nested.get("image_processor")
    if pre is not None:
        spec = fam.processor_spec(pre, meta)
        # transformers' order: the nested video processor, its own file, the image config
        video_cfg = nested.get("video_processor") or read_json(ckpt.folder / "video_preprocessor_config.json",
                                                                required=False)
        video = fam.video_spec(pre if video_cfg is None else video_cfg, meta)
        if video is not None:
            spec["video"] = video
    elif meta.get("inputs", {}).get("image_token_id") is None:
        spec = {"kind": "none"}  # a text-only model: nothing to prepare
    else:
        raise SourceError(f"{ckpt.folder} has no preprocessor_config.json; vlmc needs it to prepare images")
    gen = read_json(ckpt.folder / "generation_config.json", required=False) or {}
    eos: list[int] = []
    for src in (gen.get("eos_token_id"), ckpt.config.get("eos_token_id"),
                (ckpt.config.get("text_config") or {}).get("eos_token_id")):
        for e in ([src] if isinstance(src, int) else (src or [])):
            if e not in eos:
                eos.append(int(e))
    # the sampling fields as the checkpoint states them (runtime.sampling.checkpoint_defaults reads them)
    defaults = {k: gen[k] for k in ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")
                if gen.get(k) is not None}
    return {"processor.json": spec, "generation.json": {"eos_token_ids": eos, "defaults": defaults}}


def _progress_bar(prog):
    """Weight bytes written, as a progress bar on a terminal (tqdm; nothing when stderr is
    a log, where a bar is noise). Made on the first write, after the destination is checked."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm
    state: dict[str, Any] = {}

    def report(done: int, total: int, nbytes: int) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=prog.param_bytes(), unit="B", unit_scale=True, unit_divisor=1024,
                                desc="writing weights", file=sys.stderr, leave=False)
        state["bar"].update(nbytes)
        if done == total:
            state["bar"].close()
    return report
