"""IR, verifier, passes, codegen and compile cache: the compiler's own invariants."""
from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from fixtures.checkpoints import build_checkpoint
from vlmc import compiler
from vlmc.compiler import cache_dir, compile
from vlmc.frontend import open_checkpoint
from vlmc.models import import_checkpoint
from vlmc.ir.builder import FunctionBuilder
from vlmc.ir.core import Op, Program, TensorType
from vlmc.ir.ops import OPS, ShapeError
from vlmc.ir.printer import format_program
from vlmc.ir.verify import VerifyError, verify
from vlmc.kernels import reference
from vlmc.passes import PRESETS, run_passes


@pytest.fixture(scope="module")
def llava_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "llava_clip"
    build_checkpoint(path, "llava", variant="clip")
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "qwen2_vl"
    build_checkpoint(path, "qwen2_vl")
    return path


def test_every_op_has_a_reference_implementation():
    missing = [name for name in OPS if name != "call_block" and not callable(getattr(reference, name, None))]
    assert missing == []


@pytest.mark.parametrize("opname,inputs,attrs", [
    ("linear", [(2, 5, 8), (16, 8), (16,)], {}),
    ("reshape", [(2, 5, 16)], {"shape": [0, 0, 4, 4]}),
    ("reshape", [(12, 32)], {"shape": [-1, 4, 32]}),
    ("transpose", [(2, 5, 4, 3)], {"axes": [0, 2, 1, 3]}),
    ("split", [(6, 96)], {"sizes": [32, 32, 32], "axis": -1}),
    ("slice_axis", [(2, 7, 3)], {"axis": 1, "start": 1}),
    ("slice_axis", [(2, 7, 3)], {"axis": 1, "start": -1}),
    ("patchify", [(2, 3, 28, 28)], {"patch": 14}),
    ("prepend", [(2, 4, 8), (8,)], {}),
    ("rope_freqs", [(2, 5)], {"kind": "default", "dim": 8, "theta": 10000.0}),
    ("rope_freqs", [(3, 2, 5)], {"kind": "mrope", "dim": 16, "theta": 10000.0, "sections": [2, 3, 3]}),
    ("rope_freqs", [(6, 2)], {"kind": "axial2d", "dim": 16, "theta": 10000.0}),
    ("rope_freqs", [(6, 2)], {"kind": "axial2d_alternating", "dim": 16, "theta": 10000.0}),
    ("rope_freqs", [(2, 5)], {"kind": "yarn", "dim": 16, "theta": 1e6, "factor": 16.0, "original_max": 4096,
                              "attention_factor": 1.2}),
])
def test_shape_rules_agree_with_reference(opname, inputs, attrs):
    rng = np.random.default_rng(0)
    arrays = [mx.array(rng.standard_normal(s).astype(np.float32)) if opname != "rope_freqs"
              else mx.array(rng.integers(0, 9, s).astype(np.int32)) for s in inputs]
    outs = getattr(reference, opname)(*arrays, **attrs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    types = OPS[opname]([TensorType(tuple(s), "float32") for s in inputs], attrs)
    assert [tuple(t.shape) for t in types] == [tuple(o.shape) for o in outs]


def test_shape_rule_rejects_mismatch():
    with pytest.raises(ShapeError):
        OPS["linear"]([TensorType((2, 8), "float32"), TensorType((4, 7), "float32")], {})


def _tiny_program() -> Program:
    prog = Program("t")
    fb = FunctionBuilder("f", {"w": TensorType((4, 8), "float32")})
    x = fb.input("x", ("B", 8), "float32")
    y = fb.op("linear", x, fb.param("w"))
    prog.functions["f"] = fb.output(y)
    return prog


def test_verifier_catches_broken_programs(qwen):
    prog = import_checkpoint(open_checkpoint(qwen))
    verify(prog)
    bad = prog.clone()
    bad.functions["embed"].ops.insert(0, Op("no_such_op", [], ["%z"], {}))
    with pytest.raises(VerifyError, match="not in the op set"):
        verify(bad)
    bad = prog.clone()
    op = bad.functions["prefill"].ops[-1]
    op.inputs[0] = "%never_defined"
    with pytest.raises(VerifyError, match="before it is defined"):
        verify(bad)
    bad = prog.clone()
    del bad.params["text.layers.1.mlp.up_proj.weight"]
    with pytest.raises(VerifyError, match="missing"):
        verify(bad)
    bad = prog.clone()
    call = next(o for o in bad.functions["prefill"].ops if o.op == "call_block")
    call.attrs["stop"] = 99
    with pytest.raises(VerifyError, match="outside"):
        verify(bad)


def test_cleanup_drops_layers_after_the_llava_feature_layer(llava_clip):
    cfg = json.loads((llava_clip / "config.json").read_text())
    n_layers = cfg["vision_config"]["num_hidden_layers"]
    feature_layer = cfg["vision_feature_layer"]
    keep = feature_layer % (n_layers + 1)
    assert keep < n_layers, "fixture must select a hidden layer before the last"
    prog = import_checkpoint(open_checkpoint(llava_clip))
    assert len(prog.blocks["vision_layer"].layers) == n_layers
    out = run_passes(prog, ["cleanup"])
    assert len(out.blocks["vision_layer"].layers) == keep
    assert not any(n.startswith(f"vision.encoder.layers.{keep}.") for n in out.params)
    assert "removed" in out.history[0]["summary"]
    assert out.param_count() < prog.param_count()


def test_fold_transforms_collapses_reshapes(qwen):
    prog = import_checkpoint(open_checkpoint(qwen))
    p = prog.params["vision.patch_embed.proj.weight"]
    p.transforms = [("reshape", {"shape": [p.shape[0], -1]}), ("reshape", {"shape": list(p.shape)})]
    out = run_passes(prog, ["fold_transforms"])
    assert out.params["vision.patch_embed.proj.weight"].transforms == [("reshape", {"shape": list(p.shape)})]


def test_printer_shows_blocks_entries_and_per_layer_table(tmp_path):
    ck = tmp_path / "q25"
    build_checkpoint(ck, "qwen2_5_vl")
    text = format_program(run_passes(import_checkpoint(open_checkpoint(ck)), PRESETS["default"]))
    for name in ("entry vision_encode", "entry embed", "entry prefill", "entry decode", "block[",
                 "per-layer mask:", "cached_attention", "pass cleanup"):
        assert name in text
    assert len(text.splitlines()) < 200  # a whole model reads on a screen or two


def test_artifact_records_passes_and_tensors(qwen, tmp_path):
    art = compile(qwen, tmp_path / "art")
    manifest = json.loads((art / "manifest.json").read_text())
    assert [p["name"] for p in manifest["passes"]] == PRESETS["default"]
    assert manifest["entry_points"] == ["vision_encode", "embed", "prefill", "decode", "verify"]
    assert manifest["source"]["fingerprint"]
    assert all((art / t["file"]).is_file() for t in manifest["tensors"].values())
    assert not list(tmp_path.glob(".art.partial-*"))
    model_py = (art / "model.py").read_text()
    assert "def prefill(self" in model_py and "ops.cached_attention" in model_py


def test_bfloat16_artifact_stores_half_the_bytes(qwen, tmp_path):
    f32 = json.loads((compile(qwen, tmp_path / "f32") / "manifest.json").read_text())
    bf16 = json.loads((compile(qwen, tmp_path / "bf16", dtype="bfloat16") / "manifest.json").read_text())
    assert {t["dtype"] for t in bf16["tensors"].values()} == {"bfloat16"}
    assert bf16["param_bytes"] * 2 == f32["param_bytes"]


def test_compile_cache_reuses_artifacts(qwen, tmp_path, monkeypatch):
    monkeypatch.setenv("VLMC_CACHE", str(tmp_path / "cache"))
    first = compile(qwen)
    assert first.parent == cache_dir() / "artifacts"
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert compile(qwen) == first
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    assert compile(qwen, dtype="bfloat16") != first
    from vlmc.backends import codegen
    monkeypatch.setattr(compiler, "CODEGEN_REVISION", codegen.CODEGEN_REVISION + 1)  # newer generated code
    second = compile(qwen)
    assert second != first
    monkeypatch.setattr(compiler, "QUANT_REVISION", compiler.QUANT_REVISION + 1)  # newer quantized weights
    assert compile(qwen) not in (first, second)
