"""Video parity with transformers for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: tiny random-weight
checkpoints, clips made with PyAV, and transformers' own video processor (torchvision
backend) and model as the oracle.

For each case: the expanded prompt ids equal the processor's ``input_ids``; the video's
patches equal ``pixel_values_videos`` and its grid ``video_grid_thw`` (images likewise);
float32 logits within 1e-4 at the prompt's last position and over 16 greedy steps; the 16
greedy tokens identical. Qwen2.5-VL's temporal positions depend on the sampled frame rate
(``second_per_grid_ts``), so its cases sample at rates that give uneven spacing; Qwen3-VL's
prompt carries each temporal patch's time (``<1.5 seconds>``) and its own frame sampler.
SmolVLM2 and Gemma 4 (each frame an image after its ``mm:ss`` time, under the video
processor's own soft-token budget; pixel rows equal to the real rows of
``pixel_values_videos`` exactly) follow.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("av")

from fixtures import checkpoints as ck  # noqa: E402
from fixtures import qwen3_vl as q3  # noqa: E402
from fixtures.torchvision_loader import import_torchvision  # noqa: E402
from fixtures.videos import make_clip  # noqa: E402

if import_torchvision() is None:
    pytest.skip("transformers' video processors need torchvision (the test extra)", allow_module_level=True)

import vlmc  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402

from parity_kit import GREEDY_STEPS, LOGIT_STEPS, check_outputs, run_vlmc  # noqa: E402

# name -> (clips: (frames, width, height, fps), the sampling, images (w, h), content order)
CASES = {
    "one_video": ([(23, 100, 70, 8)], {"fps": 4.0}, [], "v"),
    "video_num_frames": ([(17, 64, 90, 6)], {"num_frames": 6}, [], "v"),
    "image_then_video": ([(15, 90, 60, 5)], {"fps": 2.0}, [(80, 56)], "iv"),
    "video_image_video": ([(11, 90, 60, 10), (13, 56, 56, 3)], {"fps": 3.0}, [(60, 60)], "viv"),
}
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _hf_processor(ckpt_dir: Path, family: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    pp = json.loads((ckpt_dir / "preprocessor_config.json").read_text())
    if family == "qwen3_vl":  # its video processor reads the image config's size, as from_pretrained falls back
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor
        video = Qwen3VLVideoProcessor(size=pp["size"], patch_size=pp["patch_size"],
                                      temporal_patch_size=pp["temporal_patch_size"], merge_size=pp["merge_size"],
                                      image_mean=pp["image_mean"], image_std=pp["image_std"],
                                      cap_pixels_per_frame=False)
        return Qwen3VLProcessor(image_processor=q3.hf_image_processor(ckpt_dir),
                                tokenizer=ck.hf_tokenizer(ckpt_dir), video_processor=video,
                                chat_template=ck.read_chat_template(ckpt_dir))
    video = Qwen2VLVideoProcessor(
        min_pixels=pp["min_pixels"], max_pixels=pp["max_pixels"], patch_size=pp["patch_size"],
        temporal_patch_size=pp["temporal_patch_size"], merge_size=pp["merge_size"], image_mean=pp["image_mean"],
        image_std=pp["image_std"], cap_pixels_per_frame=False)
    cls = Qwen2VLProcessor if family == "qwen2_vl" else Qwen2_5_VLProcessor
    return cls(image_processor=ck._image_processor(ckpt_dir, family), tokenizer=ck.hf_tokenizer(ckpt_dir),
               video_processor=video, chat_template=ck.read_chat_template(ckpt_dir))


def _hf_reference(processor, model, messages, images, clips, sampling: dict):
    """transformers on the whole decoded clips (its PyAV reader), sampling inside its video processor."""
    from transformers.video_utils import read_video_pyav
    import copy
    videos, metas = [], []
    for path in clips:
        frames, meta = read_video_pyav(str(path), sample_indices_fn=lambda metadata, **kw: np.arange(
            metadata.total_num_frames))
        meta.frames_indices = None
        videos.append(frames)
        metas.append(meta)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if "num_frames" in sampling:
        sampling = {**sampling, "fps": None}  # Qwen3-VL's processor has a default fps that num_frames must clear
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt", videos=videos,
                       video_metadata=metas, do_sample_frames=True, **sampling)
    gen = copy.deepcopy(model.generation_config)
    for key, value in dict(eos_token_id=None, do_sample=False, max_new_tokens=GREEDY_STEPS, min_new_tokens=None,
                           temperature=None, top_p=None, top_k=None, output_logits=True,
                           return_dict_in_generate=True).items():
        setattr(gen, key, value)  # (update() skips None: EOS must not stop the reference early)
    model.generation_config.eos_token_id = None  # generate fills unset fields from the model's own config
    with torch.no_grad():
        full = model(**inputs, use_cache=False)
        out = model.generate(**inputs, generation_config=gen)
    n = inputs["input_ids"].shape[1]
    return {
        "input_ids": inputs["input_ids"][0].numpy(),
        "pixel_values": inputs["pixel_values"].numpy() if "pixel_values" in inputs else None,
        "image_grid_thw": inputs["image_grid_thw"].numpy() if "image_grid_thw" in inputs else None,
        "pixel_values_videos": inputs["pixel_values_videos"].numpy(),
        "video_grid_thw": inputs["video_grid_thw"].numpy(),
        "prompt_logits_last": full.logits[0, -1].float().numpy(),
        "greedy_tokens": out.sequences[0, n:].numpy(),  # GREEDY_STEPS of them (checked below)
        "greedy_logits": torch.stack([lg[0] for lg in out.logits[:LOGIT_STEPS]]).float().numpy(),
    }


class Store:
    def __init__(self, root: Path):
        self.root, self.items = root, {}

    def get(self, family):
        if family not in self.items:
            if family == "qwen3_vl":
                info = q3.build_qwen3_checkpoint(self.root / family)
                hf = q3.hf_model(info["path"])
            else:
                info = ck.build_checkpoint(self.root / family, family)
                hf = ck.hf_model(info["path"], family)
            art = vlmc_compile(info["path"], self.root / f"{family}-art", dtype="float32", target="cpu")
            self.items[family] = (Path(info["path"]), vlmc.load(art), _hf_processor(Path(info["path"]), family), hf)
        return self.items[family]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.set_num_threads(2)
    return Store(tmp_path_factory.mktemp("video-parity"))


def _case(tmp_path, name, cases=CASES):
    specs, sampling, image_sizes, order = cases[name]
    clips = [make_clip(tmp_path / f"{name}-{i}.mp4", n=n, width=w, height=h, fps=fps, seed=i)
             for i, (n, w, h, fps) in enumerate(specs)]
    images = [ck.make_test_image(w, h, seed=20 + i) for i, (w, h) in enumerate(image_sizes)]
    content, vi, ii = [], 0, 0
    for kind in order:
        if kind == "v":
            content.append({"type": "video", "video": str(clips[vi]), **sampling})
            vi += 1
        else:
            content.append({"type": "image"})
            ii += 1
    content.append({"type": "text", "text": "What moves in this clip?"})
    return [{"role": "user", "content": content}], images, clips, sampling


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", FAMILIES)
def test_video_parity(store, tmp_path, family, case):
    path, m, proc, model = store.get(family)
    messages, images, clips, sampling = _case(tmp_path, case)
    hf_messages = [{"role": "user", "content": [
        {"type": "video"} if p["type"] == "video" else p for p in messages[0]["content"]]}]
    ref = _hf_reference(proc, model, hf_messages, images, clips, sampling)
    p = m.build_prompt(messages=messages, images=images)
    np.testing.assert_array_equal(np.asarray(p.ids), ref["input_ids"], err_msg="prompt ids differ")
    kinds = p.images.item_token_ids(m.image_token_id)
    rows = np.cumsum([0] + [int(np.prod(g)) for g in p.images.grid_thw])
    video_rows = np.concatenate([p.images.pixel_values[rows[k]:rows[k + 1]] for k, t in enumerate(kinds)
                                 if t == m.inputs.video_token_id])
    np.testing.assert_array_equal(p.images.grid_thw[[t == m.inputs.video_token_id for t in kinds]],
                                  ref["video_grid_thw"])
    np.testing.assert_allclose(video_rows, ref["pixel_values_videos"], rtol=0, atol=1e-6)
    if ref["pixel_values"] is not None:
        image_rows = np.concatenate([p.images.pixel_values[rows[k]:rows[k + 1]] for k, t in enumerate(kinds)
                                     if t == m.image_token_id])
        np.testing.assert_allclose(image_rows, ref["pixel_values"], rtol=0, atol=1e-5)
    assert len(ref["greedy_tokens"]) == GREEDY_STEPS
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, f"{family}/{case}")


# ------------------------------------------------------------------------------ SmolVLM2
# (clip frames, width, height, fps), the sampling transformers and vlmc are both given
SMOL_CASES = {
    "one_video": ((23, 100, 70, 8), {"fps": 2.0, "num_frames": 6}),
    "tall_video_many_frames": ((17, 48, 90, 5), {"fps": 3.0, "num_frames": 16}),
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from fixtures import idefics3 as idf
    from transformers import SmolVLMProcessor, SmolVLMVideoProcessor
    root = tmp_path_factory.mktemp("smolvlm-video")
    info = idf.build_idefics3_checkpoint(root / "ckpt", "smolvlm")
    path = Path(info["path"])
    pp = json.loads((path / "preprocessor_config.json").read_text())
    video = SmolVLMVideoProcessor(size=pp["size"], max_image_size=pp["max_image_size"], resample=pp["resample"],
                                  image_mean=pp["image_mean"], image_std=pp["image_std"])
    proc = SmolVLMProcessor(image_processor=idf.hf_image_processor(path, "smolvlm"), tokenizer=ck.hf_tokenizer(path),
                            video_processor=video, image_seq_len=idf.TILE_TOKENS,
                            chat_template=ck.read_chat_template(path))
    art = vlmc_compile(str(path), root / "art", dtype="float32", target="cpu")
    return vlmc.load(art), proc, idf.hf_model(path, "smolvlm")


@pytest.mark.parametrize("case", list(SMOL_CASES))
def test_smolvlm_video_parity(smol, tmp_path, case):
    """SmolVLM2: frames as one-tile images after the processor's introduction and timestamps."""
    from transformers.video_utils import read_video_pyav
    m, proc, model = smol
    (n, w, h, fps), sampling = SMOL_CASES[case]
    clip = make_clip(tmp_path / "clip.mp4", n=n, width=w, height=h, fps=fps)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]
    prompt = proc.tokenizer.apply_chat_template(messages, chat_template=proc.chat_template, add_generation_prompt=True,
                                                tokenize=False)
    frames, meta = read_video_pyav(str(clip), sample_indices_fn=lambda metadata, **kw: np.arange(
        metadata.total_num_frames))
    inputs = proc(text=[prompt], videos=[frames], video_metadata=[meta], do_sample_frames=True,
                  return_tensors="pt", **sampling)
    gen = copy.deepcopy(model.generation_config)
    for key, value in dict(eos_token_id=None, do_sample=False, max_new_tokens=GREEDY_STEPS, min_new_tokens=None,
                           temperature=None, top_p=None, top_k=None, output_logits=True,
                           return_dict_in_generate=True).items():
        setattr(gen, key, value)
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        full = model(**inputs, use_cache=False)
        out = model.generate(**inputs, generation_config=gen)
    k = inputs["input_ids"].shape[1]
    ref = {"prompt_logits_last": full.logits[0, -1].float().numpy(), "greedy_tokens": out.sequences[0, k:].numpy(),
           "greedy_logits": torch.stack([lg[0] for lg in out.logits[:LOGIT_STEPS]]).float().numpy()}
    assert len(ref["greedy_tokens"]) == GREEDY_STEPS

    video = vlmc.VideoRef(clip, fps=sampling["fps"], max_frames=sampling["num_frames"])  # num_frames caps fps here
    p = m.build_prompt(messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                   "text": "What moves?"}]}],
                       videos=[video])
    np.testing.assert_array_equal(np.asarray(p.ids), inputs["input_ids"][0].numpy(), err_msg="prompt ids differ")
    theirs = inputs["pixel_values"][0].numpy()
    assert p.images.pixel_values.shape == theirs.shape
    np.testing.assert_allclose(p.images.pixel_values, theirs, rtol=0, atol=1e-6)
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, f"smolvlm/{case}")


