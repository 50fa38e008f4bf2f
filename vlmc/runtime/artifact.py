"""Load a compiled artifact: manifest, weights, generated model, tokenizer, processor.

Needs only mlx, numpy, tokenizers, jinja2 and pillow (never torch or transformers).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..artifact_format import FORMAT_VERSION
from ..errors import ArtifactError
from ..kernels.quant import QuantWeight


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]
    model: Any                 # the generated Model instance
    processor_spec: dict[str, Any]
    generation: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest["meta"]

    @property
    def kv_layers(self) -> list[dict[str, Any]]:
        """The decoder layers' table entries with their planned KV caches (``kv``)."""
        plans = list((self.manifest.get("kv_plan") or {}).values())
        if plans:
            return plans[0]
        return [{"index": i, "kv": {"layout": "dense"}} for i in range(self.meta["text"]["num_layers"])]


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def reject_unfinished(path: str | Path) -> None:
    """Raise for a folder that holds artifact files but no manifest.json (written last): a
    compile that was killed. Without this it would be reported as a bad checkpoint folder."""
    p = Path(path).expanduser()
    if (p.is_dir() and not (p / "manifest.json").is_file() and not (p / "config.json").is_file()
            and ((p / "model.py").is_file() or any(p.glob("weights-*.safetensors")))):
        raise ArtifactError(f"{p} is an unfinished vlmc artifact (no manifest.json: its compile was "
                            f"interrupted); delete it and compile again")


def read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise ArtifactError(f"{path} is not a vlmc artifact (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath} is corrupt: {e}") from None
    if manifest.get("format") != "vlmc-artifact":
        raise ArtifactError(f"{path} is not a vlmc artifact")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path} has artifact format {manifest.get('format_version')}; this vlmc reads "
                            f"format {FORMAT_VERSION}: recompile it")
    return manifest


def cpu_widening(manifest: dict[str, Any]) -> dict[str, int]:
    """The quantized tensors the cpu target repacks at load into 4 or 8 bits (name -> bits;
    exact, and the artifact on disk stays compact): affine weights whose width the compiled
    kernels read faster as a wider copy (``cpu.load_width``: 2 and 3 bits always, 5 and 6
    unless read in place): the portable path would unpack such a weight a row at a time in
    every decode step."""
    if manifest.get("meta", {}).get("target") != "cpu" or os.environ.get("VLMC_CPU_KERNELS") == "0":
        return {}
    from ..kernels import cpu
    if not cpu.available():
        return {}
    out = {}
    for name, q in manifest.get("quantized", {}).items():
        if len(manifest["tensors"][name]["shape"]) != 2:
            continue  # stacked experts: read per expert at their stored width
        wider = cpu.load_width(q["bits"], q["group_size"]) if q["mode"] == "affine" else None
        if wider:
            out[name] = wider
    return out


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path).expanduser().resolve()
    manifest = read_manifest(path)
    params: dict[str, mx.array] = {}
    for fname in sorted({t["file"] for t in manifest["tensors"].values()}):
        fpath = path / fname
        if not fpath.is_file():
            raise ArtifactError(f"{path} is incomplete: weight shard {fname} is missing")
        try:
            params.update(mx.load(str(fpath)))
        except Exception as e:
            raise ArtifactError(f"cannot read {fpath}: {e}") from None
    for name, info in manifest["tensors"].items():
        arr = params.get(name)
        if arr is None or list(arr.shape) != info["shape"]:
            raise ArtifactError(f"{path} is corrupt: tensor {name} is missing or mis-shaped")
    widen_to = cpu_widening(manifest)
    for name, q in manifest.get("quantized", {}).items():
        params[name] = QuantWeight(params[name], params.pop(name + ".scales"), params.pop(name + ".biases", None),
                                   q["bits"], q["group_size"], q["mode"])
        if name in widen_to:
            from ..kernels import cpu  # widening happens on the cpu target only
            params[name] = cpu.widen(params[name], widen_to[name])
    module = _import_model(path)
    try:
        processor_spec = json.loads((path / "processor.json").read_text())
        generation = json.loads((path / "generation.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path} is incomplete: {e}") from None
    return Artifact(path, manifest, module.Model(params), processor_spec, generation)


def _import_model(path: Path):
    name = f"vlmc_artifact_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path / "model.py")
    if spec is None or spec.loader is None:
        raise ArtifactError(f"{path} has no model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
