"""The building blocks every family's parity tests share: the chats they run, the
module-scoped store of checkpoints, artifacts, loaded models and transformers references,
and the checks (prompt ids, greedy tokens and logits against a reference, ragged batches
against single rows, the batching loop, quantized weights and KV caches, speculative
decoding, refused configs, an artifact without torch).

A family's test file keeps what is its own: its checkpoint builder and reference, its
cases and configs, how its pixels compare, and its extra checks. Nothing here imports
torch or transformers at module level (the families skip without them first).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from fixtures import checkpoints as ck
from vlmc.compiler import compile as vlmc_compile
from vlmc.runtime.sampling import Sampler, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[1]

GREEDY_STEPS = 16
LOGIT_STEPS = 16  # logits compared at every greedy step (the brief asks for >= 8)
MIN_MARGIN = 1e-3  # fixture cases must not hinge on a near-tie (10x the logits tolerance)
LOGIT_ATOL = 1e-4
PIXEL_ATOL = 1e-5


# ------------------------------------------------------------------------------ chats


def _user(*parts):
    return {"role": "user", "content": list(parts)}


IMG = {"type": "image"}


def _txt(s):
    return {"type": "text", "text": s}


# name -> (messages, image sizes (w, h)); image i is made with seed 10 + i
CASES = {
    "text": ([_user(_txt("Tell me a short story about the river."))], []),
    "one_image": ([_user(IMG, _txt("Describe the picture."))], [(100, 70)]),
    "two_images": (
        [_user(IMG, _txt("Compare this picture"), IMG, _txt(" with that one."))],
        [(150, 100), (64, 64)],
    ),
    "wide": ([_user(IMG, _txt("What is on the left side?"))], [(150, 60)]),
    "tall": ([_user(IMG, _txt("Is there any text in it?"))], [(60, 150)]),
    "multi_turn": (
        [
            _user(IMG, _txt("What is in the image?")),
            {"role": "assistant", "content": [_txt("A red square and a blue circle.")]},
            _user(_txt("How many shapes are there?")),
        ],
        [(120, 90)],
    ),
}
CASE_NAMES = list(CASES)
SMALL = ([_user(IMG, _txt("What is this?"))], [(40, 30)])
CHAT = ([{"role": "system", "content": "Answer briefly."}, _user(_txt("What is the weather today?")),
         {"role": "assistant", "content": [_txt("Sunny with a light wind.")]}, _user(_txt("And tomorrow?"))], [])


class Cases:
    """The shared chats plus a family's own; ``inputs`` gives (messages, images)."""

    def __init__(self, **extra):
        self.all = {**CASES, **extra}

    def inputs(self, name):
        messages, sizes = self.all[name]
        return messages, [ck.make_test_image(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)]

    def prompt(self, m, name):
        messages, images = self.inputs(name)
        return m.build_prompt(messages=messages, images=images)


# ------------------------------------------------------------------------------ the store


class Store:
    """Checkpoints built, compiled and loaded once per module; transformers references cached.

    ``build(path, [family,] **kw)`` makes a checkpoint (``family`` only where the store's
    checkpoints have one), ``hf(info)`` gives transformers' (processor, model),
    ``reference(info, messages, images, **kw)`` runs them; ``defaults(family)``: the
    builder's keywords every checkpoint of a family gets (its seed)."""

    def __init__(self, root: Path, name, build, hf, reference, cases: Cases, defaults=None):
        self.root, self.name, self.cases = root, name, cases
        self._build, self._hf, self._reference, self._defaults = build, hf, reference, defaults
        self.ckpts, self.arts, self.models, self.hf, self.refs = {}, {}, {}, {}, {}

    def ckpt(self, family=None, **kw):
        if self._defaults is not None:
            kw = {**self._defaults(family), **kw}
        key = (family, tuple(sorted(kw.items())))
        if key not in self.ckpts:
            name = "_".join([family or self.name] + [f"{k}-{v}" for k, v in sorted(kw.items())])
            args = () if family is None else (family,)
            self.ckpts[key] = self._build(self.root / "ckpt" / name, *args, **kw)
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
            self.hf[info["path"]] = self._hf(info)
        return self.hf[info["path"]]

    def ref(self, info, case):
        key = (info["path"], case)
        if key not in self.refs:
            proc, model = self.hf_pair(info)
            messages, images = self.cases.inputs(case)
            self.refs[key] = self._reference(info, messages, images, greedy_steps=GREEDY_STEPS,
                                             processor=proc, model=model)
        return self.refs[key]


