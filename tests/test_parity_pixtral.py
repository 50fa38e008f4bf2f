"""Mistral 3 (``mistral3``) and LLaVA with a Pixtral tower (``llava`` + ``pixtral``, as
Pixtral-12B ships) against transformers, and everything else a family must support, on the
tiny checkpoints of ``tests/fixtures/pixtral.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' PixtralProcessor (each
image as rows of ``[IMG]`` closed by ``[IMG_BREAK]`` / ``[IMG_END]``), pixels within 1e-5
(each image's packed patches against its crop of the processor's padded batch), float32
logits within 1e-4 at the last prompt position and at each of 16 greedy steps, the 16
greedy tokens identical; for both config layouts, both weight namings, sharded and
bfloat16 checkpoints, and ragged batches. Then: the image processor against
transformers' on more sizes and settings, the 2D rope op against PixtralVisionRotaryEmbedding,
the tower + patch merger against the model's image features, quantized weights and KV
caches, the prefix and vision caches, the batching loop, ``vlmc serve``, ``vlmc bench``,
speculative decoding and refused configs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import pixtral as px  # noqa: E402
from test_parity import (CASES, GREEDY_STEPS, IMG, LOGIT_ATOL, PIXEL_ATOL, ForcedSampler, _txt, _user,  # noqa: E402
                         check_outputs, run_vlmc)
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

FAMILIES = ("mistral3", "llava_pixtral")
CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
EXTRA_CASES = {
    "small": ([_user(IMG, _txt("What is this?"))], [(40, 30)]),
    "chat": ([{"role": "system", "content": "Answer briefly."}, _user(_txt("What is the weather today?")),
              {"role": "assistant", "content": [_txt("Sunny with a light wind.")]}, _user(_txt("And tomorrow?"))], []),
}
SEEDS = {"mistral3": 3, "llava_pixtral": 1}


def _case(name):
    messages, sizes = {**CASES, **EXTRA_CASES}[name]
    return messages, [ck.make_test_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]


class Store:
    """Checkpoints built, compiled and loaded once per module; transformers references cached."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpts, self.arts, self.models, self.hf, self.refs = {}, {}, {}, {}, {}

    def ckpt(self, family, **kw):
        kw = {"seed": SEEDS[family], **kw}
        key = (family, tuple(sorted(kw.items())))
        if key not in self.ckpts:
            name = "_".join([family] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            self.ckpts[key] = px.build_pixtral_checkpoint(self.root / "ckpt" / name, family, **kw)
        return self.ckpts[key]

    def artifact(self, info, **kw):
        kw = {"target": "cpu", **kw}
        key = (info["path"], tuple(sorted(kw.items())))
        if key not in self.arts:
            tag = "-".join(f"{k}{v}" for k, v in sorted(kw.items()))
            self.arts[key] = vlmc_compile(info["path"], self.root / "art" / f"{Path(info['path']).name}-{tag}", **kw)
        return self.arts[key]

    def vlm(self, info, **kw):
        art = self.artifact(info, **kw)
        if art not in self.models:
            self.models[art] = vlmc.load(art)
        return self.models[art]

    def hf_pair(self, info):
        if info["path"] not in self.hf:
            fam = info["family"]
            self.hf[info["path"]] = (px.hf_processor(info["path"], fam), px.hf_model(info["path"], fam))
        return self.hf[info["path"]]

    def ref(self, info, case):
        key = (info["path"], case)
        if key not in self.refs:
            proc, model = self.hf_pair(info)
            messages, images = _case(case)
            self.refs[key] = px.hf_reference(info["path"], info["family"], messages, images,
                                             greedy_steps=GREEDY_STEPS, processor=proc, model=model)
        return self.refs[key]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return Store(tmp_path_factory.mktemp("pixtral"))


def build_prompt(m, case):
    messages, images = _case(case)
    return m.build_prompt(messages=messages, images=images)


def check_pixels(images, theirs, sizes, merge):
    """Each image's packed patches against its (unpadded) crop of transformers' batch."""
    from vlmc.models.common.pixtral_processor import unpack_patches

    assert images.grid_thw.shape[0] == len(theirs) == len(sizes)
    lo = 0
    for (_, gh, gw), (h, w), full in zip(images.grid_thw.tolist(), sizes, theirs):
        assert (gh * px.PATCH, gw * px.PATCH) == (h, w)
        rows = images.pixel_values[lo:lo + gh * gw]
        lo += gh * gw
        np.testing.assert_allclose(unpack_patches(rows, gh, gw, px.PATCH, merge), full[:, :h, :w],
                                   rtol=0, atol=PIXEL_ATOL)
    assert lo == len(images.pixel_values)


def assert_parity(m, ref, case, what, family):
    p = build_prompt(m, case)
    np.testing.assert_array_equal(np.asarray(p.ids, dtype=np.int64), ref["input_ids"],
                                  err_msg=f"{what}: prompt ids differ from transformers' input_ids")
    if ref["pixel_values"] is None:
        assert p.images is None
    else:
        check_pixels(p.images, ref["pixel_values"], ref["image_sizes"].tolist(), px.merge_size(family))
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, what)


