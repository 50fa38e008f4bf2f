"""Videos through the user-facing surfaces: ``vlmc run --video``, ``generate(videos=...)``
and the server's ``video_url`` / ``input_video`` parts (with a 400 for every bad video),
on the bundled demo model (Qwen2-VL shapes)."""
from __future__ import annotations

import base64
import shutil

import pytest
from click.testing import CliRunner

pytest.importorskip("av")

import vlmc  # noqa: E402
from vlmc.cli import main  # noqa: E402
from vlmc.errors import InputError  # noqa: E402
from vlmc.runtime.video import VideoRef  # noqa: E402

from fixtures.videos import make_clip  # noqa: E402
from serve_helpers import EXAMPLES, LiveServer  # noqa: E402


def _uri(path, mime="video/mp4"):
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    good = make_clip(root / "clip.mp4", n=33, width=84, height=56, fps=4)
    (root / "broken.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (root / "text.mp4").write_bytes(b"this is not a video at all" * 40)
    return root


@pytest.fixture(scope="module")
def model():
    from vlmc.demo import MODEL_DIR
    return vlmc.load(str(MODEL_DIR))


def test_generate_takes_videos_in_order_with_images(model, clips):
    clip = clips / "clip.mp4"
    r = model.generate("What happens?", videos=[clip], max_tokens=3)
    assert r.prompt_tokens > 10 and r.generation_tokens >= 1
    # interleaved: image, video, image -> three placeholders in that order
    p = model.build_prompt("Compare.", images=[str(EXAMPLES / "shapes-1.png"), VideoRef(clip, num_frames=4),
                                               str(EXAMPLES / "shapes-2.png")])
    kinds = p.images.item_token_ids(model.image_token_id)
    assert kinds == [model.image_token_id, model.inputs.video_token_id, model.image_token_id]
    assert p.images.grid_thw[1][0] == 2          # 4 frames -> 2 temporal patches
    with pytest.raises(InputError, match="cannot (read|decode) video"):
        model.generate("?", videos=[clips / "broken.mp4"], max_tokens=1)


def test_cli_video_flags_and_errors(clips, monkeypatch):
    from vlmc.demo import MODEL_DIR
    from vlmc.runtime.engine import VLM
    seen = {}
    real = VLM.stream_generate

    def spy(self, prompt=None, **kw):
        seen["images"] = kw.get("images")
        return real(self, prompt, **kw)
    monkeypatch.setattr(VLM, "stream_generate", spy)
    runner = CliRunner()
    img = str(EXAMPLES / "shapes-1.png")
    clip = str(clips / "clip.mp4")
    r = runner.invoke(main, ["run", str(MODEL_DIR), "-p", "What moves?", "--video", clip, "-i", img,
                             "--fps", "2", "--max-frames", "6", "--max-tokens", "2"])
    assert r.exit_code == 0, r.output
    first, second = seen["images"]
    assert isinstance(first, VideoRef) and first.fps == 2 and first.max_frames == 6 and second == img
    r = runner.invoke(main, ["run", str(MODEL_DIR), "-p", "?", "-i", img, "--video", clip, "--max-tokens", "1"])
    assert r.exit_code == 0 and seen["images"][0] == img and isinstance(seen["images"][1], VideoRef)
    for bad, words in ((clips / "broken.mp4", "video"), (clips / "text.mp4", "video"), (clips / "none.mp4", "not found")):
        r = runner.invoke(main, ["run", str(MODEL_DIR), "-p", "?", "--video", str(bad), "--max-tokens", "1"])
        assert r.exit_code != 0
        assert words in r.output and "Traceback" not in r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(main, ["run", str(MODEL_DIR), "-p", "?", "--fps", "2", "--max-tokens", "1"])
    assert r.exit_code != 0 and "--video" in r.output


@pytest.fixture(scope="module")
def server(tmp_path_factory, clips):
    from vlmc.demo import MODEL_DIR
    s = LiveServer(str(MODEL_DIR), "--allowed-local-media-path", str(clips), "--max-video-frames", "16",
                   "--max-videos", "2")
    yield s
    s.stop()


def _chat(server, *parts, text="What moves?"):
    return server.post("/v1/chat/completions", {"model": "vlmc-demo", "max_tokens": 3, "temperature": 0,
                                                "messages": [{"role": "user", "content": [
                                                    *parts, {"type": "text", "text": text}]}]})


def test_server_video_parts(server, clips):
    clip = clips / "clip.mp4"
    status, body = _chat(server, {"type": "video_url", "video_url": {"url": _uri(clip)}})
    assert status == 200, body
    first = body["usage"]["prompt_tokens"]
    status, body = _chat(server, {"type": "input_video", "input_video": str(clip), "fps": 1.0})
    assert status == 200, body
    assert body["usage"]["prompt_tokens"] < first  # fewer frames at 1 fps than at the default 2
    status, body = _chat(server, {"type": "image_url", "image_url": {"url": _uri(EXAMPLES / "shapes-1.png",
                                                                                  "image/png")}},
                         {"type": "video_url", "video_url": {"url": _uri(clip), "num_frames": 4}})
    assert status == 200, body
    status, models = server.get("/v1/models")[0], server.get("/v1/models")[2]
    assert b'"video"' in models


@pytest.mark.parametrize("part,words", [
    ({"type": "video_url", "video_url": {"url": "BROKEN"}}, "cannot (read|decode) video"),
    ({"type": "video_url", "video_url": {"url": "TEXT"}}, "video"),
    ({"type": "video_url", "video_url": {"url": "data:image/png;base64,AAAA"}}, "not a video type"),
    ({"type": "video_url", "video_url": {"url": "GOOD", "fps": 0}}, "fps"),
    ({"type": "video_url", "video_url": {"url": "GOOD", "num_frames": 40}}, "limit|cannot sample"),
    ({"type": "video_url", "video_url": {"url": "/etc/passwd"}}, "outside the allowed"),
    ({"type": "video_url"}, "no video"),
])
def test_server_bad_videos_are_400(server, clips, part, words):
    import json
    import re
    raw = json.dumps(part).replace('"BROKEN"', json.dumps(_uri(clips / "broken.mp4"))) \
        .replace('"TEXT"', json.dumps(_uri(clips / "text.mp4"))).replace('"GOOD"', json.dumps(_uri(clips / "clip.mp4")))
    status, body = _chat(server, json.loads(raw))
    assert status == 400, body
    assert re.search(words, body["error"]["message"]), body
    status, _ = _chat(server, {"type": "video_url", "video_url": {"url": _uri(clips / "clip.mp4")}})
    assert status == 200  # the server goes on


def test_server_counts_videos(server, clips):
    part = {"type": "video_url", "video_url": {"url": _uri(clips / "clip.mp4")}}
    status, body = _chat(server, part, part, part)
    assert status == 400 and "--max-videos" in body["error"]["message"]


def test_second_question_reuses_features_and_prefix_blocks(model, clips):
    """Through the batching loop (what the server runs): the same video again encodes nothing
    and imports the KV blocks before the question; the same frames at another sampled rate
    (other M-RoPE times on Qwen2.5-VL) are another key."""
    import threading

    from vlmc.runtime.batcher import Batcher, FinishEvent, Job
    from vlmc.runtime.prefix_cache import PrefixCache
    from vlmc.runtime.vision_cache import VisionFeatureCache, image_keys

    def ask(batcher, prompt):
        done, seen = threading.Event(), {}

        def emit(ev):
            if isinstance(ev, FinishEvent):
                seen["cached"] = ev.cached_tokens
                done.set()
        batcher.submit(Job(prompt, emit, max_tokens=1))
        assert done.wait(120)
        return seen["cached"]

    def prompt(question, **sampling):
        return model.build_prompt(messages=[{"role": "user", "content": [
            {"type": "video", "video": str(clips / "clip.mp4"), **sampling}, {"type": "text", "text": question}]}])

    vision = VisionFeatureCache()
    batcher = Batcher(model, vision_cache=vision, prefix_cache=PrefixCache(), max_batch=1)
    try:
        first = prompt("What moves first?", fps=2.0)
        assert ask(batcher, first) == 0 and vision.stats()["misses"] == 1
        second = prompt("Where does the disc go?", fps=2.0)
        cached = ask(batcher, second)
        assert vision.stats()["hits"] == 1 and vision.stats()["misses"] == 1
        start = second.ids.index(model.inputs.video_token_id)
        assert cached > start + second.images.num_tokens[0] - 32  # every whole block up to the question
    finally:
        batcher.shutdown()
    # same pixels and grid, another sampled rate: another key
    other = prompt("?", fps=2.0)
    other.images.timing = [dict(other.images.timing[0], fps=other.images.timing[0]["fps"] * 2)]
    other.images.content_keys = None
    assert image_keys(other.images) != image_keys(first.images)
