"""Video decoding and frame sampling (``vlmc.runtime.video``, ``vlmc.models.common.video``)
against transformers' PyAV reader and its video processors' samplers, and the uint8
antialiased resize against torchvision's."""
from __future__ import annotations

import base64
import functools
import http.server
import os
import threading

import numpy as np
import pytest

from vlmc.errors import InputError
from vlmc.models.common.video import VideoMeta, qwen2_vl_sampler, qwen3_vl_sampler, smolvlm_sampler, uniform_sampler
from vlmc.models.common.video_resize import resize_frames
from vlmc.runtime.video import VideoLimits, VideoRef, load_video

from fixtures.videos import clip_frames, make_clip, write_clip

av = pytest.importorskip("av")


def _hf_pyav(path, indices=None):
    from transformers.video_utils import read_video_pyav
    return read_video_pyav(str(path), sample_indices_fn=lambda metadata, **kw: (
        np.arange(metadata.total_num_frames) if indices is None else indices))


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mov", ".gif"])
def test_decodes_every_container_like_transformers(tmp_path, suffix):
    src = clip_frames(11, 90, 60, seed=3)          # odd frame count, non-square
    path = write_clip(tmp_path / f"clip{suffix}", src, fps=10)
    video = load_video(path)
    assert video.frames.shape == (11, 60, 90, 3) and video.frames.dtype == np.uint8
    assert video.meta.total_frames == 11 and video.meta.fps == pytest.approx(10.0)
    np.testing.assert_array_equal(video.indices, np.arange(11))
    # each decoded frame is nearest to its own source frame (order and identity kept)
    err = np.abs(video.frames[:, None].astype(int) - src[None].astype(int)).mean(axis=(2, 3, 4))
    np.testing.assert_array_equal(err.argmin(axis=1), np.arange(11))
    with av.open(str(path)) as c:
        stated = c.streams.video[0].frames
    if stated:  # transformers' reader needs the stream to state its frame count
        frames, meta = _hf_pyav(path)
        np.testing.assert_array_equal(video.frames, frames)
        assert meta.total_num_frames == video.meta.total_frames and meta.fps == pytest.approx(video.meta.fps)


def test_sampled_frames_equal_transformers(tmp_path):
    path = make_clip(tmp_path / "c.mp4", n=23, width=64, height=48, fps=12)
    sampler = qwen2_vl_sampler(fps=2.0)
    video = load_video(path, sampler)
    frames, _ = _hf_pyav(path, video.indices)
    np.testing.assert_array_equal(video.frames, frames)
    assert video.sampled_fps == pytest.approx(len(video.indices) / 23 * 12)
    assert video.timestamps == pytest.approx([i / 12 for i in video.indices])


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        data = self.server.payload  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_every_source_kind_gives_the_same_frames(tmp_path):
    path = make_clip(tmp_path / "c.webm", n=7, width=48, height=32, fps=5)
    data = path.read_bytes()
    want = load_video(path).frames
    uri = "data:video/webm;base64," + base64.b64encode(data).decode()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.payload = data
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/c.webm"
        for src in (str(path), f"file://{path}", uri, data, url):
            np.testing.assert_array_equal(load_video(src).frames, want)
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("total,fps,video_fps,num", [(11, 2.0, 10.0, None), (300, 1.0, 30.0, None),
                                                      (7, 30.0, 5.0, None), (11, None, 10.0, 5),
                                                      (100, None, 25.0, 100), (13, None, 3.0, None)])
def test_uniform_sampler_matches_transformers(total, fps, video_fps, num):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    meta = VideoMeta(total, video_fps, 64, 48)
    try:
        want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=video_fps), num_frames=num, fps=fps)
    except ValueError:  # more frames asked for than the video has: an error on both sides
        with pytest.raises(InputError, match="cannot sample"):
            uniform_sampler(fps, num)(meta)
        return
    np.testing.assert_array_equal(uniform_sampler(fps, num)(meta), want)


@pytest.mark.parametrize("total,video_fps,fps,num,max_frames", [
    (11, 10.0, 2.0, None, 768), (300, 30.0, 2.0, None, 768), (301, 29.97, 1.0, None, 768),
    (7, 5.0, 30.0, None, 768), (23, 12.0, 2.0, None, 8), (11, 10.0, None, 5, 768), (50, 10.0, None, 16, 768),
    (1000, 25.0, 4.0, None, 64), (9, 3.0, 0.5, None, 768)])
def test_qwen2_vl_sampler_matches_transformers(total, video_fps, fps, num, max_frames):
    from fixtures.torchvision_loader import import_torchvision
    if import_torchvision() is None:
        pytest.skip("torchvision (the test extra) is not installed")
    from transformers import Qwen2VLVideoProcessor
    from transformers.video_utils import VideoMetadata
    proc = Qwen2VLVideoProcessor()
    want = proc.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps, num_frames=num,
                              max_frames=max_frames)
    got = qwen2_vl_sampler(fps, num, max_frames=max_frames)(VideoMeta(total, video_fps, 64, 48))
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("total,video_fps,fps,num", [
    (11, 10.0, 2.0, None), (300, 30.0, 2.0, None), (301, 29.97, 1.0, None), (7, 5.0, 30.0, None),
    (3, 5.0, 2.0, None), (11, 10.0, None, 5), (50, 10.0, None, 16), (1000, 25.0, 4.0, None), (9, 3.0, 0.5, None)])
