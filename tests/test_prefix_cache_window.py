"""The prefix cache on models with sliding-window (rotating) caches, for prompts far longer
than the window and prefilled in several chunks: the tiny Gemma 4 (12-token window on its
sliding layers, a dense global layer, KV-shared layers), Gemma 3 (12-token window) and
Mistral 3 (40-token window on every layer) checkpoints.

Each chunk's completed blocks are stored while the window still holds them, and an import
leaves a rotating cache as a prefill of those tokens does. A repeated prompt reuses every
whole block but the one holding its last token, a prompt sharing only a start reuses the
shared blocks, and in every case the greedy tokens and their log-probabilities equal a run
without the cache: in memory, from the disk tier, with 4-bit KV, and for prompts that were
prefilled together in one left-padded batch.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import vlmc  # noqa: E402
from fixtures import gemma as gm  # noqa: E402
from fixtures import gemma4 as g4  # noqa: E402
from fixtures import pixtral as px  # noqa: E402
from parity_kit import LOGIT_ATOL  # noqa: E402
from vlmc.compiler import compile as vlmc_compile  # noqa: E402
from vlmc.runtime.batcher import Batcher, FinishEvent, Job, TokenEvent  # noqa: E402
from vlmc.runtime.prefix_cache import DiskTier, PrefixCache  # noqa: E402

BLOCK, CHUNK, STEPS = 8, 16, 8
BUILDERS = {"gemma4": (g4.build_gemma4_checkpoint, g4.WINDOW), "gemma3": (gm.build_gemma_checkpoint, gm.GEMMA3_WINDOW),
            "mistral3": (px.build_pixtral_checkpoint, px.WINDOW)}
STORY = "The river runs past the old mill and under the stone bridge, then out to the sea. "


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    import torch
    torch.set_num_threads(2)
    root, made = tmp_path_factory.mktemp("swprefix"), {}

    def get(family, **options):
        key = (family, tuple(sorted(options.items())))
        if key not in made:
            build, _ = BUILDERS[family]
            ck = root / family
            if not (ck / "config.json").exists():
                build(ck, family)
            tag = "-".join(f"{k}{v}" for k, v in sorted(options.items()))
            made[key] = vlmc.load(vlmc_compile(ck, root / f"{family}-art{tag}", target="cpu", **options))
        return made[key]
    return get


def ask(batcher, prompts, timeout=180):
    """Submit prompts at once; each one's (tokens, log-probs [steps, 1 + top 3], cached tokens)."""
    out = [{"tokens": [], "lp": []} for _ in prompts]
    done = threading.Event()

    def emit(i):
        def on(ev):
            if isinstance(ev, TokenEvent):
                out[i]["tokens"].append(ev.token)
                out[i]["lp"].append([ev.logprob, *(p for _, p in ev.top_logprobs)])
            elif isinstance(ev, FinishEvent):
                out[i]["cached"] = ev.cached_tokens
                if all("cached" in o for o in out):
                    done.set()
        return on
    for i, p in enumerate(prompts):
        batcher.submit(Job(p, emit(i), max_tokens=STEPS, logprobs=3))
    assert done.wait(timeout), "jobs did not finish"
    return [(o["tokens"], np.array(o["lp"]), o["cached"]) for o in out]


def same(got, want, atol=0.0):
    """Tokens identical; log-probs bit for bit (a prompt prefilled alone comes out the same
    whatever its chunks and whichever blocks came from the cache), or within ``atol``."""
    assert got[0] == want[0]
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=atol)


def prompts_for(m, window):
    long = m.build_prompt(STORY * 5 + "What is under the bridge?")
    branch = m.build_prompt(STORY * 5 + "Where does the river go?")
    other = m.build_prompt(STORY * 3 + "Name the mill.")
    assert len(long.ids) > 4 * window and len(long.ids) > 4 * CHUNK
    return long, branch, other


def shared_start(a, b):
    return next(i for i, (x, y) in enumerate(zip(a.ids, b.ids)) if x != y)