def test_llava_and_idefics3_refuse_videos(tmp_path):
    """LLaVA's and Idefics3's processors take no videos: one clear error, before any decoding."""
    from fixtures import idefics3 as idf
    from vlmc.errors import InputError
    clip = make_clip(tmp_path / "clip.mp4", n=5)
    for name, build in (("llava", lambda p: ck.build_checkpoint(p, "llava", variant="clip")),
                        ("idefics3", lambda p: idf.build_idefics3_checkpoint(p, "idefics3"))):
        info = build(tmp_path / name)
        m = vlmc.load(vlmc_compile(info["path"], tmp_path / f"{name}-art", dtype="float32", target="cpu"))
        assert m.inputs.video_processor is None
        with pytest.raises(InputError, match="takes no videos"):
            m.generate("What moves?", videos=[clip], max_tokens=1)


# ------------------------------------------------------------------------------ Gemma 4
# name -> (clips: (frames, width, height, fps), the sampling, images (w, h), content order);
# no sampling: the checkpoint's num_frames (6)
GEMMA4_CASES = {
    "one_video": ([(23, 100, 70, 8)], {}, [], "v"),
    "video_num_frames": ([(17, 64, 90, 6)], {"num_frames": 5}, [], "v"),
    "image_then_video_fps": ([(15, 90, 60, 5)], {"fps": 1.5}, [(80, 56)], "iv"),
    "video_image_video": ([(11, 90, 60, 10), (13, 56, 56, 3)], {"num_frames": 3}, [(60, 60)], "viv"),
}


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    from fixtures import gemma4 as g4
    from transformers import Gemma4Processor, Gemma4VideoProcessor
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil
    root = tmp_path_factory.mktemp("gemma4-video")
    info = g4.build_gemma4_checkpoint(root / "ckpt")
    path = Path(info["path"])
    cfg = json.loads((path / "processor_config.json").read_text())
    strip = lambda d, key: {k: v for k, v in d.items() if k != key}  # noqa: E731
    procs = {}
    for fps_sampling in (False, True):  # transformers refuses fps beside a num_frames, its default included
        video_cfg = strip(cfg["video_processor"], "video_processor_type")
        video = Gemma4VideoProcessor(**(dict(video_cfg, num_frames=None) if fps_sampling else video_cfg))
        procs[fps_sampling] = Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(),
            image_processor=Gemma4ImageProcessorPil(**strip(cfg["image_processor"], "image_processor_type")),
            tokenizer=ck.hf_tokenizer(path), video_processor=video, chat_template=ck.read_chat_template(path),
            image_seq_length=g4.MAX_SOFT_TOKENS)
    art = vlmc_compile(str(path), root / "art", dtype="float32", target="cpu")
    return vlmc.load(art), procs, g4.hf_model(path, "gemma4")