def test_qwen3_vl_sampler_matches_transformers(total, video_fps, fps, num):
    from fixtures.torchvision_loader import import_torchvision
    if import_torchvision() is None:
        pytest.skip("torchvision (the test extra) is not installed")
    from transformers import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata
    proc = Qwen3VLVideoProcessor()
    want = proc.sample_frames(VideoMetadata(total_num_frames=total, fps=video_fps), fps=fps, num_frames=num)
    got = qwen3_vl_sampler(fps, num)(VideoMeta(total, video_fps, 64, 48))
    np.testing.assert_array_equal(got, np.asarray(want))


@pytest.mark.parametrize("total,video_fps,fps,num", [
    (11, 10.0, 2.0, 64), (300, 30.0, 1.0, 64), (3000, 30.0, 1.0, 64), (301, 29.97, 1.0, 8), (7, 5.0, 30.0, 64),
    (3, 5.0, 0.1, 64), (1000, 25.0, 4.0, 16), (9, 3.0, 0.5, 2)])
def test_smolvlm_sampler_matches_transformers(total, video_fps, fps, num):
    from fixtures.torchvision_loader import import_torchvision
    if import_torchvision() is None:
        pytest.skip("torchvision (the test extra) is not installed")
    from transformers import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata
    want = SmolVLMVideoProcessor().sample_frames(
        VideoMetadata(total_num_frames=total, fps=video_fps, duration=total / video_fps), fps=fps, num_frames=num)
    np.testing.assert_array_equal(smolvlm_sampler(fps, num)(VideoMeta(total, video_fps, 64, 48)), want)


def test_resize_matches_torchvision():
    from fixtures.torchvision_loader import import_torchvision
    if import_torchvision() is None:
        pytest.skip("torchvision (the test extra) is not installed")
    import torch
    import torchvision.transforms.v2.functional as tvF
    rng = np.random.default_rng(1)
    for h, w, nh, nw in [(60, 90, 112, 140), (97, 131, 56, 84), (480, 640, 336, 448), (33, 200, 33, 56),
                         (50, 50, 150, 50), (7, 300, 28, 28)]:
        x = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        for kind, mode in (("bicubic", tvF.InterpolationMode.BICUBIC), ("lanczos", tvF.InterpolationMode.LANCZOS)):
            want = tvF.resize(torch.from_numpy(x).permute(0, 3, 1, 2), [nh, nw], interpolation=mode,
                              antialias=True).permute(0, 2, 3, 1).numpy()
            np.testing.assert_array_equal(resize_frames(x, nh, nw, kind), want, err_msg=f"{kind} {h}x{w}->{nh}x{nw}")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_bad_videos_are_one_clear_error_and_leave_nothing_open(tmp_path):
    good = make_clip(tmp_path / "c.mp4", n=11, width=64, height=48, fps=10)
    data = good.read_bytes()
    (tmp_path / "trunc.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "still.png")
    cases = {
        str(tmp_path / "missing.mp4"): "not found",
        str(tmp_path / "trunc.mp4"): "video",
        str(tmp_path / "noise.mp4"): "video",
        str(tmp_path / "empty.mp4"): "video",
        str(tmp_path): "directory",
        "data:image/png;base64,AAAA": "not a video type",
        "ftp://x/y.mp4": "scheme",
    }
    before = _open_fds()
    for src, words in cases.items():
        with pytest.raises(InputError, match=words):
            load_video(src)
    # a still image is not a video either (a PNG demuxes as a one-frame stream: refused by rate or kept as 1 frame)
    try:
        still = load_video(tmp_path / "still.png")
        assert still.frames.shape[0] == 1
    except InputError:
        pass
    limits = {"max_bytes": len(data) - 1, "max_duration": 0.5, "max_frame_pixels": 64 * 48 - 1, "max_frames": 3,
              "max_total_frames": 10}
    for key, value in limits.items():
        with pytest.raises(InputError, match="limit"):
            load_video(good, uniform_sampler(), VideoLimits(**{key: value}))
    with pytest.raises(InputError, match="cannot sample"):
        load_video(good, uniform_sampler(num_frames=12))
    assert _open_fds() == before


def test_video_ref_checks_its_settings():
    for kw in ({"fps": 0}, {"fps": -1.0}, {"fps": "2"}, {"max_frames": 0}, {"num_frames": 1.5},
               {"fps": 1.0, "num_frames": 4}):
        with pytest.raises(InputError):
            VideoRef("x.mp4", **kw)


def test_frame_count_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    from vlmc.models.common.smolvlm_video import number_words
    for n in list(range(0, 1200)) + [2000, 2005, 2340, 10_001, 123_456, 999_999]:
        assert number_words(n) == num2words(n), n