# ------------------------------------------------------------------------------ parity

PARITY = [(f, c) for f in FAMILIES for c in CASE_NAMES + ["small", "chat"]]


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{c}" for f, c in PARITY])
def test_parity(store, family, case):
    info = store.ckpt(family)
    assert_parity(store.vlm(info), store.ref(info, case), case, f"{family}/{case}", family)


def test_image_rows_in_the_prompt(store):
    """A 150x60 image under Mistral 3 (64-px longest edge, 16-px merged patches): 64x26 ->
    64x32 px, 2 rows of 4 [IMG] tokens, [IMG_BREAK] after the first, [IMG_END] after the
    last; a 40x30 image grows only to 48x32 (no resize to the longest edge); the sliding
    window is shorter than the prompts, so the rotating cache is exercised."""
    m = store.vlm(store.ckpt("mistral3"))
    tok = m.tokenizer
    p = build_prompt(m, "wide")
    assert p.images.grid_thw.tolist() == [[1, 4, 8]]
    text = tok.decode(p.ids, skip_special_tokens=False)
    assert "[IMG]" * 4 + "[IMG_BREAK]" + "[IMG]" * 4 + "[IMG_END]" in text
    assert build_prompt(m, "small").images.grid_thw.tolist() == [[1, 4, 6]]
    assert len(build_prompt(m, "two_images").ids) + GREEDY_STEPS > px.WINDOW
    assert {L["kv"]["layout"] for L in m.kv_layers} == {"rotating"}