def store_fixture(name, **kw):
    """The module-scoped ``store`` fixture of a family's test file (``Store``'s arguments)."""

    @pytest.fixture(scope="module")
    def store(tmp_path_factory):
        import torch

        torch.set_num_threads(2)
        return Store(tmp_path_factory.mktemp(name), name, **kw)

    return store


# ------------------------------------------------------------------------------ running and comparing


class ForcedSampler:
    """Returns given tokens in order (batch of one), ignoring the logits."""

    params = SamplingParams()

    def __init__(self, tokens):
        self.tokens = [int(t) for t in tokens]
        self.k = 0

    def __call__(self, logits, history=None):
        tok = mx.array([self.tokens[self.k]], dtype=mx.int32)
        self.k += 1
        return tok


def run_vlmc(m, prompts, steps=GREEDY_STEPS, *, sampler=None, logit_steps=LOGIT_STEPS):
    """Generate ``steps`` tokens for a batch (greedy unless ``sampler``); returns (tokens
    [B, steps], logits [B, min(steps, logit_steps), V]) as numpy float32."""
    toks, logits = [], []
    for k, (t, lg) in enumerate(m.generate_steps(prompts, sampler or Sampler(SamplingParams()), steps)):
        toks.append(np.array(t))
        if k < logit_steps:
            logits.append(np.array(lg.astype(mx.float32)))
    return np.stack(toks, 1).astype(np.int64), np.stack(logits, 1)


def chunked_prefill_logits(m, ids, sizes, decode_steps=3):
    """A prompt of token ``ids`` prefilled in chunks of ``sizes`` ([None]: whole; the last
    size repeats until the prompt is in), then ``decode_steps`` greedy steps: the logits
    after the prefill and after each step, as numpy arrays."""
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.step import Sequences
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(Prompt(ids=ids))])
    for size in sizes:
        logits = seqs.prefill(size)
    while not seqs.prefill_done:
        logits = seqs.prefill(sizes[-1])
    out = [np.array(logits)]
    for _ in range(decode_steps):
        logits = seqs.decode(mx.argmax(logits, -1).astype(mx.int32))
        out.append(np.array(logits))
    return out


def check_outputs(tokens, logits, ref, what=""):
    """tokens [steps], logits [n, V] of one sequence against a reference."""
    top2 = np.sort(ref["greedy_logits"], -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    # A precondition on the fixture, not on vlmc: with a top-2 margin below ~2x the
    # tolerance, identical greedy tokens would be luck. Pick another case if this fires.
    assert margin.min() >= MIN_MARGIN, f"{what}: reference top-2 margins too small: {margin.round(5)}"
    diffs = [float(np.abs(logits[0] - ref["prompt_logits_last"]).max())]
    n = min(len(logits), len(ref["greedy_logits"]))
    diffs += [float(np.abs(logits[k] - ref["greedy_logits"][k]).max()) for k in range(n)]
    assert max(diffs) <= LOGIT_ATOL, f"{what}: max |logits diff| per step {diffs}"
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"][: len(tokens)],
                                  err_msg=f"{what}: greedy tokens differ")


def check_generation(m, p, ref, what):
    """Greedy tokens and logits of prompt ``p`` alone against the reference."""
    toks, logits = run_vlmc(m, [p])
    check_outputs(toks[0], logits[0], ref, what)