CASES = [("gemma4", {}, BLOCK), ("gemma4", {"kv_bits": 4}, BLOCK), ("gemma3", {}, BLOCK), ("mistral3", {}, BLOCK),
         ("gemma4", {}, 32)]   # blocks larger than the 12-token window: chunk ends cut through them


@pytest.mark.parametrize("family,options,block", CASES,
                         ids=[f + "".join(f"-{k}{v}" for k, v in o.items()) + f"-block{b}" for f, o, b in CASES])
def test_long_prompts_reuse_blocks_past_the_window(models, family, options, block):
    m = models(family, **options)
    assert any(layer["kv"].get("window") for layer in m.kv_layers)
    long, branch, _ = prompts_for(m, BUILDERS[family][1])
    plain = Batcher(m, prefill_chunk=CHUNK)
    cached = Batcher(m, prefill_chunk=CHUNK, prefix_cache=PrefixCache(block_size=block))
    try:
        ref = [ask(plain, [p])[0] for p in (long, branch)]
        got = [ask(cached, [p])[0] for p in (long, long, branch)]
    finally:
        plain.shutdown()
        cached.shutdown()
    for g, r in zip(got, [ref[0], ref[0], ref[1]]):
        same(g, r)
    same(got[1], got[0])
    hits = [g[2] for g in got]
    assert hits[0] == 0 and hits[1] == (len(long.ids) - 1) // block * block
    assert hits[2] == shared_start(long, branch) // block * block
    assert cached.prefix_cache.stats()["hit_tokens"] == hits[1] + hits[2]


def test_prompts_prefilled_together_store_their_blocks(models):
    """Two prompts of different lengths prefilled in one batch (the shorter one left-padded)
    keep their blocks, and each one asked again alone reuses them."""
    m = models("gemma4")
    long, _, other = prompts_for(m, g4.WINDOW)
    plain = Batcher(m, prefill_chunk=CHUNK)
    cached = Batcher(m, prefill_chunk=4 * CHUNK, prefix_cache=PrefixCache(block_size=BLOCK))
    try:
        ref = [ask(plain, [p])[0] for p in (long, other)]
        together = ask(cached, [long, other])
        assert cached.counters["prefill_batches"] == 1 and [t[2] for t in together] == [0, 0]
        again = [ask(cached, [p])[0] for p in (long, other)]
    finally:
        plain.shutdown()
        cached.shutdown()
    for g, r in zip(together + again, ref + ref):
        same(g, r, atol=LOGIT_ATOL)  # a padded batch's prefill rounds a little differently
    same(again[0], together[0], atol=LOGIT_ATOL)
    assert [a[2] for a in again] == [(len(p.ids) - 1) // BLOCK * BLOCK for p in (long, other)]


def test_disk_tier_serves_a_long_prompt_past_the_window(models, tmp_path):
    """Every block spills to disk; a fresh cache on that folder (a restarted server) serves
    the repeated long prompt with unchanged outputs."""
    m = models("gemma4")
    long, _, _ = prompts_for(m, g4.WINDOW)
    plain = Batcher(m, prefill_chunk=CHUNK)
    try:
        ref = ask(plain, [long])[0]
    finally:
        plain.shutdown()
    spill = PrefixCache(max_bytes=1, block_size=BLOCK, disk=DiskTier(tmp_path))
    b = Batcher(m, prefill_chunk=CHUNK, prefix_cache=spill)
    try:
        ask(b, [long])
    finally:
        b.shutdown()
    assert spill.stats()["blocks"] == 0 and len(list(tmp_path.glob("*.safetensors"))) == len(long.ids) // BLOCK
    restarted = PrefixCache(block_size=BLOCK, disk=DiskTier(tmp_path))
    b = Batcher(m, prefill_chunk=CHUNK, prefix_cache=restarted)
    try:
        got = ask(b, [long])[0]
    finally:
        b.shutdown()
    same(got, ref)
    assert got[2] == (len(long.ids) - 1) // BLOCK * BLOCK and restarted.disk.hits == got[2] // BLOCK
