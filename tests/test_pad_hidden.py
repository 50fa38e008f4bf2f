"""pad_hidden: vision MLP hidden widths the quantization group does not divide are widened
with zeros, so their down projections quantize instead of staying float.

The tiny fixtures' vision MLPs are 64 wide; a group size of 128 makes them the case
(SigLIP-so400m's 4304 and Qwen2.5-VL's 3420 under groups of 64). Three shapes: SigLIP's
fc1 -> gelu_tanh -> fc2 (LLaVA-interleave fixture), Qwen2.5-VL's fused gate_up -> split
-> glu -> down, and the same with gate and up unfused.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from parity_kit import run_vlmc  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402
from vlmc.passes import pad_hidden as pad_mod  # noqa: E402

CASES = {  # name: (family, compile options, the padded down projection of vision layer 0)
    "siglip": ("llava", {}, "vision.encoder.layers.0.mlp.fc2.weight"),
    "glu_fused": ("qwen2_5_vl", {}, "vision.blocks.0.mlp.down_proj.weight"),
    "glu_unfused": ("qwen2_5_vl", {"no_fuse": ("gate_up",)}, "vision.blocks.0.mlp.down_proj.weight"),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("pad_hidden")
    out = {}
    for family in ("llava", "qwen2_5_vl"):
        ck.build_checkpoint(root / family, family)
        out[family] = root / family
    return root, out


def _image_prompt(m):
    return m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=3)])


def _shapes(art: Path) -> dict:
    return {k: v["shape"] for k, v in json.loads((art / "manifest.json").read_text())["tensors"].items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_widened_hidden_states_compute_the_same(ckpts, case, monkeypatch):
    """A float compile with the widening forced on gives the same logits as without it
    (the extra units are exact zeros), and its weights have the widened shapes."""
    root, paths = ckpts
    family, opts, down = CASES[case]
    plain = vlmc_compile(paths[family], root / f"{case}-plain", target="cpu", **opts)
    monkeypatch.setattr(pad_mod, "options_for", lambda quant: {"multiple": 128})
    padded = vlmc_compile(paths[family], root / f"{case}-padded", target="cpu", **opts)
    assert _shapes(plain)[down][-1] == 64 and _shapes(padded)[down][-1] == 128
    history = json.loads((padded / "manifest.json").read_text())["passes"]
    summary = next(h["summary"] for h in history if h["name"] == "pad_hidden")
    assert "64 -> 128" in summary, summary
    a, b = vlmc.load(plain), vlmc.load(padded)
    ta, la = run_vlmc(a, [_image_prompt(a)], steps=4)
    tb, lb = run_vlmc(b, [_image_prompt(b)], steps=4)
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_allclose(lb, la, rtol=0, atol=2e-5 * float(np.abs(la).max()))


@pytest.mark.parametrize("case", ["siglip", "glu_fused"])
def test_quantized_compile_quantizes_the_widened_projection(ckpts, case):
    """Under groups of 128 the down projection used to stay float (64 inputs); widened to
    128 it is quantized, and a q8 artifact still tracks float32."""
    from vlmc.quality import compare

    root, paths = ckpts
    family, opts, down = CASES[case]
    art = vlmc_compile(paths[family], root / f"{case}-q8", target="cpu", quantize="q8", group_size=128, **opts)
    manifest = json.loads((art / "manifest.json").read_text())
    assert down in manifest["quantized"], sorted(manifest["quantized"])[:8]
    assert not any(k.startswith(down) for k in manifest["meta"]["quantization"]["kept_float"])
    assert manifest["quantized"][down]["rel_error"] < 0.01
    base = vlmc.load(vlmc_compile(paths[family], root / f"{case}-plain", target="cpu", **opts))
    m = vlmc.load(art)
    report = compare(base, m, [_image_prompt(base)], steps=8)
    assert report.top1_agreement >= 0.9 and report.mean_kl < 0.02, report


def test_only_zero_preserving_activations_are_widened(ckpts):
    """sigmoid(0) = 0.5: a hidden state behind it cannot be widened with zeros."""
    from vlmc.frontend import open_checkpoint
    from vlmc.models import import_checkpoint

    _, paths = ckpts
    prog = import_checkpoint(open_checkpoint(paths["llava"]))
    bodies = [blk.body for blk in prog.blocks.values()] + list(prog.functions.values())
    acts = [op for fn in bodies for op in fn.ops if op.op == "act"]
    kinds = [op.attrs["kind"] for op in acts]
    assert acts
    for op in acts:
        op.attrs["kind"] = "sigmoid"
    out, summary = pad_mod.pad_hidden(prog.clone(), multiple=128)
    assert summary == "nothing to pad"
    for op, kind in zip(acts, kinds):
        op.attrs["kind"] = kind
    out, summary = pad_mod.pad_hidden(prog.clone(), multiple=128)
    assert "vision.encoder.layers.0.mlp.fc2.weight (x2) 64 -> 128" in summary, summary
    assert "projector.linear_2.weight 64 -> 128" in summary, summary