def check_ids(p, ref, what):
    np.testing.assert_array_equal(np.asarray(p.ids, dtype=np.int64), ref["input_ids"],
                                  err_msg=f"{what}: prompt ids differ from transformers' input_ids")


def check_same_pixels(p, ref):
    """The prompt's pixel tensor has the reference's shape and values (within PIXEL_ATOL)."""
    mine = np.asarray(p.images.pixel_values, dtype=np.float32)
    assert mine.shape == ref["pixel_values"].shape, (mine.shape, ref["pixel_values"].shape)
    np.testing.assert_allclose(mine, ref["pixel_values"], rtol=0, atol=PIXEL_ATOL)


def check_patches(p, ref):
    """A Qwen-VL style processor's flattened patches ([sum of patches, C*T*p*p] on both
    sides, within PIXEL_ATOL) and their grids (equal)."""
    mine = np.asarray(p.images.pixel_values, dtype=np.float32)
    theirs = ref["pixel_values"]
    assert mine.size == theirs.size, (mine.shape, theirs.shape)
    np.testing.assert_array_equal(np.asarray(p.images.grid_thw, dtype=np.int64), ref["image_grid_thw"])
    np.testing.assert_allclose(mine.reshape(theirs.shape), theirs, rtol=0, atol=PIXEL_ATOL)


def assert_parity(m, p, ref, what, pixels=check_same_pixels, also=None):
    """Prompt ids, pixels (``pixels(p, ref)``; no images where the reference has none),
    ``also(m, p, ref)`` when given, then greedy tokens and logits."""
    check_ids(p, ref, what)
    if ref["pixel_values"] is None:
        assert p.images is None
    else:
        pixels(p, ref)
    if also is not None:
        also(m, p, ref)
    check_generation(m, p, ref, what)


def check_sharded(info):
    assert len(info["weight_files"]) == 2 and (Path(info["path"]) / "model.safetensors.index.json").is_file()


def check_bf16_artifact(m32, m16, prompt, what, *, flips=True):
    """A bfloat16 artifact teacher-forced on the float32 one's greedy tokens for
    ``prompt(m)`` stays within 0.5 of its logits; with ``flips``, its choice differs only
    where float32's own top-2 margin is within bf16 noise (0.25)."""
    t32, l32 = run_vlmc(m32, [prompt(m32)])
    _, l16 = run_vlmc(m16, [prompt(m16)], sampler=ForcedSampler(t32[0]))
    diff = np.abs(l16[0] - l32[0]).max(-1)
    assert np.isfinite(l16).all() and diff.max() < 0.5, f"{what}: {diff.round(3)}"
    if flips:
        top2 = np.sort(l32[0], -1)[:, -2:]
        agree = l16[0].argmax(-1) == t32[0]
        assert agree[top2[:, 1] - top2[:, 0] > 0.25].all()


# other config layout / shards of the same seed: the v5 checkpoint's references apply
LAYOUTS = {"v4_hub": dict(layout="v4"), "v4_sharded": dict(layout="v4", sharded=True),
           "v5_sharded": dict(sharded=True)}
# and where a family's fixture also writes transformers 4.52-4.57's "module" weight names
LAYOUTS_AND_MODULE_NAMES = {"v4_hub": dict(layout="v4"), "v5_module_names": dict(weight_names="module"),
                            "v4_sharded": dict(layout="v4", sharded=True), "v5_sharded": dict(sharded=True)}


def layout_checkpoints(store, kw, family=None, **same):
    """(the v5 checkpoint, the same one built with ``kw``); a sharded one has two shards
    and an index."""
    base, info = store.ckpt(family, **same), store.ckpt(family, **same, **kw)
    if kw.get("sharded"):
        check_sharded(info)
    return base, info