LAYOUTS = {"v4_hub": dict(layout="v4"), "v4_sharded": dict(layout="v4", sharded=True),
           "v5_sharded": dict(sharded=True), "module_names": dict(naming="module")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_layouts(store, family, layout):
    """Same seed, other config layout / weight names / shards: the v5 checkpoint's references apply."""
    kw = LAYOUTS[layout]
    base, info = store.ckpt(family), store.ckpt(family, **kw)
    if kw.get("sharded"):
        assert len(info["weight_files"]) == 2 and (Path(info["path"]) / "model.safetensors.index.json").is_file()
    if kw.get("layout") == "v4":
        text, vision = info["config"]["text_config"], info["config"]["vision_config"]
        assert "rope_parameters" not in text and text["rope_theta"] == 100.0 and "rope_parameters" not in vision
    if kw.get("naming") == "module":
        assert any(n.startswith("model.language_model.") for n in info["weight_names_list"])
    m = store.vlm(info)
    for case in ("text", "two_images", "multi_turn"):
        assert_parity(m, store.ref(base, case), case, f"{family}/{layout}/{case}", family)


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_checkpoint(store, family):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt(family, dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    for case in ("text", "wide"):
        assert_parity(m32, store.ref(info, case), case, f"{family}/bf16-ckpt/{case}", family)
        t32, l32 = run_vlmc(m32, [build_prompt(m32, case)])
        _, l16 = run_vlmc(m16, [build_prompt(m16, case)], sampler=ForcedSampler(t32[0]))
        diff = np.abs(l16[0] - l32[0]).max(-1)
        assert np.isfinite(l16).all() and diff.max() < 0.5, f"{case}: {diff.round(3)}"
        top2 = np.sort(l32[0], -1)[:, -2:]
        agree = l16[0].argmax(-1) == t32[0]
        assert agree[top2[:, 1] - top2[:, 0] > 0.25].all()


BATCHES = [("two_images", "text"), ("multi_turn", "chat", "one_image"), ("wide", "small")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    info = store.ckpt("mistral3")
    m = store.vlm(info)
    prompts = [build_prompt(m, c) for c in batch]
    assert len({len(p.ids) for p in prompts}) == len(prompts)
    toks, logits = run_vlmc(m, prompts)
    for i, (case, p) in enumerate(zip(batch, prompts)):
        t1, l1 = run_vlmc(m, [p])
        np.testing.assert_array_equal(toks[i], t1[0], err_msg=f"{case} in batch {batch}")
        assert float(np.abs(logits[i] - l1[0]).max()) <= LOGIT_ATOL
        check_outputs(toks[i], logits[i], store.ref(info, case), f"mistral3/batch/{case}")


# ------------------------------------------------------------------------------ processor and tower pieces


@pytest.mark.parametrize("settings,merge", [
    ({}, 2), ({}, 1), ({"size": {"longest_edge": 100}, "resample": 2}, 2),
    ({"do_resize": False}, 2), ({"size": {"longest_edge": 30}}, 1),
], ids=["default", "no-merge", "bilinear-100", "no-resize", "tiny-edge"])
def test_processor_matches_transformers(settings, merge):
    """Resized sizes and pixels equal PixtralImageProcessorPil's (given the patch size times
    the merge, as PixtralProcessor does) for many image sizes: portrait, landscape, smaller
    than the edge (rounded up only), larger (scaled down, floored, rounded up), odd sizes,
    RGBA and greyscale inputs."""
    from PIL import Image
    from vlmc.errors import InputError
    from vlmc.models.common.processors import make_image_processor, spec_from_preprocessor_config

    pp = {k: v for k, v in px.preprocessor_config().items() if k not in ("image_processor_type", "processor_class")}
    pp.update(settings)
    theirs = px.hf_image_processor(**settings)
    mine = make_image_processor(spec_from_preprocessor_config(pp, "pixtral", merge_size=merge))
    factor = px.PATCH * merge
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (65, 63), (30, 200), (200, 30), (113, 169), (16, 16), (1, 1), (640, 480), (17, 33)]
    sizes += [tuple(int(v) for v in rng.integers(1, 300, 2)) for _ in range(6)]
    if settings.get("do_resize") is False:
        sizes = [(48, 32), (16, 64)]
    for w, h in sizes:
        img = ck.make_test_image(w, h, seed=w * 7 + h)
        for im in (img, img.convert("RGBA"), img.convert("L")):
            want = theirs(images=[im], return_tensors="np", patch_size={"height": factor, "width": factor})
            got = mine.process([im])
            check_pixels(got, want["pixel_values"], want["image_sizes"].tolist(), merge)
            (_, gh, gw), = got.grid_thw.tolist()
            assert got.num_tokens == [gh * gw // merge ** 2] == [mine.num_tokens_for(h, w)]
    if settings.get("do_resize") is False:
        with pytest.raises(InputError, match="not a multiple"):
            mine.process([ck.make_test_image(40, 30)])
    with pytest.raises(InputError, match="zero size"):
        mine.process([Image.new("RGB", (0, 5))])
    with pytest.raises(InputError, match="aspect ratio"):
        make_image_processor(spec_from_preprocessor_config({**pp, "do_resize": True}, "pixtral")).process(
            [Image.new("RGB", (5000, 1))])


@pytest.mark.parametrize("head_dim,theta", [(16, 10000.0), (64, 10000.0), (8, 100.0)])
def test_axial_rope_matches_pixtral_rotary_embedding(head_dim, theta):
    """rope_freqs kind axial2d_alternating + rope: PixtralVisionRotaryEmbedding's cos/sin and
    apply_rotary_pos_emb on queries of patches of two grids, in both op libraries."""
    import transformers as tf
    from transformers.models.pixtral.modeling_pixtral import PixtralVisionRotaryEmbedding, apply_rotary_pos_emb
    from vlmc.kernels import cpu_ops, reference
    from vlmc.models.common.pixtral_inputs import patch_positions

    cfg = tf.PixtralVisionConfig(hidden_size=head_dim * 2, num_attention_heads=2,
                                 rope_parameters={"rope_type": "axial", "rope_theta": theta})
    emb = PixtralVisionRotaryEmbedding(cfg)
    pos = patch_positions(np.array([[1, 6, 4], [1, 40, 32]]), 2)
    q = torch.randn(1, 2, len(pos), head_dim, generator=torch.Generator().manual_seed(head_dim))
    with torch.no_grad():
        cos_t, sin_t = emb(q, torch.from_numpy(pos.astype(np.int64)))
        want, _ = apply_rotary_pos_emb(q, q, cos_t, sin_t, unsqueeze_dim=0)
    for ops in (reference, cpu_ops):
        cos, sin = ops.rope_freqs(mx.array(pos), kind="axial2d_alternating", dim=head_dim, theta=theta)
        np.testing.assert_allclose(np.asarray(cos)[:, 0], cos_t.numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(sin)[:, 0], sin_t.numpy(), rtol=0, atol=1e-6)
        x = mx.array(q[0].permute(1, 0, 2).numpy())  # [S, heads, hd], as the packed tower holds it
        got = np.asarray(ops.result(ops.rope(x, cos, sin))).transpose(1, 0, 2)
        np.testing.assert_allclose(got, want[0].numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("params", [
    px.YARN, {**px.YARN, "mscale_all_dim": 0.5}, {k: v for k, v in px.YARN.items() if not k.startswith("mscale")},
    {**px.YARN, "factor": 8.0, "beta_fast": 16.0, "truncate": False, "rope_theta": 1e6},
], ids=["ministral", "mscale-ratio", "mscale-from-factor", "untruncated"])
def test_yarn_rope_matches_ministral3_rotary_embedding(params):
    """rope_freqs kind yarn (with text_config's attributes): Ministral3RotaryEmbedding's
    cos/sin (attention factor included) at positions up to 70000, in both op libraries;
    Llama 4 query scaling caps the context at the original positions."""
    import transformers as tf
    from transformers.models.ministral3.modeling_ministral3 import Ministral3RotaryEmbedding
    from vlmc.kernels import cpu_ops, reference
    from vlmc.models.common.text_config import text_config

    cfg = tf.Ministral3Config(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=65536,
                              rope_parameters=dict(params))
    emb = Ministral3RotaryEmbedding(cfg)
    pos = torch.tensor([[0, 1, 5, 100, 4095, 4096, 9000, 70000]])
    with torch.no_grad():
        cos_t, sin_t = emb(torch.zeros(1, 8, 16), pos)
    tc = text_config({"text_config": cfg.to_dict()}, nested=True)
    assert tc.rope_kind == "yarn" and tc.max_position_embeddings == 4096
    for ops in (reference, cpu_ops):
        cos, sin = ops.rope_freqs(mx.array(pos.numpy().astype(np.int32)), kind="yarn", dim=16,
                                  theta=tc.rope_theta, **tc.rope_attrs)
        np.testing.assert_allclose(np.asarray(cos)[:, 0], cos_t.numpy(), rtol=0, atol=2e-5)
        np.testing.assert_allclose(np.asarray(sin)[:, 0], sin_t.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("layout", ["v5", "v4"])
def test_ministral3_decoder(store, layout):
    """Mistral 3 with Ministral 3's decoder (YaRN rope, Llama 4 query scaling): parity with
    transformers in both config layouts (v4: ``rope_scaling`` with ``type`` yarn)."""
    base = store.ckpt("mistral3", text="ministral3")
    info = base if layout == "v5" else store.ckpt("mistral3", text="ministral3", layout="v4")
    if layout == "v4":
        assert info["config"]["text_config"]["rope_scaling"]["type"] == "yarn"
    m = store.vlm(info)
    assert m.meta["text"]["max_position_embeddings"] == 4096
    for case in ("text", "two_images", "multi_turn"):
        assert_parity(m, store.ref(base, case), case, f"ministral3/{layout}/{case}", "mistral3")


@pytest.mark.parametrize("family", FAMILIES)
def test_image_features_match_transformers(store, family):
    """The compiled vision_encode (tower, and Mistral 3's norm + patch merger + projector)
    against the model's get_image_features on two images of different sizes."""
    info = store.ckpt(family)
    proc, model = store.hf_pair(info)
    m = store.vlm(info)
    images = [ck.make_test_image(150, 100, seed=1), ck.make_test_image(40, 64, seed=2)]
    factor = px.PATCH * px.merge_size(family)  # PixtralProcessor's patch size for its image processor
    batch = proc.image_processor(images=images, return_tensors="pt", patch_size={"height": factor, "width": factor})
    with torch.no_grad():
        kw = {} if family == "mistral3" else {"vision_feature_select_strategy": "full"}
        feats = model.model.get_image_features(batch["pixel_values"], image_sizes=batch["image_sizes"],
                                               vision_feature_layer=-1, **kw).pooler_output
    want = torch.cat(list(feats)).numpy()
    got = np.array(m.encode_images(m.inputs.preprocess(images)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------ quantization, caches


def _quality_prompts(m):
    return [m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=10)]),
            m.build_prompt("Tell me a short story about the river.")]


def test_quantized_kv_caches(store):
    """Every KV layout on Mistral 3's windowed layers: 8-bit codes track float32 (top-1 >=
    0.9, mean KL < 0.02); coarser codes cost more, never less. The cpu decode_layer fast
    path serves the unwindowed Mistral layers of the LLaVA checkpoint (it reads no
    rotating caches)."""
    from vlmc.quality import compare

    assert "decode_layer" in (store.artifact(store.ckpt("llava_pixtral")) / "model.py").read_text()
    info = store.ckpt("mistral3")
    art = store.artifact(info)
    base = store.vlm(info)
    prompts = _quality_prompts(base)
    kls = []
    for kw in ({"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}):
        m = vlmc.load(art, **kw, kv_quantize_last=True)
        report = compare(base, m, prompts, steps=16)
        kls.append(report.mean_kl)
        if kw["kv_bits"] == 8:
            assert report.top1_agreement >= 0.9 and report.mean_kl < 0.02, report
        assert report.mean_kl < 1.5, (kw, report)
    assert kls == sorted(kls), kls


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights(store, family):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more;
    the tower and projector are quantized too."""
    from vlmc.quality import compare

    info = store.ckpt(family)
    base = store.vlm(info)
    prompts = _quality_prompts(base)
    q8 = compare(base, store.vlm(info, quantize="q8"), prompts, steps=16)
    q4 = compare(base, store.vlm(info, quantize="q4"), prompts, steps=16)
    assert q8.top1_agreement >= 0.9 and q8.mean_kl < 0.02, q8
    assert q8.mean_kl < q4.mean_kl < 1.5, q4
    manifest = json.loads((store.artifact(info, quantize="q4") / "manifest.json").read_text())
    assert any(k.startswith("text.layers.0.") for k in manifest["quantized"])
    assert any(k.startswith("vision.transformer.") for k in manifest["quantized"])


def _run_jobs(batcher, jobs, timeout=180):
    import threading

    from vlmc.runtime.batcher import Job, TokenEvent

    tokens, finish, done = [[] for _ in jobs], [None] * len(jobs), threading.Event()

    def emit(i):
        def on_event(ev):
            if isinstance(ev, TokenEvent):
                tokens[i].append(ev.token)
            else:
                finish[i] = ev
                if all(f is not None for f in finish):
                    done.set()
        return on_event

    for i, kw in enumerate(jobs):
        batcher.submit(Job(emit=emit(i), **kw))
    assert done.wait(timeout), "jobs did not finish"
    return tokens, finish


def _turn(m, image, question):
    return m.build_prompt(messages=[
        _user(IMG, _txt("What is in the image?")),
        {"role": "assistant", "content": [_txt("A red square and a blue circle.")]},
        _user(_txt(question))], images=[image])


def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store):
    """A second turn over the same image reuses the first's blocks (all the image's rows); another
    image behind the same ids reuses nothing past the image's start."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    m = store.vlm(store.ckpt("llava_pixtral"))
    one, two = ck.make_test_image(120, 90, seed=10), ck.make_test_image(120, 90, seed=11)
    prompts = [_turn(m, one, "How many shapes are there?"), _turn(m, one, "Describe the image."),
               _turn(m, two, "Describe the image.")]
    plain, cached = Batcher(m), Batcher(m, prefix_cache=PrefixCache(block_size=8))
    try:
        ref = [_run_jobs(plain, [dict(prompt=p, max_tokens=12)])[0] for p in prompts]
        got = [_run_jobs(cached, [dict(prompt=p, max_tokens=12)]) for p in prompts]
    finally:
        plain.shutdown()
        cached.shutdown()
    assert [g[0] for g in got] == ref
    hits = [g[1][0].cached_tokens for g in got]
    ids = prompts[1].ids
    last_image = len(ids) - ids[::-1].index(m.image_token_id)
    assert hits[0] == 0 and hits[1] >= last_image and hits[2] <= ids.index(m.image_token_id)


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests give one-at-a-time outputs; the vision
    cache serves a repeated image."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.vision_cache import VisionFeatureCache

    m = store.vlm(store.ckpt("mistral3"))
    a, b = ck.make_test_image(100, 70, seed=10), ck.make_test_image(40, 30, seed=11)
    prompts = [m.build_prompt("Describe the picture.", images=[a]), m.build_prompt("Tell me about shapes"),
               m.build_prompt("What is on the left side?", images=[b]), m.build_prompt("Compare them.", images=[a, b]),
               m.build_prompt("circle square " * 20)]
    jobs = [dict(prompt=p, max_tokens=6 + 3 * i) for i, p in enumerate(prompts)]
    vision = VisionFeatureCache()
    batcher = Batcher(m, max_batch=8, prefill_chunk=16, vision_cache=vision)
    try:
        alone = [_run_jobs(batcher, [j])[0][0] for j in jobs]
        together, _ = _run_jobs(batcher, jobs * 2)
    finally:
        batcher.shutdown()
    assert together == alone * 2
    assert batcher.counters["decode_steps"] < batcher.counters["batched_tokens"]
    assert vision.hits >= 4 and vision.misses == 2
    for p, toks in zip(prompts[:2], alone):
        t, _ = run_vlmc(m, [p], steps=len(toks))
        assert t[0].tolist() == toks


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts (and with the model drafting for itself) is
    the output without them, across the sliding window."""
    m = store.vlm(store.ckpt("mistral3"))
    image = ck.make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        plain = m.generate(max_tokens=24, **case)
        for draft in ("prompt-lookup", m):
            assert m.generate(max_tokens=24, draft=draft, **case).token_ids == plain.token_ids, (draft, case)


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_image_chats(store):
    """Both families behind one `vlmc serve`: an image chat answers what the Python API
    generates for the same messages."""
    import io

    from serve_helpers import LiveServer, data_uri, image_message

    infos = [store.ckpt(f) for f in FAMILIES]
    buf = io.BytesIO()
    ck.make_test_image(100, 70, seed=10).save(buf, format="PNG")
    messages = image_message("Describe the picture.", data_uri(buf.getvalue()))
    server = LiveServer(*(str(store.artifact(i)) for i in infos))
    try:
        ids = [m["id"] for m in json.loads(server.get("/v1/models")[2])["data"]]
        assert len(ids) == 2
        for info, model_id in zip(infos, ids):
            status, body = server.post("/v1/chat/completions", {"model": model_id, "messages": messages,
                                                                 "temperature": 0, "max_tokens": 8})
            assert status == 200, body
            want = store.vlm(info).generate(messages=messages, max_tokens=8, temperature=0)
            assert body["choices"][0]["message"]["content"] == want.text.strip()
            assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    finally:
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_smoke(store, family):
    from vlmc.bench import bench, format_report

    r = bench(str(store.artifact(store.ckpt(family))), prompt_lengths=[8], decode_tokens=4, image_size=64, runs=1)
    name = "mistral3" if family == "mistral3" else "llava"
    assert r["family"] == name and r["decode"]["decode_tps"] > 0 and "image" in r
    assert name in format_report(r)


@pytest.mark.parametrize("family,change,message", [
    ("mistral3", ("config.json", {"vision_feature_layer": [-1, -2]}), "must be one layer"),
    ("mistral3", ("config.json", {"vision_config": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}}),
     "rope type 'yarn'"),
    ("mistral3", ("config.json", {"vision_config": {"num_attention_heads": 16}}), "multiple of 4"),
    ("mistral3", ("config.json", {"text_config": {"model_type": "gpt2"}}), "'gpt2' is not supported"),
    ("mistral3", ("preprocessor_config.json", {"size": {"height": 10, "width": 10}}), "longest_edge"),
    ("llava_pixtral", ("config.json", {"vision_feature_select_strategy": "default"}), "'full'"),
])
def test_configs_vlmc_cannot_honour_are_refused(store, tmp_path, family, change, message):
    import shutil

    from vlmc.errors import VlmcError

    src = tmp_path / "ck"
    shutil.copytree(store.ckpt(family)["path"], src)
    name, patch = change
    cfg = json.loads((src / name).read_text())
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key != "size" else value
    (src / name).write_text(json.dumps(cfg))
    with pytest.raises(VlmcError, match=message):
        vlmc_compile(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_literal_image_tokens_in_text_are_refused(store):
    from vlmc.errors import InputError

    m = store.vlm(store.ckpt("mistral3"))
    img = ck.make_test_image(64, 64, seed=3)
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("[IMG] what is this?", images=[img])
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("[IMG] what is this?")


def test_registry_lists_the_family(tmp_path):
    """The registry finds the folder: mistral3 is compiled, and an unknown model type's error
    lists it among the supported ones."""
    from vlmc.errors import UnsupportedModelError
    from vlmc.models import family, supported_model_types

    assert "mistral3" in supported_model_types() and family("mistral3").name == "mistral3"
    with pytest.raises(UnsupportedModelError, match="mistral3"):
        family("pixtral")


def test_runs_without_torch(store, tmp_path):
    """The artifact's runtime half (the Pixtral processor, row expansion and vision plan)
    needs neither torch nor transformers: the Python API in a fresh interpreter where
    importing them fails gives the same tokens."""
    import os
    import subprocess
    import sys
    import textwrap

    from test_parity import _BLOCKER, REPO_ROOT

    art = store.artifact(store.ckpt("mistral3"))
    img_path = tmp_path / "img.png"
    ck.make_test_image(100, 70, seed=3).save(img_path)
    expect = store.vlm(store.ckpt("mistral3")).generate("hi", images=[str(img_path)], max_tokens=6)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    api = _BLOCKER + textwrap.dedent(f"""
        import json, vlmc
        out = vlmc.load({str(art)!r}).generate("hi", images=[{str(img_path)!r}], max_tokens=6)
        print(json.dumps(out.token_ids))
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", api], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == expect.token_ids


def test_head_without_a_tie_setting(store, tmp_path):
    """A config that names no tie_word_embeddings anywhere: the checkpoint's own LM head is
    used when it has one (the references hold), the embeddings otherwise."""
    import shutil

    info = store.ckpt("mistral3", layout="v4")
    src = tmp_path / "ck"
    shutil.copytree(info["path"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("tie_word_embeddings", None)
    cfg["text_config"].pop("tie_word_embeddings", None)
    (src / "config.json").write_text(json.dumps(cfg))
    m = vlmc.load(vlmc_compile(src, tmp_path / "art"))
    assert_parity(m, store.ref(store.ckpt("mistral3"), "text"), "text", "mistral3/no-tie-setting", "mistral3")
