"""Parity of compiled vlmc artifacts with transformers' PyTorch forward (the oracle).

Every family (Qwen2-VL, Qwen2.5-VL, LLaVA with CLIP and with SigLIP) is built as a tiny
random-weight checkpoint (``tests/fixtures/checkpoints.py``), compiled once per module,
and run on the same chats as transformers. For each case we require:

* the expanded prompt ids equal the transformers processor's ``input_ids``;
* pixel tensors within 1e-5 (Qwen: the flattened patches, and ``grid_thw`` equal);
* logits within 1e-4 (absolute; logits have std ~4) at the last prompt position and at
  each of the 16 greedy steps;
* the 16 greedy tokens identical.

Beyond the v5 checkpoints that ``save_pretrained`` writes, the same references must be
met by: v4 (hub) config layout with hub weight names, the in-memory "module" naming,
a sharded checkpoint with a safetensors index; a bfloat16-stored checkpoint (float32
artifact vs transformers on the upcast weights; bfloat16 artifact vs the float32 one);
ragged batches (left padding); and an artifact run with torch/transformers unimportable.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("mlx.core")

try:  # `python -m pytest` from the repo root puts the root on sys.path
    from tests.fixtures import checkpoints as ck
except ImportError:  # plain `pytest` (rootdir/tests on sys.path)
    from fixtures import checkpoints as ck

import parity_kit as kit  # noqa: E402
from parity_kit import CASES, GREEDY_STEPS, LOGIT_STEPS, ForcedSampler, run_vlmc  # noqa: E402

FAMILIES = [
    ("qwen2_vl", "default"),
    ("qwen2_5_vl", "default"),
    ("llava", "clip"),
    ("llava", "siglip"),
    ("llava", "llava15"),  # a Llama tokenizer whose post-processor adds the BOS the template leaves out
]
FAMILY_IDS = ["qwen2_vl", "qwen2_5_vl", "llava-clip", "llava-siglip", "llava-llava15"]
CASE_NAMES = list(CASES)
CASE = kit.Cases()
build_prompt = CASE.prompt

# Each checkpoint built, compiled and loaded once per module; HF models and references cached.
store = kit.store_fixture(
    "parity", build=ck.build_checkpoint, cases=CASE,
    hf=lambda info: (ck.hf_processor(info["path"], info["family"]), ck.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: ck.hf_reference(info["path"], info["family"], *a, logit_steps=LOGIT_STEPS, **kw))


def assert_parity(m, ref, case, family, what):
    """LLaVA's pixel tensor as it is, a Qwen processor's flattened patches and grids."""
    pixels = kit.check_same_pixels if family == "llava" else kit.check_patches
    kit.assert_parity(m, build_prompt(m, case), ref, what, pixels=pixels)


# --------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("family,variant", FAMILIES, ids=FAMILY_IDS)
def test_parity(store, family, variant, case):
    info = store.ckpt(family, variant=variant)
    ref = store.ref(info, case)
    m = store.vlm(info)
    if family != "llava" and case in ("wide", "tall"):
        (t, h, w), = ref["image_grid_thw"]
        assert h != w and (h > w) == (case == "tall"), ref["image_grid_thw"]
    if case == "two_images" and family != "llava":
        assert not np.array_equal(*ref["image_grid_thw"])
    assert_parity(m, ref, case, family, f"{family}-{variant}/{case}")


# (a) hub (v4) config layout + hub weight names; (a') the 4.52-4.57 "module" naming;
# (b) two shards + model.safetensors.index.json. Same seed -> same weights and tokenizer,
# so the v5 checkpoint's transformers references apply.
LAYOUTS = kit.LAYOUTS_AND_MODULE_NAMES


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family,variant", FAMILIES, ids=FAMILY_IDS)
def test_checkpoint_layouts(store, family, variant, layout):
    kw = LAYOUTS[layout]
    base, info = kit.layout_checkpoints(store, kw, family, variant=variant)
    if kw.get("layout") == "v4" and family != "llava":
        assert "text_config" not in info["config"]
    m = store.vlm(info)
    for case in CASE_NAMES:
        assert_parity(m, store.ref(base, case), case, family, f"{family}-{variant}/{layout}/{case}")


@pytest.mark.parametrize("family,variant", FAMILIES, ids=FAMILY_IDS)
def test_bfloat16_checkpoint(store, family, variant):
    """(c) bf16-stored weights: a float32 artifact matches transformers on the upcast
    weights; a bfloat16 artifact runs and mostly agrees with the float32 one."""
    info = store.ckpt(family, variant=variant, dtype="bfloat16")
    m32 = store.vlm(info)
    for case in ("text", "wide"):
        assert_parity(m32, store.ref(info, case), case, family, f"{family}-{variant}/bf16-ckpt/{case}")

    m16 = store.vlm(info, dtype="bfloat16")
    manifest = json.loads((store.artifact(info, dtype="bfloat16") / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert any(t["dtype"] == "bfloat16" for t in manifest["tensors"].values())
    for case in ("text", "wide"):
        t32, l32 = run_vlmc(m32, [build_prompt(m32, case)], logit_steps=GREEDY_STEPS)
        # Teacher-forced on the float32 artifact's greedy tokens, so one flipped choice
        # does not derail the rest of the comparison.
        _, l16 = run_vlmc(m16, [build_prompt(m16, case)], sampler=ForcedSampler(t32[0]), logit_steps=GREEDY_STEPS)
        l32, l16, t32 = l32[0], l16[0], t32[0]
        assert np.isfinite(l16).all()
        what = f"{family}-{variant}/bf16-artifact/{case}"
        # bf16 keeps ~3 significant digits; measured max |diff| 0.08-0.37 (logits std ~4)
        diff = np.abs(l16 - l32).max(-1)
        assert diff.max() < 0.5, f"{what}: max |logits diff| per step {diff.round(3)}"
        top2 = np.sort(l32, -1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        agree = l16.argmax(-1) == t32
        # a choice may flip only where float32's own top-2 margin is within bf16 noise
        assert agree[margin > 0.25].all(), f"{what}: flips at margins {margin[~agree].round(3)}"
        assert agree.sum() >= 14, f"{what}: bf16 argmax agrees on {agree.sum()}/16 steps"
        # Free-running greedy decoding is not compared token for token: this fixture's
        # float32 top-2 margin is 0.03 at step 3 of the qwen2_vl text prompt, so bf16
        # (like transformers in bf16) legitimately takes another path from there.
        t16_free, _ = run_vlmc(m16, [build_prompt(m16, case)])
        assert t16_free[0, 0] == t32[0]


BATCHES = {
    "image+short_text": ("two_images", "text"),
    "long_text+image": ("multi_turn", "text", "one_image"),
    "wide+tall": ("wide", "tall"),
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("family,variant", FAMILIES, ids=FAMILY_IDS)
def test_batched_matches_single(store, family, variant, batch):
    """(d) ragged batch: left padding, masks and per-sequence positions."""
    # ragged: every row padded differently; and therefore still transformers' numbers
    kit.check_batch_against_refs(store, store.ckpt(family, variant=variant), BATCHES[batch],
                                 f"{family}-{variant}/batch {batch}")


@pytest.mark.parametrize("family,variant", [FAMILIES[1], FAMILIES[3]], ids=[FAMILY_IDS[1], FAMILY_IDS[3]])
def test_runs_without_torch(store, family, variant, tmp_path):
    """(e) an artifact needs neither torch nor transformers: CLI and Python API in a fresh
    interpreter where importing them fails."""
    info = store.ckpt(family, variant=variant)
    art = store.artifact(info)
    m = store.vlm(info)
    img = ck.make_test_image(100, 70, seed=3)
    img_path = tmp_path / "img.png"
    img.save(img_path)
    expect = m.generate("hi", images=[str(img_path)], max_tokens=4)

    r = kit.run_blocked(f"""
        import runpy
        sys.argv = ["vlmc", "run", {str(art)!r}, "-p", "hi", "-i", {str(img_path)!r}, "--max-tokens", "4", "-v"]
        try:
            runpy.run_module("vlmc.cli", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    assert "blocked import" not in r.stderr
    assert r.stdout == expect.text + "\n"
    assert "generation:" in r.stderr and "finish:" in r.stderr, r.stderr

    r = kit.run_blocked(f"""
        import json, vlmc
        m = vlmc.load({str(art)!r})
        out = m.generate("hi", images=[{str(img_path)!r}], max_tokens=4)
        print(json.dumps({{"text": out.text, "ids": out.token_ids, "finish": out.finish_reason}}))
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ids"] == expect.token_ids and got["text"] == expect.text
    assert got["ids"] and got["finish"] in ("stop", "length")