def check_batched_matches_single(m, prompts, names, what, ref=None, ragged=True):
    """A batch gives each row's single-prompt tokens and logits (within LOGIT_ATOL); with
    ``ragged`` every row is padded differently; with ``ref(name)`` the rows also meet
    transformers' references."""
    lengths = [len(p.ids) for p in prompts]
    if ragged:
        assert len(set(lengths)) == len(lengths), lengths
    toks, logits = run_vlmc(m, prompts)
    for i, (name, p) in enumerate(zip(names, prompts)):
        t1, l1 = run_vlmc(m, [p])
        np.testing.assert_array_equal(toks[i], t1[0], err_msg=f"{name} in batch {lengths}")
        d = float(np.abs(logits[i] - l1[0]).max())
        assert d <= LOGIT_ATOL, f"{name} in batch {lengths}: max logits diff {d}"
        if ref is not None:
            check_outputs(toks[i], logits[i], ref(name), f"{what}/{name}")


def check_batch_against_refs(store, info, batch, what):
    """The ragged batch of cases ``batch`` gives each row's single-prompt outputs and
    transformers' references."""
    m = store.vlm(info)
    prompts = [store.cases.prompt(m, c) for c in batch]
    check_batched_matches_single(m, prompts, batch, what, ref=lambda c: store.ref(info, c))


# ------------------------------------------------------------------------------ the batching loop and caches


def run_jobs(batcher, jobs, timeout=180):
    """Submit jobs (Job keywords) to a Batcher; returns each job's tokens and final event."""
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


def turn(m, image, question):
    return m.build_prompt(messages=[
        _user(IMG, _txt("What is in the image?")),
        {"role": "assistant", "content": [_txt("A red square and a blue circle.")]},
        _user(_txt(question))], images=[image])


def second_turn_prompts(m):
    """Two turns over one image, then the second turn over another image of the same size."""
    one, two = ck.make_test_image(120, 90, seed=10), ck.make_test_image(120, 90, seed=11)
    return [turn(m, one, "How many shapes are there?"), turn(m, one, "Describe the image."),
            turn(m, two, "Describe the image.")]


def run_with_prefix_cache(m, prompts, max_tokens=12, timeout=180):
    """Each prompt alone through a plain batcher and one with a prefix cache (block size 8):
    the tokens must be the same; returns the cached tokens of each prompt."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    plain, cached = Batcher(m), Batcher(m, prefix_cache=PrefixCache(block_size=8))
    try:
        ref = [run_jobs(plain, [dict(prompt=p, max_tokens=max_tokens)], timeout)[0] for p in prompts]
        got = [run_jobs(cached, [dict(prompt=p, max_tokens=max_tokens)], timeout) for p in prompts]
    finally:
        plain.shutdown()
        cached.shutdown()
    assert [g[0] for g in got] == ref
    return [g[1][0].cached_tokens for g in got]


def check_prefix_cache_reuses_the_image(m):
    """A second turn over the same image reuses the first's blocks up to past the image's
    last token; the other image behind the same ids reuses nothing past the image's start."""
    prompts = second_turn_prompts(m)
    hits = run_with_prefix_cache(m, prompts)
    ids = prompts[1].ids
    last_image = len(ids) - ids[::-1].index(m.image_token_id)
    assert hits[0] == 0 and hits[1] >= last_image and hits[2] <= ids.index(m.image_token_id)


