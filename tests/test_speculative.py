"""Speculative decoding: the acceptance rule keeps the target's distribution (checked
statistically), greedy output is identical with and without speculation on every family,
KV layout and weight format here, and stops, EOS, max_tokens and bad drafters behave."""
from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import vlmc
from vlmc.errors import InputError
from vlmc.runtime.speculative import DraftLength, PromptLookup, decide

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# ---------------------------------------------------------------- the acceptance rule

def _chi2_ok(counts: np.ndarray, p: np.ndarray) -> bool:
    """Pearson's chi-square against p at significance 0.001 (df = categories - 1)."""
    from math import erf, sqrt
    n = counts.sum()
    keep = p > 0
    stat = float((((counts - n * p) ** 2)[keep] / (n * p[keep])).sum())
    df = int(keep.sum()) - 1
    # Wilson-Hilferty: chi2(df) -> approximately normal
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / sqrt(2 / (9 * df))
    p_value = 0.5 * (1 - erf(z / sqrt(2)))
    assert counts[~keep].sum() == 0
    return p_value > 1e-3


@pytest.mark.parametrize("drafter", ["model", "deterministic"])
def test_accepted_or_resampled_tokens_follow_the_target_distribution(drafter):
    """Draft x ~ q (or a fixed x), accept with min(1, p/q), else draw from max(0, p - q):
    the emitted token is distributed as p (10 categories, one of them impossible)."""
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10))
    p[3] = 0.0
    p /= p.sum()
    q = rng.dirichlet(np.ones(10) * 0.5)
    logits = mx.array(np.log(np.maximum(p, 1e-300)).astype(np.float32))
    logits = mx.where(mx.array(p > 0), logits, float("-inf"))
    counts = np.zeros(10)
    for _ in range(20000):
        if drafter == "model":
            x = int(rng.choice(10, p=q))
            token, _ = decide(logits, x, q, greedy=False, rng=rng)
        else:
            token, _ = decide(logits, 7, None, greedy=False, rng=rng)
        counts[token] += 1
    assert _chi2_ok(counts, p)


def test_greedy_acceptance_is_the_argmax():
    logits = mx.array([0.1, 2.0, -1.0, 1.9])
    assert decide(logits, 1, None, greedy=True, rng=np.random.default_rng(0)) == (1, True)
    assert decide(logits, 3, None, greedy=True, rng=np.random.default_rng(0)) == (1, False)
    assert decide(logits, None, None, greedy=True, rng=np.random.default_rng(0)) == (1, False)


def test_draft_length_adapts_and_turns_itself_off():
    length = DraftLength(6, extra_cost=0.15)
    for _ in range(30):
        length.update(4, 4)
    assert length.next() == 6
    for _ in range(30):
        length.update(4, 0)
    assert length.next() == 0            # speculation does not pay: plain decode steps
    assert max(length.next() for _ in range(20)) == 1   # ... probing again now and then
    assert DraftLength(3, adaptive=False).next() == 3


def test_prompt_lookup_proposes_what_followed_the_last_ngram():
    pl = PromptLookup(ngram=3)
    state = pl.start([])
    ctx = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7]
    assert pl.propose(state, ctx, 3).tokens == [8, 9, 1]
    ctx += [8, 9, 1]                                      # the reply repeats: [8, 9, 1] was followed by [2, 5]
    assert pl.propose(state, ctx, 2).tokens == [2, 5]
    assert pl.propose(state, ctx + [4], 2).tokens == []  # no earlier [9, 1, 4], [1, 4] or [4]
    assert pl.propose(pl.start([]), [1, 2, 3], 4).tokens == []


# ---------------------------------------------------------------- greedy output is identical

@pytest.fixture(scope="module")
def demo():
    return vlmc.load("vlmc-demo")


@pytest.mark.parametrize("draft", ["prompt-lookup", "self"])
def test_greedy_output_is_identical_on_the_demo_model(demo, draft):
    d = demo if draft == "self" else draft
    cases = [dict(prompt="Describe the image.", images=[str(EXAMPLES / f"shapes-{i}.png")]) for i in (1, 2, 3)]
    cases.append(dict(prompt="Repeat: " + "circle square triangle " * 15))
    for case in cases:
        plain = demo.generate(max_tokens=48, **case)
        spec = demo.generate(max_tokens=48, draft=d, **case)
        assert spec.token_ids == plain.token_ids and spec.text == plain.text
        assert spec.finish_reason == plain.finish_reason


def test_speculation_really_accepts_drafts(demo):
    chunks = list(demo.stream_generate("Repeat: " + "circle square triangle " * 15, max_tokens=60,
                                       draft="prompt-lookup"))
    stats = chunks[-1].stats
    assert stats["draft_accepted"] > 20 and stats["tokens_per_step"] > 1.5


def test_stops_eos_and_max_tokens_are_exact(demo):
    prompt = "Repeat: " + "circle square triangle " * 15
    for kw in (dict(max_tokens=7), dict(max_tokens=60, stop=["triangle circle"]), dict(max_tokens=1)):
        plain = list(demo.stream_generate(prompt, **kw))
        spec = list(demo.stream_generate(prompt, draft="prompt-lookup", **kw))
        assert [c.token for c in spec] == [c.token for c in plain]
        assert "".join(c.text for c in spec) == "".join(c.text for c in plain)
        assert spec[-1].finish_reason == plain[-1].finish_reason


