"""Write a compiled artifact directory, atomically.

Everything goes into a hidden temp folder beside the destination; ``manifest.json`` is
written last, then the folder is renamed into place. A killed compile leaves only the
temp folder, which no loader accepts (no manifest, hidden name).

``write_artifact`` materializes every weight from the checkpoint, a block of rows at a time
(``encode``); ``write_replanned`` makes an artifact that differs from an existing one only
in its KV plan and lowering, sharing that artifact's weight shards (hard links, or copies
where links cannot be made).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..artifact_format import FORMAT_VERSION, SOURCE_FILES
from ..errors import ArtifactError
from ..ir.core import Param, Program
from ..ir.printer import format_program
from ..ir.serialize import to_json
from .codegen import generate_model_py
from .encode import stored_tensors, write_param
from .safetensors_io import ShardWriter

SHARD_BYTES = 2 << 30


def _plan_shards(params: list[Param]) -> list[list[Param]]:
    shards, cur, size = [], [], 0
    for p in params:
        if cur and size + p.nbytes > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += p.nbytes
    if cur:
        shards.append(cur)
    return shards


def write_artifact(prog: Program, out: Path, *, read: Callable, source_folder: Path, pre_plan: Program,
                   extra_files: dict[str, Any], target: str, progress: Callable | None = None) -> Path:
    """The compiled ``prog`` as an artifact folder: its weights materialized from the
    checkpoint (``read``), generated code, the checkpoint's tokenizer/template files,
    ``extra_files`` (name -> JSON data) and ``pre_plan`` (the program before KV planning
    and lowering) as program.json."""
    def weights(tmp: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        params = sorted(prog.params.values(), key=lambda p: p.name)
        shards = _plan_shards(params)
        tensors: dict[str, dict[str, Any]] = {}
        quant_report: dict[str, dict[str, Any]] = {}
        done = 0
        for si, shard in enumerate(shards):
            fname = f"weights-{si + 1:05d}-of-{len(shards):05d}.safetensors"
            writer = ShardWriter(tmp / fname, [t for p in shard for t in stored_tensors(p)])
            for p in shard:
                write_param(writer, p, read, quant_report)   # one block of rows at a time
                for name, shape, dtype in stored_tensors(p):
                    tensors[name] = {"file": fname, "shape": list(shape), "dtype": dtype,
                                     "role": p.role, "part": p.part}
                done += 1
                if progress:
                    progress(done, len(params), p.nbytes)
            writer.close()
        return tensors, quant_report

    def copy_sources(tmp: Path) -> list[str]:
        copied = []
        for name in SOURCE_FILES:
            if (source_folder / name).is_file():
                shutil.copyfile(source_folder / name, tmp / name)
                copied.append(name)
        for name, data in extra_files.items():
            (tmp / name).write_text(json.dumps(data, indent=1))
        return copied + list(extra_files)

    return _write(prog, out, pre_plan, target, weights, copy_sources)


def write_replanned(prog: Program, out: Path, *, base: Path, base_manifest: dict[str, Any],
                    pre_plan: Program) -> Path:
    """``prog`` (``pre_plan`` re-planned and lowered again) as an artifact that shares the
    weight shards and every other file of the artifact at ``base``."""
    generated = {"manifest.json", "model.py", "program.ir", "program.json"}

    def weights(tmp: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        for fname in sorted({t["file"] for t in base_manifest["tensors"].values()}):
            _link_or_copy(base / fname, tmp / fname)
        return base_manifest["tensors"], base_manifest.get("quantized", {})

    def copy_sources(tmp: Path) -> list[str]:
        names = [n for n in base_manifest.get("files", []) if n not in generated and (base / n).is_file()]
        for name in names:
            shutil.copyfile(base / name, tmp / name)
        return names

    return _write(prog, out, pre_plan, base_manifest["target"], weights, copy_sources,
                  replanned_from=str(base))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy is as good
        shutil.copyfile(src, dst)


def _write(prog: Program, out: Path, pre_plan: Program, target: str, weights: Callable, copy_sources: Callable,
           **extra_manifest: Any) -> Path:
    out = Path(out).expanduser().resolve()
    _check_destination(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ArtifactError(f"cannot create the artifact folder {out}: {_os_reason(e)}") from None
    try:
        tensors, quant_report = weights(tmp)
        (tmp / "model.py").write_text(generate_model_py(prog, __version__))
        (tmp / "program.ir").write_text(format_program(prog) + "\n")
        (tmp / "program.json").write_text(json.dumps(to_json(pre_plan)))
        copied = copy_sources(tmp)
        manifest = {
            "format": "vlmc-artifact", "format_version": FORMAT_VERSION, "vlmc_version": __version__,
            "name": prog.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "target": target, "dtype": prog.meta.get("dtype", "float32"),
            "source": prog.meta.get("source", {}), "passes": prog.history,
            "entry_points": list(prog.functions),
            # every decoder layer's cache in order (a hybrid decoder's blocks together), else
            # the attention block's layer table
            "kv_plan": ({"decoder": prog.meta["cache_layers"]} if prog.meta.get("cache_layers") else
                        {name: blk.layers for name, blk in prog.blocks.items()
                         if any(op.op == "cached_attention" for op in blk.body.ops)}),
            "meta": {k: v for k, v in prog.meta.items() if k != "source"},
            "files": sorted(copied + ["model.py", "program.ir", "program.json"]),
            "quantized": quant_report, "tensors": tensors, "param_bytes": prog.param_bytes(),
            "param_count": prog.param_count(), **extra_manifest,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _swap_into_place(tmp, out)
    except OSError as e:  # disk full, permissions, a vanished folder: nothing is left half-written
        shutil.rmtree(tmp, ignore_errors=True)
        raise ArtifactError(f"cannot write the artifact {out}: {_os_reason(e)}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_destination(out: Path) -> None:
    """Only an empty folder or an earlier vlmc artifact may be replaced; never a file or a
    folder of something else (a stray ``manifest.json`` does not make one an artifact)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} is a file; the artifact is a folder: pick another output path")
    if not any(out.iterdir()):
        return
    try:
        is_vlmc = json.loads((out / "manifest.json").read_text()).get("format") == "vlmc-artifact"
    except (OSError, ValueError, AttributeError):
        is_vlmc = False
    if not is_vlmc:
        raise ArtifactError(f"{out} exists and is not a vlmc artifact; refusing to overwrite it "
                            f"(pick another output folder, or remove it first)")


def _os_reason(e: OSError) -> str:
    if e.strerror and e.filename:
        return f"{e.strerror}: {e.filename}"
    return e.strerror or str(e)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
