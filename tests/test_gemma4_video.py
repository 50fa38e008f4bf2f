"""Gemma 4's video processor pieces (``vlmc.models.common.gemma4_video``): the frame sampler
against Gemma4VideoProcessor.sample_frames, where vlmc departs from it (a default that
takes every frame of a clip shorter than ``num_frames``; ``max_frames``), the spec read
from a checkpoint's config, and the per-frame prompt text. End-to-end parity:
``test_parity_video.py``."""
from __future__ import annotations

import numpy as np
import pytest

from vlmc.errors import InputError, SourceError
from vlmc.models.common.gemma4_video import Gemma4VideoProcessor, video_prompt, video_spec_from_config
from vlmc.models.common.video import VideoMeta


def _proc(**cfg):
    return Gemma4VideoProcessor(video_spec_from_config(cfg))


@pytest.mark.parametrize("total,video_fps,fps,num,config_frames", [
    (40, 10.0, None, None, 32), (300, 30.0, None, None, 32), (23, 8.0, None, None, 6), (17, 6.0, None, 5, 32),
    (50, 10.0, None, 16, 32), (15, 5.0, 1.5, None, None), (300, 29.97, 1.0, None, None), (7, 5.0, 30.0, None, None)])
def test_sampler_matches_transformers(total, video_fps, fps, num, config_frames):
    """transformers' sampler: ``num_frames`` (the call's, else the processor's) wins over
    ``fps`` (its processor call refuses the two together), so fps sampling is compared
    against a processor whose num_frames is None."""
    from fixtures.torchvision_loader import import_torchvision
    if import_torchvision() is None:
        pytest.skip("torchvision (the test extra) is not installed")
    from transformers import Gemma4VideoProcessor as HF
    from transformers.video_utils import VideoMetadata
    sample = _proc(num_frames=config_frames or 32).sampler(fps=fps, num_frames=num)
    try:
        want = HF(num_frames=config_frames).sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps),
                                                          fps=fps, num_frames=num)
    except ValueError:  # more frames asked for than the clip has: an error on both sides
        with pytest.raises(InputError, match="cannot sample"):
            sample(VideoMeta(total, video_fps, 64, 48))
        return
    np.testing.assert_array_equal(sample(VideoMeta(total, video_fps, 64, 48)), np.asarray(want))


def test_sampler_defaults_caps_and_refusals():
    meta = VideoMeta(20, 10.0, 64, 48)
    proc = _proc(num_frames=32)
    # the default takes every frame of a clip shorter than num_frames (transformers refuses it)
    np.testing.assert_array_equal(proc.sampler()(meta), np.arange(20))
    np.testing.assert_array_equal(_proc(num_frames=5).sampler()(meta), [0, 4, 8, 12, 16])
    # max_frames caps the default and fps sampling, evenly over the whole clip
    np.testing.assert_array_equal(proc.sampler(max_frames=4)(meta), [0, 5, 10, 15])
    np.testing.assert_array_equal(proc.sampler(fps=5.0, max_frames=4)(meta), [0, 5, 10, 15])
    np.testing.assert_array_equal(proc.sampler(fps=5.0)(meta), np.arange(10) * 2)
    with pytest.raises(InputError, match="not both"):
        proc.sampler(fps=1.0, num_frames=4)
    with pytest.raises(InputError, match="cannot sample 21 frames"):
        proc.sampler(num_frames=21)(meta)


def test_spec_from_config():
    spec = video_spec_from_config({})
    assert (spec["max_soft_tokens"], spec["num_frames"], spec["patch_size"], spec["do_normalize"]) == (70, 32, 16, True)
    spec = video_spec_from_config({"max_soft_tokens": 280, "num_frames": 8, "patch_size": 14, "image_mean": None})
    assert (spec["max_soft_tokens"], spec["num_frames"], spec["patch_size"]) == (280, 8, 14)
    for bad, words in (({"max_soft_tokens": 100}, "one of"), ({"resample": 2}, "bicubic"),
                       ({"num_frames": 0}, "positive"), ({"do_sample_frames": False}, "do_sample_frames")):
        with pytest.raises(SourceError, match=words):
            video_spec_from_config(bad)


def test_prompt_text_per_frame():
    frame = "<a>vv<b>"
    assert video_prompt([0.0, 1.5, 59.99, 61.0, 3600.0], frame) == \
        "00:00 <a>vv<b> 00:01 <a>vv<b> 00:59 <a>vv<b> 01:01 <a>vv<b> 60:00 <a>vv<b>"


def test_frames_patched_row_major():
    """Frames packed one after another; a frame's patch k is its (row, column) block of
    pixels, channels last, each value v / 255 in float32 (the fused rescale + normalise)."""
    from vlmc.models.common.video import Video
    proc = _proc(patch_size=4, max_soft_tokens=140, do_resize=False)
    frames = np.random.default_rng(0).integers(0, 256, (2, 12, 24, 3), dtype=np.uint8)
    out = proc.process([Video(frames, VideoMeta(2, 1.0, 24, 12), np.arange(2))])
    assert out.grid_thw.tolist() == [[2, 3, 6]] and out.num_tokens == [2 * 2]
    row = 1 * 18 + 2 * 6 + 5   # frame 1, patch row 2, patch column 5
    want = frames[1, 8:12, 20:24].reshape(-1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(out.pixel_values[row], want)


def test_hub_processor_config_gives_the_video_budget_not_the_image_one():
    """gemma-4-E2B-it's processor_config.json (``benchmarks/reference_configs``): the nested
    video processor, 70 soft tokens and 32 frames, where its image processor has 280."""
    import json
    from pathlib import Path
    ref = json.loads((Path(__file__).resolve().parents[1] / "benchmarks" / "reference_configs" / "gemma4.json")
                     .read_text())["processor_config.json"]
    spec = video_spec_from_config(ref["video_processor"])
    assert (spec["max_soft_tokens"], spec["num_frames"], spec["do_normalize"]) == (70, 32, True)
    assert ref["image_processor"]["max_soft_tokens"] == 280