@pytest.fixture(scope="module")
def fixture_ckpts(tmp_path_factory):
    from fixtures.checkpoints import build_checkpoint
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for family, variant in (("qwen2_vl", "default"), ("qwen2_5_vl", "default"), ("llava", "clip")):
        build_checkpoint(root / family, family, variant=variant)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family,compile_kw,kv", [
    ("qwen2_vl", {}, {}), ("qwen2_5_vl", {}, {"kv_bits": 4}), ("llava", {}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}),
    ("qwen2_vl", {"quantize": "q4"}, {"kv_bits": 8}), ("llava", {"quantize": "q8"}, {}), ("qwen2_vl", {}, {"max_kv_size": 24}),
])
def test_greedy_output_is_identical_on_every_family_layout_and_format(fixture_ckpts, tmp_path, family, compile_kw, kv):
    from fixtures.checkpoints import make_test_image
    art = vlmc.compile(fixture_ckpts[family], tmp_path / "art", **compile_kw)
    m = vlmc.load(art, **kv)
    image = make_test_image(100, 70, seed=3)
    for case in (dict(prompt="Describe the picture.", images=[image]),
                 dict(prompt="Tell me a short story about the river. " * 3)):
        plain = m.generate(max_tokens=24, **case)
        for draft in ("prompt-lookup", m):
            spec = m.generate(max_tokens=24, draft=draft, **case)
            assert spec.token_ids == plain.token_ids, (draft, case)


def test_a_draft_model_with_another_tokenizer_is_one_clear_error(demo, fixture_ckpts):
    other = vlmc.load(fixture_ckpts["llava"])
    with pytest.raises(InputError, match="a draft model needs the (target.s tokenizer|same vocabulary)"):
        demo.generate("Hi", draft=other, max_tokens=2)
    with pytest.raises(InputError, match="prompt-lookup"):
        demo.generate("Hi", draft="ngram", max_tokens=2)


# ---------------------------------------------------------------- the batching loop

def _run_jobs(batcher, jobs, timeout=300):
    import threading
    from vlmc.runtime.batcher import FinishEvent, Job, TokenEvent
    tokens = [[] for _ in jobs]
    logprobs = [[] for _ in jobs]
    finish = [None] * len(jobs)
    done, left = threading.Event(), [len(jobs)]
    for i, kw in enumerate(jobs):
        def emit(ev, i=i):
            if isinstance(ev, TokenEvent):
                tokens[i].append(ev.token)
                logprobs[i].append(ev.logprob)
            elif isinstance(ev, FinishEvent):
                finish[i] = ev.reason
                left[0] -= 1
                if not left[0]:
                    done.set()
        batcher.submit(Job(emit=emit, **kw))
    assert done.wait(timeout)
    return tokens, logprobs, finish


def test_the_batching_loop_speculates_losslessly(demo):
    """Rows accept different numbers of drafts per step; the loop keeps the columns all
    rows need and re-feeds the rest: every greedy reply, stop and log-probability equals
    the loop's without speculation; a request may opt out."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.sampling import SamplingParams
    from vlmc.runtime.speculative import PromptLookup, Speculation
    texts = [("Describe the image.", "shapes-1.png"), ("Repeat: " + "circle square triangle " * 15, None),
             ("Describe the image.", "shapes-2.png"), ("Repeat: red blue green red blue green red blue", None),
             ("How many shapes are there?", "shapes-3.png")]
    prompts = [demo.build_prompt(q, images=[str(EXAMPLES / im)] if im else None) for q, im in texts]
    jobs = [dict(prompt=p, params=SamplingParams(), max_tokens=12 + 9 * i, logprobs=0) for i, p in enumerate(prompts)]
    jobs[1]["stop"] = ["triangle circle square triangle"]
    jobs[3]["speculate"] = False
    plain = Batcher(demo)
    try:
        want = _run_jobs(plain, jobs)
    finally:
        plain.shutdown()
    spec = Batcher(demo, speculation=Speculation(PromptLookup(), 4))
    try:
        got = _run_jobs(spec, jobs)
        assert spec.counters["draft_accepted"] > 0 and spec.counters["speculative_steps"] > 0
    finally:
        spec.shutdown()
    assert got[0] == want[0] and got[2] == want[2]
    for a, b in zip(got[1], want[1]):
        np.testing.assert_allclose(a, b, atol=2e-3)


def test_the_server_speculates_and_reports_it():
    """vlmc serve --prompt-lookup: concurrent greedy replies equal the ones of a server that
    does not speculate, and /metrics counts the drafted and accepted tokens."""
    import json
    from concurrent.futures import ThreadPoolExecutor
    from serve_helpers import EXAMPLES as EX, LiveServer, data_uri
    questions = [("Describe the image.", 1), ("How many shapes are there?", 2), ("Describe the image.", 3),
                 ("What color is the circle?", 1)]

    def body(q, i):
        return json.dumps({"model": "vlmc-demo", "temperature": 0, "max_tokens": 24, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(EX / f"shapes-{i}.png")}},
                                         {"type": "text", "text": q}]}]}).encode()

    def replies(server):
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda qi: server.request("POST", "/v1/chat/completions", body(*qi)), questions))
        assert all(status == 200 for status, _, _ in outs)
        return [json.loads(raw)["choices"][0]["message"]["content"] for _, _, raw in outs]

    plain = LiveServer("--max-batch-size", "4")
    try:
        want = replies(plain)
    finally:
        plain.stop()
    spec = LiveServer("--max-batch-size", "4", "--prompt-lookup", "--num-draft-tokens", "3")
    try:
        assert replies(spec) == want
        metrics = json.loads(spec.request("GET", "/metrics")[2])
        assert metrics["speculative_steps_total"] + metrics["decode_steps_total"] > 0
        assert "draft_tokens_accepted_total" in metrics
        text = spec.request("GET", "/metrics?format=prometheus")[2].decode()
        assert "vlmc_draft_tokens_proposed_total" in text
    finally:
        spec.stop()