def check_batching_loop_with_images_and_text(m, second_image=(64, 64), timeout=180):
    """Joined batches of image and text requests (chunked prefills between decode steps)
    give one-at-a-time outputs; the vision cache serves a repeated image; the engine's own
    step loop agrees."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.vision_cache import VisionFeatureCache

    a, b = ck.make_test_image(100, 70, seed=10), ck.make_test_image(*second_image, seed=11)
    prompts = [m.build_prompt("Describe the picture.", images=[a]), m.build_prompt("Tell me about shapes"),
               m.build_prompt("What is on the left side?", images=[b]), m.build_prompt("Compare them.", images=[a, b]),
               m.build_prompt("circle square " * 20)]
    jobs = [dict(prompt=p, max_tokens=6 + 3 * i) for i, p in enumerate(prompts)]
    vision = VisionFeatureCache()
    batcher = Batcher(m, max_batch=8, prefill_chunk=16, vision_cache=vision)
    try:
        alone = [run_jobs(batcher, [j], timeout)[0][0] for j in jobs]
        together, _ = run_jobs(batcher, jobs * 2, timeout)
    finally:
        batcher.shutdown()
    assert together == alone * 2
    assert batcher.counters["decode_steps"] < batcher.counters["batched_tokens"]
    assert vision.hits >= 4 and vision.misses == 2
    for p, toks in zip(prompts[:2], alone):
        t, _ = run_vlmc(m, [p], steps=len(toks))
        assert t[0].tolist() == toks


def check_speculation_is_lossless(m):
    """Greedy output with prompt-lookup drafts and with the model drafting for itself is the
    output without them, for an image prompt and a repetitive text prompt."""
    image = ck.make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        plain = m.generate(max_tokens=24, **case)
        for draft in ("prompt-lookup", m):
            assert m.generate(max_tokens=24, draft=draft, **case).token_ids == plain.token_ids, (draft, case)


# ------------------------------------------------------------------------------ quantization


def quality_prompts(m):
    return [m.build_prompt("Describe the picture.", images=[ck.make_test_image(100, 70, seed=10)]),
            m.build_prompt("Tell me a short story about the river.")]


KV_OPTIONS = {"kv8": {"kv_bits": 8}, "kv4": {"kv_bits": 4},
              "turbo3.5": {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}}


def check_quantized_kv_caches(base, art, layouts=None):
    """Every KV layout (the last layer's too): 8-bit codes track float32 (top-1 >= 0.9, mean
    KL < 0.02); coarser codes cost more, never less. ``layouts(m, wanted)``: the family's
    check of the plan, ``wanted`` the layout the option asks for."""
    from vlmc.quality import compare

    prompts = quality_prompts(base)
    kls = []
    for name, kw in KV_OPTIONS.items():
        m = vlmc.load(art, **kw, kv_quantize_last=True)
        if layouts is not None:
            layouts(m, "turboquant" if "kv_quant_scheme" in kw else "quantized")
        report = compare(base, m, prompts, steps=16)
        kls.append(report.mean_kl)
        if name == "kv8":
            assert report.top1_agreement >= 0.9 and report.mean_kl < 0.02, report
        assert report.mean_kl < 1.5, (name, report)
    assert kls == sorted(kls), kls


def every_layer_is(m, wanted):
    assert [L["kv"]["layout"] for L in m.kv_layers] == [wanted] * len(m.kv_layers)


def check_rotating_window_runs(art):
    """A rotating window over every layer (max_kv_size) runs past its size."""
    rot = vlmc.load(art, max_kv_size=24)
    assert all(L["kv"]["layout"] == "rotating" for L in rot.kv_layers)
    assert rot.generate("Tell me a short story about the river. " * 3, max_tokens=8).generation_tokens == 8


def check_quantized_weights(store, info, vision_prefixes):
    """q8 weights track float32 (top-1 >= 0.9, mean KL < 0.02); q4 weights run and cost
    more; the first decoder layer and a tensor under ``vision_prefixes`` are quantized."""
    from vlmc.quality import compare

    base = store.vlm(info)
    prompts = quality_prompts(base)
    q8 = compare(base, store.vlm(info, quantize="q8"), prompts, steps=16)
    q4 = compare(base, store.vlm(info, quantize="q4"), prompts, steps=16)
    assert q8.top1_agreement >= 0.9 and q8.mean_kl < 0.02, q8
    assert q8.mean_kl < q4.mean_kl < 1.5, q4
    manifest = json.loads((store.artifact(info, quantize="q4") / "manifest.json").read_text())
    assert any(k.startswith("text.layers.0.") for k in manifest["quantized"])
    assert any(k.startswith(vision_prefixes) for k in manifest["quantized"])


# ------------------------------------------------------------------------------ serve, bench, errors


def image_chat():
    """OpenAI-style messages: "Describe the picture." with a 100x70 PNG (seed 10)."""
    import io

    from serve_helpers import data_uri, image_message

    buf = io.BytesIO()
    ck.make_test_image(100, 70, seed=10).save(buf, format="PNG")
    return image_message("Describe the picture.", data_uri(buf.getvalue()))


def check_serve_answers(server, models, messages, strip=False):
    """Each served model (in ``server``'s order) answers a greedy chat with what the Python
    API generates for the same messages (``strip``: the reply's outer whitespace trimmed)."""
    ids = [m["id"] for m in json.loads(server.get("/v1/models")[2])["data"]]
    assert len(ids) == len(models)
    for m, model_id in zip(models, ids):
        status, body = server.post("/v1/chat/completions", {"model": model_id, "messages": messages,
                                                             "temperature": 0, "max_tokens": 8})
        assert status == 200, body
        want = m.generate(messages=messages, max_tokens=8, temperature=0)
        assert body["choices"][0]["message"]["content"] == (want.text.strip() if strip else want.text)
        assert body["usage"]["prompt_tokens"] == want.prompt_tokens
    return ids


def check_bench_smoke(art, family):
    from vlmc.bench import bench, format_report

    r = bench(str(art), prompt_lengths=[8], decode_tokens=4, image_size=64, runs=1)
    assert r["family"] == family and r["decode"]["decode_tps"] > 0 and "image" in r
    assert family in format_report(r)


def patched_copy(src, dst, name, patch, replace=()):
    """A copy of checkpoint ``src`` whose JSON file ``name`` has ``patch`` applied: dict
    values merge into the file's (one level), other values and keys in ``replace`` replace."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / name).read_text())
    for key, value in patch.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key not in replace else value
    (dst / name).write_text(json.dumps(cfg))
    return dst


def check_refused(src, tmp_path, change, message, replace=()):
    """Compiling ``src`` with ``change`` = (file, patch) applied fails naming ``message``,
    and leaves no output behind."""
    from vlmc.errors import VlmcError

    bad = patched_copy(src, tmp_path / "ck", *change, replace=replace)
    with pytest.raises(VlmcError, match=message):
        vlmc_compile(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def unsupported_model_type_error(src, tmp_path, model_type):
    """Compile ``src`` relabelled ``model_type``: the one-line error, which names it and
    lists every supported type."""
    from vlmc.errors import UnsupportedModelError
    from vlmc.models import supported_model_types

    other = patched_copy(src, tmp_path / "other", "config.json", {"model_type": model_type})
    with pytest.raises(UnsupportedModelError) as err:
        vlmc_compile(other, tmp_path / "out")
    line = str(err.value)
    assert "\n" not in line and f"'{model_type}' is not supported" in line
    assert ", ".join(supported_model_types()) in line
    return line


# An interpreter preamble where importing torch, transformers or torchvision fails.
BLOCKER = """
import importlib.abc, sys

class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "torchvision"):
            raise ImportError(f"blocked import of {name}")
        return None

sys.meta_path.insert(0, _Block())
"""


def run_blocked(code, timeout=120):
    """Run ``code`` after ``BLOCKER`` in a fresh interpreter with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def check_cli_runs_without_torch(m, art, tmp_path):
    """`vlmc run` on an image prompt, where importing torch and transformers fails, prints
    what the Python API generates."""
    img = tmp_path / "img.png"
    ck.make_test_image(100, 70, seed=3).save(img)
    expect = m.generate("hi", images=[str(img)], max_tokens=4)
    r = run_blocked(f"""
        import runpy
        sys.argv = ["vlmc", "run", {str(art)!r}, "-p", "hi", "-i", {str(img)!r}, "--max-tokens", "4"]
        try:
            runpy.run_module("vlmc.cli", run_name="__main__")
        except SystemExit as e:
            assert not e.code, e.code
        assert not any(k.split(".")[0] in ("torch", "transformers") for k in sys.modules)
    """)
    assert r.returncode == 0 and "blocked import" not in r.stderr, r.stderr
    assert r.stdout == expect.text + "\n"
