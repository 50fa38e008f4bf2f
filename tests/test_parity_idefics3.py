"""Idefics3 and SmolVLM (``idefics3``, ``smolvlm``) against transformers, and everything
else a family must support, on the tiny checkpoints of ``tests/fixtures/idefics3.py``.

Parity (as ``test_parity.py``): prompt ids equal to transformers' Idefics3Processor /
SmolVLMProcessor (each image spelled out in the text as row/column tiles and a global
image, then tokenized, so newlines merge as the tokenizer merges them), pixels within
1e-5 (every tile, [tiles, 3, T, T] against the processor's [1, tiles, 3, T, T]), float32
logits within 1e-4 at the last prompt position and at each of 16 greedy steps, the 16
greedy tokens identical; for both config layouts, sharded and bfloat16 checkpoints, and
ragged batches. Then: the image processor against transformers' on more sizes and
settings, the tower's bucketed position ids and the pixel-shuffle connector against the
transformers modules, quantized weights and KV caches, the prefix and vision caches, the
batching loop, ``vlmc serve``, ``vlmc bench``, speculative decoding and refused configs.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("num2words")  # SmolVLMProcessor needs it

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
from fixtures import checkpoints as ck  # noqa: E402
from fixtures import idefics3 as i3  # noqa: E402
from parity_kit import PIXEL_ATOL  # noqa: E402

CASE_NAMES = ["text", "one_image", "two_images", "wide", "tall", "multi_turn"]
CASES = kit.Cases(small=kit.SMALL, chat=kit.CHAT)
_case, build_prompt = CASES.inputs, CASES.prompt
SEEDS = {"idefics3": 0, "smolvlm": 1}

store = kit.store_fixture(
    "idefics3", build=i3.build_idefics3_checkpoint, cases=CASES, defaults=lambda family: {"seed": SEEDS[family]},
    hf=lambda info: (i3.hf_processor(info["path"], info["family"]), i3.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: i3.hf_reference(info["path"], info["family"], *a, **kw))


def check_tiles(p, ref):
    (theirs,) = ref["pixel_values"]  # [1, tiles, 3, T, T]: one prompt
    assert ref["pixel_attention_mask"].all()  # the tiles of one prompt are never padded
    mine = np.asarray(p.images.pixel_values, dtype=np.float32)
    assert mine.shape == theirs.shape, (mine.shape, theirs.shape)
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=PIXEL_ATOL)


def assert_parity(m, ref, case, what):
    kit.assert_parity(m, build_prompt(m, case), ref, what, pixels=check_tiles)


# ------------------------------------------------------------------------------ parity

PARITY = [(f, c) for f in ("idefics3", "smolvlm") for c in CASE_NAMES + ["small", "chat"]]


@pytest.mark.parametrize("family,case", PARITY, ids=[f"{f}-{c}" for f, c in PARITY])
def test_parity(store, family, case):
    info = store.ckpt(family)
    assert_parity(store.vlm(info), store.ref(info, case), case, f"{family}/{case}")


def test_images_are_spelled_out_in_the_text(store):
    """The fixture's tokenizer merges newline runs, so the "\\n" after the last tile row and
    the one before the global image are one token: expanding by ids would not give
    transformers' ids. A one-tile image has no row/column tokens."""
    m = store.vlm(store.ckpt("idefics3"))
    tok = m.tokenizer
    assert tok.encode("\n\n") != tok.encode("\n") * 2
    p = build_prompt(m, "wide")
    text = tok.decode(p.ids)
    rows, cols = p.images.grids[0]
    assert (rows, cols) == (2, 3) and "<row_2_col_3>" in text and "<row_3_col_1>" not in text
    assert "\n\n<fake_token_around_image><global-img>" in text
    small = build_prompt(m, "small")  # upscaled to the longest edge like any other image: tiles
    assert small.images.grids == [(3, 3)]
    one = build_prompt(store.vlm(store.ckpt("idefics3", splitting=False)), "small")
    assert one.images.grids == [(0, 0)] and "<row_" not in tok.decode(one.ids)
    assert sum(1 for t in one.ids if t == m.image_token_id) == i3.TILE_TOKENS


@pytest.mark.parametrize("layout", list(kit.LAYOUTS))
@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_checkpoint_layouts(store, family, layout):
    """Same seed, other config layout / shards: the v5 checkpoint's references apply."""
    kw = kit.LAYOUTS[layout]
    base, info = kit.layout_checkpoints(store, kw, family)
    if kw.get("layout") == "v4":
        text = info["config"]["text_config"]
        assert "rope_parameters" not in text and text["rope_theta"] == 100.0
    m = store.vlm(info)
    for case in ("text", "two_images", "multi_turn"):
        assert_parity(m, store.ref(base, case), case, f"{family}/{layout}/{case}")


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_bfloat16_checkpoint(store, family):
    """bf16-stored weights: a float32 artifact matches transformers on the upcast weights; a
    bfloat16 artifact stays close to it (teacher-forced on its tokens)."""
    info = store.ckpt(family, dtype="bfloat16")
    m32, m16 = store.vlm(info), store.vlm(info, dtype="bfloat16")
    for case in ("text", "wide"):
        assert_parity(m32, store.ref(info, case), case, f"{family}/bf16-ckpt/{case}")
        kit.check_bf16_artifact(m32, m16, lambda m: build_prompt(m, case), case)


