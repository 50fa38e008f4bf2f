"""Checks of the tiny-checkpoint fixtures and the transformers reference oracle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

try:  # `python -m pytest` from the repo root puts the root on sys.path
    from tests.fixtures import checkpoints as ck
except ImportError:  # plain `pytest` (rootdir/tests on sys.path)
    from fixtures import checkpoints as ck

CASES = [
    ("qwen2_vl", "default"),
    ("qwen2_5_vl", "default"),
    ("llava", "clip"),
    ("llava", "siglip"),
]
IDS = [f"{f}-{v}" for f, v in CASES]

ONE_IMAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the picture."}]}]
NO_IMAGE = [{"role": "user", "content": [{"type": "text", "text": "Tell me a short story about the river."}]}]
TWO_IMAGES = [
    {
        "role": "user",
        "content": [
            {"type": "image"},
            {"type": "text", "text": "Compare this picture"},
            {"type": "image"},
            {"type": "text", "text": " with that one."},
        ],
    }
]
MULTI_TURN = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "A red square and a blue circle."}]},
    {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
]


def _images(n: int, seed: int = 0):
    sizes = [(100, 70), (150, 100), (64, 64)]
    return [ck.make_test_image(*sizes[i % len(sizes)], seed=seed + i) for i in range(n)]


class _Store:
    """Checkpoints built once per session, with loaded processor/model cached."""

    def __init__(self, root: Path):
        self.root = root
        self.info: dict = {}
        self.loaded: dict = {}

    def get(self, family, variant, **kw):
        key = (family, variant, tuple(sorted(kw.items())))
        if key not in self.info:
            name = "_".join([family, variant] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            self.info[key] = ck.build_checkpoint(self.root / name, family, variant=variant, **kw)
        return self.info[key]

    def pm(self, info):
        path = info["path"]
        if path not in self.loaded:
            fam = info["family"]
            self.loaded[path] = (ck.hf_processor(path, fam), ck.hf_model(path, fam))
        return self.loaded[path]

    def ref(self, info, messages, images, **kw):
        proc, model = self.pm(info)
        return ck.hf_reference(info["path"], info["family"], messages, images, processor=proc, model=model, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return _Store(tmp_path_factory.mktemp("ckpts"))


def _expected_image_tokens(info, ref) -> int:
    if info["family"] == "llava":
        n_images = 0 if ref["pixel_values"] is None else ref["pixel_values"].shape[0]
        return n_images * info["image_seq_length"]
    if ref["image_grid_thw"] is None:
        return 0
    return int(ref["image_grid_thw"].prod(axis=1).sum()) // (ck.MERGE**2)


def _check_ref(info, ref, n_images, steps=16):
    assert ref["input_ids"].dtype == np.int64 and ref["input_ids"].ndim == 1
    n_img_tok = int((ref["input_ids"] == info["image_token_id"]).sum())
    assert n_img_tok == _expected_image_tokens(info, ref)
    if n_images == 0:
        assert n_img_tok == 0 and ref["pixel_values"] is None
    else:
        assert n_img_tok > 0 and ref["pixel_values"].dtype == np.float32
        if info["family"] == "llava":
            assert ref["pixel_values"].shape == (n_images, 3, ck.LLAVA_IMAGE_SIZE, ck.LLAVA_IMAGE_SIZE)
            assert info["image_seq_length"] == 16
        else:
            assert ref["image_grid_thw"].shape == (n_images, 3)
    V = info["vocab_size"]
    last = ref["prompt_logits_last"]
    assert last.shape == (V,) and last.dtype == np.float32
    assert ref["prompt_logits"].shape == (ref["input_ids"].shape[0], V)
    assert float(last.std()) > 1.0, "fixture logits are too flat for greedy checks"
    # Top-2 margin: greedy argmax must survive tiny numerical differences.
    top2 = np.sort(last)[-2:]
    assert top2[1] - top2[0] > 1e-3
    assert ref["greedy_tokens"].shape == (steps,) and ref["greedy_tokens"].dtype == np.int64
    gl = ref["greedy_logits"]
    assert gl.shape == (min(8, steps), V) and gl.dtype == np.float32
    # raw logits: step 0 equals the prompt's last logits; each token is the raw argmax
    np.testing.assert_allclose(gl[0], last, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(gl.argmax(-1), ref["greedy_tokens"][: gl.shape[0]])
    assert (ref["greedy_tokens"] < info["tokenizer_size"]).all()


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_conversations(store, family, variant):
    info = store.get(family, variant)
    for messages, n in ((NO_IMAGE, 0), (ONE_IMAGE, 1), (TWO_IMAGES, 2), (MULTI_TURN, 1)):
        ref = store.ref(info, messages, _images(n))
        _check_ref(info, ref, n)
        if n == 2 and family != "llava":
            # two different sizes -> two different grids
            assert not np.array_equal(ref["image_grid_thw"][0], ref["image_grid_thw"][1])
    # the multi-turn prompt keeps the earlier turn's image and the assistant answer
    ref = store.ref(info, MULTI_TURN, _images(1))
    assert "A red square and a blue circle." in ref["prompt"]
    assert ref["prompt"].endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_reference_is_self_consistent(store, family, variant):
    """KV-cached generate logits == one uncached forward over prompt + generated tokens."""
    info = store.get(family, variant)
    proc, model = store.pm(info)
    images = _images(2)
    ref = store.ref(info, TWO_IMAGES, images, greedy_steps=8)
    prompt = proc.apply_chat_template(TWO_IMAGES, add_generation_prompt=True, tokenize=False)
    inputs = dict(proc(text=[prompt], images=images, return_tensors="pt"))
    L = inputs["input_ids"].shape[1]
    gen = torch.from_numpy(ref["greedy_tokens"])[None]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], gen], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(gen, dtype=inputs["mm_token_type_ids"].dtype)], 1
        )
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits[0].numpy()
    np.testing.assert_allclose(logits[L - 1 : L - 1 + 8], ref["greedy_logits"], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_images_matter(store, family, variant):
    info = store.get(family, variant)
    a = store.ref(info, ONE_IMAGE, [ck.make_test_image(100, 70, seed=1)], greedy_steps=1)
    b = store.ref(info, ONE_IMAGE, [ck.make_test_image(100, 70, seed=2)], greedy_steps=1)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert np.abs(a["prompt_logits_last"] - b["prompt_logits_last"]).max() > 0.1


def _prefixes(names, depth=2):
    return sorted({".".join(n.split(".")[:depth]) for n in names})


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_v4_layout_matches_v5(store, family, variant):
    v5 = store.get(family, variant)
    v4 = store.get(family, variant, layout="v4")
    c5, c4 = v5["config"], v4["config"]
    # --- config layouts
    if family == "llava":
        assert "rope_parameters" in c5["text_config"] and "rope_theta" not in c5["text_config"]
        assert "rope_parameters" not in c4["text_config"] and "rope_theta" in c4["text_config"]
        assert c4["torch_dtype"] == "float32" and c5["dtype"] == "float32"
    else:
        rp = c5["text_config"]["rope_parameters"]
        assert rp["mrope_section"] == ck.MROPE_SECTION and rp["rope_type"] == "default"
        assert "text_config" not in c4 and c4["hidden_size"] == ck.TEXT_HIDDEN
        assert c4["rope_scaling"] == {"type": "mrope", "mrope_section": ck.MROPE_SECTION}
        assert c4["rope_theta"] == ck.QWEN_ROPE_THETA
        assert c4["image_token_id"] == v4["image_token_id"]
    # --- weight names
    n5, n4 = v5["weight_names_list"], v4["weight_names_list"]
    assert len(n5) == len(n4)
    if family == "llava":
        assert all(n.startswith(("language_model.model.", "language_model.lm_head.", "vision_tower.",
                                 "multi_modal_projector.")) for n in n4)
        assert all(n.startswith("vision_tower.vision_model.") for n in n4 if n.startswith("vision_tower."))
        assert not any(n.startswith("vision_tower.vision_model.") for n in n5)
    else:
        assert _prefixes(n4, 1) == (["lm_head", "model", "visual"] if not v4["tie_word_embeddings"]
                                    else ["model", "visual"])
        assert any(n.startswith("model.layers.") for n in n4)
    # --- transformers loads every tensor of the v4 checkpoint
    _, info = ck._model_class(family).from_pretrained(v4["path"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    # --- and computes the same thing
    images = _images(1, seed=5)
    r5 = store.ref(v5, ONE_IMAGE, images, greedy_steps=8)
    r4 = store.ref(v4, ONE_IMAGE, images, greedy_steps=8)
    np.testing.assert_array_equal(r4["input_ids"], r5["input_ids"])
    np.testing.assert_allclose(r4["prompt_logits"], r5["prompt_logits"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(r4["greedy_tokens"], r5["greedy_tokens"])


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_module_names_sharded_matches(store, family, variant):
    v5 = store.get(family, variant)
    sh = store.get(family, variant, weight_names="module", sharded=True)
    path = Path(sh["path"])
    assert len(sh["weight_files"]) >= 2
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(sh["weight_files"])
    assert set(index["weight_map"]) == set(sh["weight_names_list"])
    assert not (path / "model.safetensors").exists()
    assert all(n.startswith(("model.", "lm_head.")) for n in sh["weight_names_list"])
    assert any(n.startswith("model.language_model.layers.") for n in sh["weight_names_list"])
    images = _images(1, seed=7)
    a = store.ref(v5, ONE_IMAGE, images, greedy_steps=1)
    b = store.ref(sh, ONE_IMAGE, images, greedy_steps=1)
    np.testing.assert_allclose(a["prompt_logits"], b["prompt_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,variant", [("qwen2_5_vl", "default"), ("llava", "siglip")])
def test_bfloat16_v4(store, family, variant):
    from safetensors import safe_open

    info = store.get(family, variant, dtype="bfloat16", layout="v4", sharded=True)
    assert info["config"]["torch_dtype"] == "bfloat16"
    with safe_open(str(Path(info["path"]) / info["weight_files"][0]), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.bfloat16
    ref = store.ref(info, ONE_IMAGE, _images(1), greedy_steps=4)
    _check_ref(info, ref, 1, steps=4)


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_tokenizer_files(store, family, variant):
    from tokenizers import Tokenizer

    info = store.get(family, variant)
    path = Path(info["path"])
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    storage = ck.CHAT_TEMPLATE_STORAGE[family]
    assert ("chat_template" in tcfg) == ("tokenizer_config" in storage)
    assert (path / "chat_template.json").exists() == ("chat_template.json" in storage)
    assert (path / "chat_template.jinja").exists() == ("chat_template.jinja" in storage)
    assert ck.read_chat_template(path) == (ck.LLAVA_CHAT_TEMPLATE if family == "llava" else ck.QWEN_VL_CHAT_TEMPLATE)
    assert 400 <= info["tokenizer_size"] <= 600 and info["vocab_size"] % 64 == 0
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == info["special_token_ids"]["<|im_end|>"]
    # raw `tokenizers` and the transformers tokenizer agree on a full chat prompt
    raw = Tokenizer.from_file(str(path / "tokenizer.json"))
    hf = ck.hf_tokenizer(path)
    proc, _ = store.pm(info)
    prompt = proc.apply_chat_template(MULTI_TURN, add_generation_prompt=True, tokenize=False)
    ids = raw.encode(prompt, add_special_tokens=False).ids
    assert ids == hf(prompt, add_special_tokens=False)["input_ids"]
    for tok, tid in info["special_token_ids"].items():
        assert raw.token_to_id(tok) == tid and hf.convert_tokens_to_ids(tok) == tid
        assert ids.count(tid) == prompt.count(tok)
    text = "The quick brown fox, 42 times!"
    assert raw.decode(raw.encode(text).ids) == text


def test_qwen_template_matches_official_behaviour(store):
    info = store.get("qwen2_vl", "default")
    proc, _ = store.pm(info)
    out = proc.apply_chat_template(TWO_IMAGES, add_generation_prompt=True, tokenize=False)
    assert out == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Compare this picture"
        "<|vision_start|><|image_pad|><|vision_end|> with that one.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = proc.apply_chat_template(sys_msgs, add_generation_prompt=False, tokenize=False)
    assert out == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    llava = store.get("llava", "siglip")
    lproc, _ = store.pm(llava)
    out = lproc.apply_chat_template(ONE_IMAGE, add_generation_prompt=True, tokenize=False)
    assert out == "<|im_start|>user\n<image>\nDescribe the picture.<|im_end|>\n<|im_start|>assistant\n"


def test_make_test_image():
    a = ck.make_test_image(97, 61, seed=3)
    b = ck.make_test_image(97, 61, seed=3)
    c = ck.make_test_image(97, 61, seed=4)
    assert a.mode == "RGB" and a.size == (97, 61)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.asarray(a).std() > 20


def test_build_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    a = ck.build_checkpoint(tmp_path / "a", "qwen2_vl", seed=3)
    b = ck.build_checkpoint(tmp_path / "b", "qwen2_vl", seed=3)
    ta = load_file(str(tmp_path / "a" / "model.safetensors"))
    tb = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a["special_token_ids"] == b["special_token_ids"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
