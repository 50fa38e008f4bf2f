"""Python API and sources: vlmc.load / generate / stream_generate, hub ids through the cache."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import vlmc
from fixtures.checkpoints import build_checkpoint, make_test_image
from vlmc.errors import InputError, SourceError
from vlmc.frontend.source import resolve_source


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "qwen2_vl"
    build_checkpoint(path, "qwen2_vl")
    return path


@pytest.fixture(scope="module")
def model(ckpt, tmp_path_factory):
    return vlmc.load(vlmc.compile(ckpt, tmp_path_factory.mktemp("art") / "a"))


def test_generate_reports_text_and_stats(model):
    r = model.generate("Describe the picture.", images=[make_test_image(80, 60, 1)], max_tokens=6)
    assert r.generation_tokens == len(r.token_ids) <= 6
    assert r.prompt_tokens > 20  # the image expanded to its patch tokens
    assert r.finish_reason in ("stop", "length")
    assert r.prompt_tps > 0 and r.peak_memory_gb > 0
    if r.finish_reason == "length":
        assert r.generation_tokens == 6


def test_stream_concatenates_to_generate(model):
    kw = dict(max_tokens=12, temperature=0.0)
    chunks = list(model.stream_generate("Tell me a story.", **kw))
    assert chunks[-1].finish_reason is not None
    assert "".join(c.text for c in chunks) == model.generate("Tell me a story.", **kw).text


def test_stop_string_cuts_the_text(model):
    full = model.generate("Tell me a story.", max_tokens=16).text
    assert len(full) > 4
    stop = full[2:4]
    cut = model.generate("Tell me a story.", max_tokens=16, stop=[stop])
    assert cut.finish_reason == "stop"
    assert stop not in cut.text and full.startswith(cut.text)


def test_seeded_sampling_is_reproducible(model):
    a = model.generate("Hi", max_tokens=8, temperature=1.0, seed=7).token_ids
    b = model.generate("Hi", max_tokens=8, temperature=1.0, seed=7).token_ids
    runs = {tuple(model.generate("Hi", max_tokens=8, temperature=1.5, seed=s).token_ids) for s in range(5)}
    assert a == b
    assert len(runs) > 1


def test_image_counts_must_match(model):
    img = make_test_image(64, 64, 2)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    with pytest.raises(InputError, match="no image or video part"):
        model.generate(messages=msgs, images=[img, img], max_tokens=2)
    with pytest.raises(InputError, match="image or video part .* has no source"):
        model.generate(messages=msgs, max_tokens=2)
    with pytest.raises(InputError, match="max_tokens"):
        model.generate("hi", max_tokens=0)


def test_invalid_sampling_values_are_refused(model):
    with pytest.raises(InputError, match="top_p"):
        model.generate("hi", top_p=0.0)


def test_cli_run_with_image(tmp_path, model):
    img = tmp_path / "x.png"
    make_test_image(70, 50, 3).save(img)
    out = subprocess.run([sys.executable, "-m", "vlmc.cli", "run", str(model.artifact.path), "-p", "What is it?",
                          "--image", str(img), "--max-tokens", "4", "-v"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "prompt:" in out.stderr and "tok/s" in out.stderr


def _hub_cache(root, repo: str, ckpt) -> None:
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    snap = base / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text("0123abcd")
    for f in ckpt.iterdir():
        shutil.copy(f, snap / f.name)


_RESOLVE = """
import sys
from vlmc.errors import SourceError
from vlmc.frontend.source import resolve_source
print((resolve_source("acme/tiny-vl", progress=False) / "config.json").is_file())
try:
    resolve_source("acme/not-there", progress=False)
except SourceError as e:
    print("SourceError:", e)
"""


def _resolve_in_subprocess(env_extra: dict) -> list[str]:
    # huggingface_hub reads its environment at import, so each setting gets a fresh process.
    import os
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-c", _RESOLVE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()


def test_hub_id_resolves_from_cache_offline(ckpt, tmp_path):
    _hub_cache(tmp_path / "hub", "acme/tiny-vl", ckpt)
    lines = _resolve_in_subprocess({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert lines[0] == "True"
    assert lines[1].startswith("SourceError:") and "not in the local cache" in lines[1]


def test_hub_id_falls_back_to_cache_when_hub_unreachable(ckpt, tmp_path):
    _hub_cache(tmp_path / "hub", "acme/tiny-vl", ckpt)
    # nothing listens on port 9: the hub is "down", the cached snapshot must serve
    lines = _resolve_in_subprocess({"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9",
                                    "HF_HUB_OFFLINE": "0"})
    assert lines[0] == "True"
    assert lines[1].startswith("SourceError:") and "cannot fetch" in lines[1]


@pytest.mark.parametrize("bad", ["./nope", "/definitely/not/here", "not a repo id"])
def test_bad_sources_name_the_problem(bad):
    with pytest.raises(SourceError):
        resolve_source(bad, progress=False)