def test_without_image_splitting(store):
    """do_image_splitting false: every image is one squashed tile, as transformers does it."""
    info = store.ckpt("idefics3", splitting=False)
    m = store.vlm(info)
    for case in ("two_images", "wide"):
        ref = store.ref(info, case)
        assert_parity(m, ref, case, f"idefics3/no-splitting/{case}")
        assert ref["pixel_values"].shape[1] == len(_case(case)[1])


BATCHES = [("two_images", "text"), ("multi_turn", "chat", "one_image"), ("wide", "small")]


@pytest.mark.parametrize("batch", BATCHES, ids=["+".join(b) for b in BATCHES])
def test_batched_matches_single(store, batch):
    kit.check_batch_against_refs(store, store.ckpt("smolvlm"), batch, "smolvlm/batch")


# ------------------------------------------------------------------------------ processor and tower pieces


@pytest.mark.parametrize("settings", [
    {}, {"do_image_splitting": False}, {"size": {"longest_edge": 300}, "resample": 3},
    {"size": {"longest_edge": 100}, "do_resize": False}, {"size": {"longest_edge": 56}},
], ids=["default", "no-splitting", "bicubic-300", "no-resize", "one-tile"])
def test_processor_matches_transformers(settings):
    """Tiles and their pixels equal Idefics3ImageProcessorPil's for many image sizes
    (portrait, landscape, square, smaller and larger than a tile, odd sizes), RGBA and
    greyscale inputs included."""
    from PIL import Image
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from vlmc.models.common.processors import make_image_processor, spec_from_preprocessor_config

    pp = {k: v for k, v in i3.preprocessor_config("idefics3").items() if k not in ("image_processor_type",
                                                                                    "processor_class")}
    pp.update(settings)
    theirs = Idefics3ImageProcessorPil(**pp)
    mine = make_image_processor(spec_from_preprocessor_config(pp, "idefics3", tile_tokens=4))
    rng = np.random.default_rng(0)
    sizes = [(56, 56), (57, 55), (30, 200), (200, 30), (113, 169), (169, 113), (500, 20), (1, 1), (640, 480)]
    for w, h in sizes + [tuple(int(v) for v in rng.integers(1, 400, 2)) for _ in range(6)]:
        img = ck.make_test_image(w, h, seed=w * 7 + h)
        for im in (img, img.convert("RGBA"), img.convert("L")):
            want = theirs(images=[[im]], return_tensors="np", return_row_col_info=True)
            got = mine.process([im])
            assert got.grids == [(want["rows"][0][0], want["cols"][0][0])], (w, h)
            np.testing.assert_allclose(got.pixel_values, want["pixel_values"][0], rtol=0, atol=PIXEL_ATOL)
            assert got.num_tokens == [4 * len(got.pixel_values)]
    from vlmc.errors import InputError
    with pytest.raises(InputError, match="zero size"):
        mine.process([Image.new("RGB", (0, 5))])


def test_bucketed_positions_match_the_vision_embeddings():
    """siglip_tower's position_ids path with the host-planned ids: Idefics3VisionEmbeddings
    (patchify, patch embedding, bucketed position rows) for grid sizes where the buckets are
    the identity and where float rounding moves patches (19, 25, 29), in both op libraries."""
    import transformers as tf
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionEmbeddings
    from vlmc.kernels import cpu_ops, reference
    from vlmc.models.idefics3.inputs import bucket_positions

    for grid in (4, 19, 25, 29, 32):
        cfg = tf.Idefics3VisionConfig(hidden_size=8, num_attention_heads=2, image_size=grid * 2, patch_size=2)
        emb = Idefics3VisionEmbeddings(cfg).eval()
        px = torch.randn(2, 3, grid * 2, grid * 2, generator=torch.Generator().manual_seed(grid))
        with torch.no_grad():
            want = emb(px, torch.ones(2, grid, grid, dtype=torch.bool)).numpy()
        ids = bucket_positions(grid, grid)
        assert (grid in (19, 25, 29)) == (not np.array_equal(ids, np.arange(grid * grid)))
        w = mx.array(emb.patch_embedding.weight.detach().numpy().reshape(8, -1))
        b = mx.array(emb.patch_embedding.bias.detach().numpy())
        table = mx.array(emb.position_embedding.weight.detach().numpy())
        for ops in (reference, cpu_ops):
            x = ops.linear(ops.patchify(mx.array(px.numpy()), patch=2), w, b)
            x = ops.add(x, ops.take(table, mx.array(ids), axis=0))
            np.testing.assert_allclose(np.asarray(ops.result(x)), want, rtol=0, atol=1e-5)


