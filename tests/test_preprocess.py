"""Image loading and preprocessing: parity with transformers' PIL image processors, and
clear InputErrors for every bad image a user can send.

transformers is the oracle here only (the runtime never imports it)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from vlmc.errors import ArtifactError, InputError, SourceError
from vlmc.runtime.images import load_image
from vlmc.models.common.processors import make_image_processor, spec_from_preprocessor_config

tf_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
tf_clip = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
tf_siglip = pytest.importorskip("transformers.models.siglip.image_processing_pil_siglip")
tf_image_utils = pytest.importorskip("transformers.image_utils")

TOL = 1e-5

# Published preprocessor_config.json files (Qwen2-VL-2B-Instruct, llava-interleave-qwen-0.5b,
# Qwen3-VL-2B), as stored in shared/reference-configs.
QWEN2_VL_PUBLISHED = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "min_pixels": 3136, "max_pixels": 12845056,
    "size": {"shortest_edge": 3136, "longest_edge": 12845056}, "merge_size": 2, "patch_size": 14,
    "temporal_patch_size": 2, "processor_class": "Qwen2VLProcessor", "resample": 3,
    "rescale_factor": 0.00392156862745098,
}
QWEN3_VL_PUBLISHED = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
    "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}
LLAVA_SIGLIP_PUBLISHED = {
    "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor", "processor_class": "LlavaProcessor",
    "resample": 3, "rescale_factor": 0.00392156862745098, "size": {"height": 384, "width": 384},
}

_REF_CLASSES = {
    "qwen2_vl": tf_qwen.Qwen2VLImageProcessorPil,
    "clip": tf_clip.CLIPImageProcessorPil,
    "siglip": tf_siglip.SiglipImageProcessorPil,
}
_SERVICE_KEYS = ("image_processor_type", "processor_class")


def noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def rgb_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(width, height, 3, seed))


def reference(kind: str, cfg: dict, images: list[Image.Image]):
    kwargs = {k: v for k, v in cfg.items() if k not in _SERVICE_KEYS and v is not None}
    return _REF_CLASSES[kind](**kwargs)(images, return_tensors="np")


def ours(kind: str, cfg: dict, images: list[Image.Image], tokens_per_image: int = 7):
    extra = {} if kind == "qwen2_vl" else {"tokens_per_image": tokens_per_image}
    spec = spec_from_preprocessor_config(cfg, kind, **extra)
    return make_image_processor(spec).process(images)


def assert_matches(kind: str, cfg: dict, images: list[Image.Image]) -> None:
    ref = reference(kind, cfg, images)
    out = ours(kind, cfg, images)
    ref_pixels = np.asarray(ref["pixel_values"])
    assert out.pixel_values.dtype == np.float32
    assert out.pixel_values.shape == ref_pixels.shape
    assert np.abs(out.pixel_values - ref_pixels).max() <= TOL
    assert out.image_sizes == [(im.height, im.width) for im in images]
    if kind == "qwen2_vl":
        ref_grid = np.asarray(ref["image_grid_thw"])
        assert out.grid_thw.dtype == np.int64
        np.testing.assert_array_equal(out.grid_thw, ref_grid)
        merge = spec_from_preprocessor_config(cfg, kind)["merge_size"] ** 2
        assert out.num_tokens == [int(np.prod(g)) // merge for g in ref_grid]
    else:
        assert out.grid_thw is None
        assert out.num_tokens == [7] * len(images)


# --------------------------------------------------------------------------- Qwen2-VL parity

QWEN_CFGS = {
    "small": {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 256},
    "published": {"min_pixels": 3136, "max_pixels": 12845056},
}


@pytest.mark.parametrize("cfg_name", sorted(QWEN_CFGS))
# (900, 700) exceeds the small max_pixels (floor branch); (126, 70) rounds halves (126/28 = 4.5) to even.
@pytest.mark.parametrize("size", [(448, 448), (300, 170), (170, 300), (1000, 90), (900, 700), (126, 70)])
def test_qwen2_vl_matches_transformers(cfg_name, size):
    assert_matches("qwen2_vl", QWEN_CFGS[cfg_name], [rgb_image(*size)])


def test_qwen2_vl_several_images_concatenate_along_patch_axis():
    images = [rgb_image(448, 448, 1), rgb_image(300, 170, 2), rgb_image(64, 64, 3)]
    assert_matches("qwen2_vl", QWEN_CFGS["small"], images)
    out = ours("qwen2_vl", QWEN_CFGS["small"], images)
    assert out.pixel_values.shape[0] == int(out.grid_thw.prod(axis=1).sum())
    assert out.pixel_values.shape[1] == 3 * 2 * 14 * 14


@pytest.mark.parametrize(
    "cfg", [{}, QWEN2_VL_PUBLISHED, QWEN3_VL_PUBLISHED], ids=["class-defaults", "qwen2-vl-2b", "qwen3-vl-2b"]
)
def test_qwen2_vl_config_defaults_match_transformers(cfg):
    assert_matches("qwen2_vl", cfg, [rgb_image(300, 170)])


def test_qwen2_vl_spec_fills_class_defaults():
    spec = spec_from_preprocessor_config({}, "qwen2_vl")
    assert spec["min_pixels"] == 56 * 56 and spec["max_pixels"] == 28 * 28 * 1280
    assert (spec["patch_size"], spec["temporal_patch_size"], spec["merge_size"]) == (14, 2, 2)
    assert spec["resample"] == 3
    # top-level min/max_pixels win over size, as in Qwen2VLImageProcessor.__init__
    spec = spec_from_preprocessor_config(
        {"min_pixels": 100, "max_pixels": 200_000, "size": {"shortest_edge": 1, "longest_edge": 2}}, "qwen2_vl"
    )
    assert (spec["min_pixels"], spec["max_pixels"]) == (100, 200_000)
    assert json.loads(json.dumps(spec)) == spec


def test_qwen2_vl_extreme_aspect_ratio_is_an_input_error():
    image = rgb_image(402, 2)
    with pytest.raises(ValueError, match="aspect ratio"):
        reference("qwen2_vl", QWEN_CFGS["small"], [image])
    with pytest.raises(InputError, match="aspect ratio"):
        ours("qwen2_vl", QWEN_CFGS["small"], [image])
    # 200:1 exactly is still accepted, as in transformers
    assert_matches("qwen2_vl", QWEN_CFGS["small"], [rgb_image(400, 2)])


# --------------------------------------------------------------------------- CLIP / SigLIP parity

CLIP_CFGS = {
    "defaults": {},
    "small": {"size": {"shortest_edge": 56}, "crop_size": {"height": 56, "width": 56}},
    "legacy-int-size": {"size": 64, "crop_size": 48},
    "crop-larger-than-resize": {"size": {"shortest_edge": 32}, "crop_size": {"height": 47, "width": 61}},
}
SIGLIP_CFGS = {
    "384": {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
    "56": {"size": {"height": 56, "width": 56}},
    "defaults": {},
    "llava-interleave": LLAVA_SIGLIP_PUBLISHED,
}


@pytest.mark.parametrize("cfg_name", sorted(CLIP_CFGS))
@pytest.mark.parametrize("size", [(300, 170), (170, 300), (448, 448)])
def test_clip_matches_transformers(cfg_name, size):
    assert_matches("clip", CLIP_CFGS[cfg_name], [rgb_image(*size)])


@pytest.mark.parametrize("cfg_name", sorted(SIGLIP_CFGS))
@pytest.mark.parametrize("size", [(300, 170), (448, 448)])
def test_siglip_matches_transformers(cfg_name, size):
    assert_matches("siglip", SIGLIP_CFGS[cfg_name], [rgb_image(*size)])


def test_clip_batch_stacks_images():
    images = [rgb_image(300, 170, 1), rgb_image(90, 200, 2)]
    assert_matches("clip", CLIP_CFGS["small"], images)
    assert ours("clip", CLIP_CFGS["small"], images).pixel_values.shape == (2, 3, 56, 56)


def test_siglip_specs_have_no_center_crop_and_exact_resize():
    spec = spec_from_preprocessor_config(LLAVA_SIGLIP_PUBLISHED, "clip", tokens_per_image=729)
    assert spec["kind"] == "clip" and spec["do_center_crop"] is False
    assert spec["size"] == {"height": 384, "width": 384} and spec["do_convert_rgb"] is True
    clip = spec_from_preprocessor_config({}, "clip", tokens_per_image=256)
    assert clip["size"] == {"shortest_edge": 224} and clip["crop_size"] == {"height": 224, "width": 224}
    assert clip["do_center_crop"] is True
    assert json.loads(json.dumps(spec)) == spec


def test_clip_spec_requires_tokens_per_image():
    spec = spec_from_preprocessor_config({}, "clip", tokens_per_image=49)
    del spec["tokens_per_image"]
    with pytest.raises(ArtifactError, match="tokens_per_image"):
        make_image_processor(spec)
    with pytest.raises(SourceError, match="tokens_per_image"):
        spec_from_preprocessor_config({}, "clip")


def test_unsupported_config_is_refused():
    with pytest.raises(SourceError, match="do_pad"):
        spec_from_preprocessor_config({"do_pad": True}, "clip", tokens_per_image=1)
    with pytest.raises(SourceError, match="size"):
        spec_from_preprocessor_config({"size": {"longest_edge": 10}}, "clip", tokens_per_image=1)
    with pytest.raises(SourceError, match="kind"):
        spec_from_preprocessor_config({}, "no_such_kind")
    with pytest.raises(ArtifactError, match="kind"):
        make_image_processor({"kind": "nope"})


# --------------------------------------------------------------------------- image modes


def mode_image(mode: str) -> Image.Image:
    if mode == "RGBA":
        return Image.fromarray(noise(90, 60, 4, seed=5), "RGBA")
    if mode == "LA":
        return Image.fromarray(noise(90, 60, 3, seed=6)[:, :, :2].copy(), "LA")
    if mode == "L":
        return Image.fromarray(noise(90, 60, 1, seed=7), "L")
    if mode == "P":
        return rgb_image(90, 60, seed=8).quantize(colors=64)
    if mode == "P+transparency":
        image = rgb_image(90, 60, seed=9).quantize(colors=16)
        image.info["transparency"] = 3
        return image
    if mode == "tiny":
        return rgb_image(1, 1, seed=10)
    raise AssertionError(mode)


MODES = ["RGBA", "LA", "L", "P", "P+transparency", "tiny"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "kind,cfg", [("qwen2_vl", QWEN_CFGS["small"]), ("clip", CLIP_CFGS["small"]), ("siglip", SIGLIP_CFGS["56"])]
)
def test_image_modes_match_transformers(kind, cfg, mode):
    assert_matches(kind, cfg, [mode_image(mode)])


def test_tiny_image_is_upscaled_to_the_minimum_grid():
    out = ours("qwen2_vl", QWEN_CFGS["small"], [mode_image("tiny")])
    assert out.grid_thw.tolist() == [[1, 4, 4]] and out.num_tokens == [4]


def test_rgb_conversion_off_rejects_non_rgb():
    cfg = dict(QWEN_CFGS["small"], do_convert_rgb=False)
    with pytest.raises(InputError, match="do_convert_rgb"):
        ours("qwen2_vl", cfg, [mode_image("L")])
    assert_matches("qwen2_vl", cfg, [rgb_image(100, 80)])


def test_zero_size_image_is_an_input_error():
    with pytest.raises(InputError, match="zero size"):
        ours("qwen2_vl", {}, [Image.new("RGB", (0, 5))])


# --------------------------------------------------------------------------- load_image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with garbage pixel data: opening it
    is cheap, decoding it fails."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")


def test_load_image_local_path(tmp_path):
    image = rgb_image(40, 30)
    path = tmp_path / "a.png"
    image.save(path)
    for src in (path, str(path), path.as_uri()):
        loaded = load_image(src)
        assert loaded.mode == "RGB" and loaded.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))


def test_load_image_missing_path_and_directory(tmp_path):
    with pytest.raises(InputError, match="not found.*nope.png"):
        load_image(str(tmp_path / "nope.png"))
    with pytest.raises(InputError, match="directory"):
        load_image(tmp_path)


def test_load_image_bytes_and_pil():
    image = rgb_image(20, 10)
    np.testing.assert_array_equal(np.asarray(load_image(png_bytes(image))), np.asarray(image))
    assert load_image(image).size == (20, 10)


def test_load_image_data_uri():
    image = rgb_image(16, 12)
    payload = base64.b64encode(png_bytes(image)).decode()
    loaded = load_image("data:image/png;base64," + payload)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    assert load_image("data:image/png;base64," + wrapped).size == (16, 12)
    with pytest.raises(InputError, match="invalid base64"):
        load_image("data:image/png;base64,@@not*base64@@")
    with pytest.raises(InputError, match="invalid base64"):
        load_image("data:image/png;base64,abcde")
    with pytest.raises(InputError, match="base64"):
        load_image("data:image/png," + payload)
    with pytest.raises(InputError, match="not an image"):
        load_image("data:text/plain;base64," + base64.b64encode(b"hello").decode())
    with pytest.raises(InputError, match="limit"):
        load_image("data:image/png;base64," + payload, max_bytes=10)


def test_load_image_truncated_png_and_jpeg(tmp_path):
    image = rgb_image(64, 64)
    data = png_bytes(image)
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cannot decode image .*cut\.png: truncated"):
        load_image(path)
    buf = io.BytesIO()
    image.save(buf, "JPEG")
    with pytest.raises(InputError, match="cannot decode image <bytes>: truncated"):
        load_image(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_load_image_non_image_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("definitely not an image\n" * 10)
    with pytest.raises(InputError, match="not a recognised image format"):
        load_image(path)
    with pytest.raises(InputError, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]


def test_load_image_rejects_huge_images_from_the_header():
    # The pixel data is garbage: reaching the size error proves nothing was decoded.
    with pytest.raises(InputError, match="too large: 300x200 = 60000 pixels, over the limit of 50000"):
        load_image(png_header_only(300, 200), max_pixels=50_000)
    with pytest.raises(InputError, match="too large"):
        load_image(png_header_only(20000, 20000))
    with pytest.raises(InputError, match="cannot decode"):
        load_image(png_header_only(300, 200))


def test_load_image_composites_alpha_on_white_like_transformers():
    rgba = mode_image("RGBA")
    loaded = load_image(png_bytes(rgba))
    expected = tf_image_utils_convert(rgba)
    np.testing.assert_array_equal(np.asarray(loaded), expected)
    clear = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(load_image(clear)).tolist() == [[[255, 255, 255]] * 4] * 4


def tf_image_utils_convert(image: Image.Image) -> np.ndarray:
    from transformers.image_transforms import convert_to_rgb

    return convert_to_rgb(image, return_numpy=True)


def test_load_image_applies_exif_orientation_like_transformers(tmp_path):
    image = rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif.tobytes())
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(tf_image_utils.load_image(str(path))))


# --------------------------------------------------------------------------- load_image over HTTP (loopback only)


class _Handler(http.server.BaseHTTPRequestHandler):
    png = png_bytes(rgb_image(24, 18))

    def do_GET(self):  # noqa: N802 - http.server API
        if self.path == "/ok.png":
            self._send(self.png)
        elif self.path == "/slow.png":
            time.sleep(1.0)
            self._send(self.png)
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                for byte in self.png[:40]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        else:
            self.send_error(404, "Not Found")

    def _send(self, body: bytes) -> None:
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def test_load_image_url(server):
    loaded = load_image(server + "/ok.png")
    assert loaded.size == (24, 18) and loaded.mode == "RGB"


def test_load_image_url_404(server):
    url = server + "/missing.png"
    with pytest.raises(InputError, match=f"cannot fetch image {url}: HTTP 404"):
        load_image(url)


def test_load_image_url_timeout(server):
    start = time.monotonic()
    with pytest.raises(InputError, match="slow.png: timed out after 0.2 s"):
        load_image(server + "/slow.png", timeout=0.2)
    with pytest.raises(InputError, match="trickle.png: timed out after 0.3 s"):
        load_image(server + "/trickle.png", timeout=0.3)
    assert time.monotonic() - start < 1.5


def test_load_image_url_byte_cap(server):
    with pytest.raises(InputError, match="over the limit of 100 bytes"):
        load_image(server + "/ok.png", max_bytes=100)


def test_load_image_url_connection_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InputError, match=f"127.0.0.1:{port}/x.png: connection refused"):
        load_image(f"http://127.0.0.1:{port}/x.png", timeout=2)


def test_load_image_unsupported_scheme():
    with pytest.raises(InputError, match="scheme 'ftp'"):
        load_image("ftp://example.com/a.png")


def test_file_names_that_look_like_schemes_are_paths(tmp_path):
    weird = tmp_path / "http_example.png"
    rgb_image(5, 5).save(weird)
    assert load_image(str(weird)).size == (5, 5)
