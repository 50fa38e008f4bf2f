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

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import pixtral as px  # noqa: E402
from parity_kit import GREEDY_STEPS, PIXEL_ATOL  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

FAMILIES = ("mistral3", "llava_pixtral")
CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
CASES = kit.Cases(small=kit.SMALL, chat=kit.CHAT)
build_prompt = CASES.prompt
SEEDS = {"mistral3": 3, "llava_pixtral": 1}

store = kit.store_fixture(
    "pixtral", build=px.build_pixtral_checkpoint, cases=CASES, defaults=lambda family: {"seed": SEEDS[family]},
    hf=lambda info: (px.hf_processor(info["path"], info["family"]), px.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: px.hf_reference(info["path"], info["family"], *a, **kw))


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
    def pixels(p, ref):
        check_pixels(p.images, ref["pixel_values"], ref["image_sizes"].tolist(), px.merge_size(family))
    kit.assert_parity(m, build_prompt(m, case), ref, what, pixels=pixels)


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


LAYOUTS = {**kit.LAYOUTS, "module_names": dict(naming="module")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_layouts(store, family, layout):
    """Same seed, other config layout / weight names / shards: the v5 checkpoint's references apply."""
    kw = LAYOUTS[layout]
    base, info = kit.layout_checkpoints(store, kw, family)
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
        kit.check_bf16_artifact(m32, m16, lambda m: build_prompt(m, case), case)


BATCHES = [("two_images", "text"), ("multi_turn", "chat", "one_image"), ("wide", "small")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    kit.check_batch_against_refs(store, store.ckpt("mistral3"), batch, "mistral3/batch")


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


def test_quantized_kv_caches(store):
    """Every KV layout on Mistral 3's windowed layers: 8-bit codes track float32 (top-1 >=
    0.9, mean KL < 0.02); coarser codes cost more, never less. The cpu decode_layer fast
    path serves the unwindowed Mistral layers of the LLaVA checkpoint (it reads no
    rotating caches)."""
    assert "decode_layer" in (store.artifact(store.ckpt("llava_pixtral")) / "model.py").read_text()
    info = store.ckpt("mistral3")
    kit.check_quantized_kv_caches(store.vlm(info), store.artifact(info))


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_weights(store, family):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more;
    the tower and projector are quantized too."""
    kit.check_quantized_weights(store, store.ckpt(family), ("vision.transformer.",))


def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store):
    """A second turn over the same image reuses the first's blocks (all the image's rows); another
    image behind the same ids reuses nothing past the image's start."""
    m = store.vlm(store.ckpt("llava_pixtral"))
    kit.check_prefix_cache_reuses_the_image(m)


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests give one-at-a-time outputs; the vision
    cache serves a repeated image."""
    kit.check_batching_loop_with_images_and_text(store.vlm(store.ckpt("mistral3")), second_image=(40, 30))


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts (and with the model drafting for itself) is
    the output without them, across the sliding window."""
    kit.check_speculation_is_lossless(store.vlm(store.ckpt("mistral3")))


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_image_chats(store):
    """Both families behind one `vlmc serve`: an image chat answers what the Python API
    generates for the same messages."""
    from serve_helpers import LiveServer

    infos = [store.ckpt(f) for f in FAMILIES]
    server = LiveServer(*(str(store.artifact(i)) for i in infos))
    try:
        kit.check_serve_answers(server, [store.vlm(i) for i in infos], kit.image_chat(), strip=True)
    finally:
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_bench_smoke(store, family):
    kit.check_bench_smoke(store.artifact(store.ckpt(family)), "mistral3" if family == "mistral3" else "llava")


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
    kit.check_refused(store.ckpt(family)["path"], tmp_path, change, message, replace=("size",))


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
    art = store.artifact(store.ckpt("mistral3"))
    img_path = tmp_path / "img.png"
    ck.make_test_image(100, 70, seed=3).save(img_path)
    expect = store.vlm(store.ckpt("mistral3")).generate("hi", images=[str(img_path)], max_tokens=6)
    r = kit.run_blocked(f"""
        import json, vlmc
        out = vlmc.load({str(art)!r}).generate("hi", images=[{str(img_path)!r}], max_tokens=6)
        print(json.dumps(out.token_ids))
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """, timeout=300)
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