def test_connector_matches_transformers(store):
    """The pixel shuffle (reshape/transpose ops) and projection of the compiled program:
    Idefics3Connector on the tower's output, through the artifact's own vision_encode."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    info = store.ckpt("idefics3")
    model = store.hf.get(info["path"], (None, None))[1] or i3.hf_model(info["path"], "idefics3")
    m = store.vlm(info)
    p = build_prompt(m, "one_image")
    px = torch.from_numpy(p.images.pixel_values)
    with torch.no_grad():
        hidden = model.model.vision_model(px).last_hidden_state
        want = model.model.connector(hidden).reshape(-1, i3.TEXT_HIDDEN).numpy()
    assert isinstance(model.model.connector, Idefics3Connector)
    got = np.array(m.encode_images(p.images))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------------ quantization, caches


def test_quantized_kv_caches(store):
    """Every KV layout: 8-bit codes track float32 (top-1 >= 0.9, mean KL < 0.02); coarser
    codes cost more, never less; the cpu decode_layer fast path serves the Llama layers."""
    info = store.ckpt("smolvlm")
    art = store.artifact(info)
    assert "decode_layer" in (art / "model.py").read_text()
    kit.check_quantized_kv_caches(store.vlm(info), art, layouts=kit.every_layer_is)
    kit.check_rotating_window_runs(art)


def test_quantized_weights(store):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost more."""
    kit.check_quantized_weights(store, store.ckpt("idefics3"), ("vision.", "projector."))


def test_prefix_cache_reuses_image_blocks_and_changes_nothing(store):
    """A second turn over the same image reuses the first's blocks (the whole tiled image
    sequence); another image behind the same ids reuses nothing past its first tile."""
    m = store.vlm(store.ckpt("idefics3"))
    kit.check_prefix_cache_reuses_the_image(m)


def test_batching_loop_with_images_and_text(store):
    """Joined batches of image and text requests give one-at-a-time outputs; the vision
    cache serves a repeated image (all its tiles)."""
    kit.check_batching_loop_with_images_and_text(store.vlm(store.ckpt("smolvlm")), second_image=(40, 30))


def test_speculative_decoding_is_lossless(store):
    """Greedy output with prompt-lookup drafts (and with the model drafting for itself) is
    the output without them."""
    kit.check_speculation_is_lossless(store.vlm(store.ckpt("idefics3")))


# ------------------------------------------------------------------------------ serve, bench, errors


def test_serve_answers_image_chats(store):
    """Both model types behind one `vlmc serve`: an image chat answers what the Python API
    generates for the same messages."""
    from serve_helpers import LiveServer

    infos = [store.ckpt(f) for f in ("idefics3", "smolvlm")]
    server = LiveServer(*(str(store.artifact(i)) for i in infos))
    try:
        # (the server trims the reply's outer whitespace: " The ..." here)
        kit.check_serve_answers(server, [store.vlm(i) for i in infos], kit.image_chat(), strip=True)
    finally:
        server.stop()


@pytest.mark.parametrize("family", ["idefics3", "smolvlm"])
def test_bench_smoke(store, family):
    kit.check_bench_smoke(store.artifact(store.ckpt(family)), "idefics3")


@pytest.mark.parametrize("change,message", [
    (("preprocessor_config.json", {"max_image_size": {"longest_edge": 112}}), "max_image_size 112"),
    (("preprocessor_config.json", {"size": {"height": 10, "width": 10}}), "longest_edge"),
    (("config.json", {"scale_factor": 3}), "scale_factor 3"),
    (("config.json", {"vision_config": {"model_type": "siglip_vision_model"}}), "'siglip_vision_model' is not supported"),
    (("config.json", {"text_config": {"model_type": "gpt2"}}), "'gpt2' is not supported"),
])
def test_configs_vlmc_cannot_honour_are_refused(store, tmp_path, change, message):
    kit.check_refused(store.ckpt("idefics3")["path"], tmp_path, change, message, replace=("size",))


def test_literal_image_tokens_in_text_are_refused(store):
    from vlmc.errors import InputError

    m = store.vlm(store.ckpt("idefics3"))
    img = ck.make_test_image(64, 64, seed=3)
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("<image> what is this?", images=[img])
    with pytest.raises(InputError, match="placeholder"):
        m.build_prompt("<image> what is this?")