@pytest.mark.parametrize("case", list(GEMMA4_CASES))
def test_gemma4_video_parity(gemma4, tmp_path, case):
    """Gemma 4: each frame as an image after its mm:ss time, through the same vision tower."""
    from fixtures import gemma4 as g4
    from transformers.video_utils import read_video_pyav
    m, procs, model = gemma4
    sampling = GEMMA4_CASES[case][1]
    messages, images, clips, _ = _case(tmp_path, case, GEMMA4_CASES)
    proc = procs["fps" in sampling]
    hf_messages = [{"role": "user", "content": [
        {"type": "video"} if p["type"] == "video" else p for p in messages[0]["content"]]}]
    prompt = proc.apply_chat_template(hf_messages, add_generation_prompt=True, tokenize=False)
    videos, metas = [], []
    for clip in clips:
        frames, meta = read_video_pyav(str(clip), sample_indices_fn=lambda metadata, **kw: np.arange(
            metadata.total_num_frames))
        meta.frames_indices = None
        videos.append(frames)
        metas.append(meta)
    inputs = proc(text=[prompt], images=images or None, videos=videos, video_metadata=metas, return_tensors="pt",
                  add_special_tokens=False, **sampling)
    for key in ("num_soft_tokens_per_image", "num_soft_tokens_per_video", "video_metadata"):
        inputs.pop(key, None)
    ref = ck.hf_greedy(model, dict(inputs), GREEDY_STEPS, LOGIT_STEPS,
                       eos_token_id=[model.config.get_text_config().vocab_size + 1000])
    assert len(ref["greedy_tokens"]) == GREEDY_STEPS

    p = m.build_prompt(messages=messages, images=images)
    np.testing.assert_array_equal(np.asarray(p.ids), inputs["input_ids"][0].numpy(), err_msg="prompt ids differ")
    kinds = p.images.item_token_ids(m.image_token_id)
    rows = np.cumsum([0] + [int(np.prod(g)) for g in p.images.grid_thw])
    pick = lambda tok: [p.images.pixel_values[rows[k]:rows[k + 1]] for k, t in enumerate(kinds) if t == tok]  # noqa
    theirs = g4.real_patches(inputs["pixel_values_videos"].numpy(), inputs["video_position_ids"].numpy())
    np.testing.assert_array_equal(np.concatenate(pick(m.inputs.video_token_id)), theirs)
    frames = [int(g[0]) for g, t in zip(p.images.grid_thw, kinds) if t == m.inputs.video_token_id]
    assert frames == inputs["num_frames_per_video"].tolist()
    if images:
        theirs = g4.real_patches(inputs["pixel_values"].numpy(), inputs["image_position_ids"].numpy())
        np.testing.assert_allclose(np.concatenate(pick(m.image_token_id)), theirs, rtol=0, atol=1e-5)
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, f"gemma4/{case}")

