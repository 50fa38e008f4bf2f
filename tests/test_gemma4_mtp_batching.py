"""Gemma 4's MTP assistant in the batching loop (``Batcher``, ``batch_generate``) and the
server: every row drafts from its own position over the batch's caches, after each step
(``SharedKVDrafter.propose_rows``), and greedy output equals the output without it.

The tiny assistant's drafts are random (nothing is accepted), so the loop test steers them:
after the assistant drafted (each draft recorded), the first j tokens (j random per draft)
are replaced by the request's known greedy continuation, so rows accept different counts
and the loop re-feeds, trims and drafts over ragged rows. Every recorded draft must then
equal the one-sequence drafter's for the same context (``SharedKVDrafter.propose`` over a
fresh prefill of it), on a target whose sliding window holds every context (512) and on
one whose window (12) the contexts outgrow (rotating caches that dropped columns).
"""
from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import mlx.core as mx  # noqa: E402

import parity_kit as kit  # noqa: E402
import vlmc  # noqa: E402
from fixtures import gemma4 as g4  # noqa: E402

QUESTIONS = ["Tell me a short story about the river.", "What is the weather today?", "Count: one two three four",
             "Hi", "Describe a cat in ten words please and more", "Tell me a short story about the river."]

store = kit.store_fixture(
    "gemma4_mtp", build=g4.build_gemma4_checkpoint, cases=kit.Cases(),
    hf=lambda info: (g4.hf_processor(info["path"], info["family"]), g4.hf_model(info["path"], info["family"])),
    reference=lambda info, *a, **kw: g4.hf_reference(info["path"], info["family"], *a, **kw))


def _pair(store, window):
    """(target artifact, assistant artifact, target model, assistant model)."""
    target = store.ckpt("gemma4_text", window=window)
    info = g4.build_assistant_checkpoint(store.root / "ckpt" / f"assistant-{window}", target)
    t_art, a_art = store.artifact(target), store.artifact(info)
    return t_art, a_art, store.vlm(target), vlmc.load(a_art)


def _run(batcher, jobs, timeout=300):
    """Submit job dicts; (tokens per job, cached prompt tokens per job)."""
    from vlmc.runtime.batcher import FinishEvent, Job, TokenEvent
    tokens, cached = [[] for _ in jobs], [0] * len(jobs)
    done, left = threading.Event(), [len(jobs)]
    for i, kw in enumerate(jobs):
        def emit(ev, i=i):
            if isinstance(ev, TokenEvent):
                tokens[i].append(ev.token)
            elif isinstance(ev, FinishEvent):
                assert ev.reason in ("stop", "length"), ev
                cached[i] = ev.cached_tokens
                left[0] -= 1
                if not left[0]:
                    done.set()
        batcher.submit(Job(emit=emit, **kw))
    try:
        assert done.wait(timeout)
    finally:
        batcher.shutdown()
    return tokens, cached


@pytest.mark.parametrize("window", [512, g4.WINDOW])
def test_the_batching_loop_drafts_every_row_from_the_batch_caches(store, window):
    """Six requests through a loop of three rows with prefix caching (the last repeats the
    first: a prefix-cache hit), one opting out, one sampling: the greedy ones equal the loop
    without speculation, drafts were accepted, and every draft is the one-sequence
    drafter's for its context."""
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.engine import Prompt
    from vlmc.runtime.prefix_cache import PrefixCache
    from vlmc.runtime.sampling import SamplingParams
    from vlmc.runtime.speculative import SharedKVDrafter, Speculation
    from vlmc.runtime.step import Sequences

    _, _, target, assistant = _pair(store, window)
    prompts = [target.build_prompt(q) for q in QUESTIONS]
    jobs = [dict(prompt=p, params=SamplingParams(), max_tokens=14 + 4 * i) for i, p in enumerate(prompts)]
    jobs[3]["speculate"] = False
    jobs[2]["params"] = SamplingParams(temperature=0.9, seed=3)
    greedy = [i for i, j in enumerate(jobs) if j["params"].greedy]
    want, _ = _run(Batcher(target, max_batch=3), jobs)

    class Steered(Batcher):
        log: list = []
        rng = np.random.default_rng(0)

        def _draft_ahead(self, rows, seqs, ends, batch):
            super()._draft_ahead(rows, seqs, ends, batch)
            for row in rows:
                if not row.draft:
                    continue
                self.log.append((list(row.history), list(row.draft)))
                i = next(i for i, p in enumerate(prompts) if p is row.job.prompt)
                if i in greedy:
                    done = len(row.history) - len(row.job.prompt.ids)
                    j = int(self.rng.integers(0, len(row.draft) + 1))
                    row.draft[:j] = want[i][done:done + j]

    spec = Speculation(SharedKVDrafter(assistant, target), 4, adaptive=False)
    loop = Steered(target, max_batch=3, speculation=spec, prefix_cache=PrefixCache(64 << 20, 4))
    got, cached = _run(loop, jobs)
    for i in greedy:
        assert got[i] == want[i], i
    assert len(got[2]) == jobs[2]["max_tokens"] or got[2][-1] in target.eos_ids
    assert cached[5] > 0
    c = loop.counters
    assert c["speculative_steps"] > 0 and c["draft_accepted"] > 0 and c["draft_proposed"] > c["draft_accepted"]

    single = SharedKVDrafter(assistant, target)
    assert len(loop.log) >= 20
    for context, draft in loop.log:
        seqs = Sequences.start(target.decoder, [target.prompt_inputs(Prompt(ids=context[:-1]))])
        mx.eval(seqs.prefill())
        alone = single.propose(single.start(context[:-1], None, seqs), context, len(draft)).tokens
        assert alone == draft, (len(context), alone, draft)


def test_batch_generate_with_the_assistant_is_unchanged(store):
    t_art, a_art, target, _ = _pair(store, g4.WINDOW)
    model = vlmc.load(t_art, draft=str(a_art), num_draft_tokens=3)
    requests = [{"prompt": q, "max_tokens": 10 + 3 * i} for i, q in enumerate(QUESTIONS[:4])]
    plain = model.batch_generate(requests, max_batch=4, draft=False)
    spec = model.batch_generate(requests, max_batch=4)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.generation_tokens == 10 + 3 * i for i, r in enumerate(spec))


def test_the_server_drafts_with_the_assistant_under_concurrency(store):
    """vlmc serve --draft-model <assistant>: four concurrent greedy chats answer what a
    server without it answers, and /metrics counts the assistant's drafted tokens and its calls."""
    from serve_helpers import LiveServer

    t_art, a_art, _, _ = _pair(store, g4.WINDOW)

    def replies(server):
        def one(i):
            return server.post("/v1/chat/completions", {"model": t_art.name, "temperature": 0, "max_tokens": 12 + 2 * i,
                                                        "messages": [{"role": "user", "content": QUESTIONS[i]}]})
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(one, range(4)))
        assert all(status == 200 for status, _ in outs), outs
        return [(o["choices"][0]["message"]["content"], o["usage"]["completion_tokens"]) for _, o in outs]

    plain = LiveServer(str(t_art), "--max-batch-size", "4")
    try:
        want = replies(plain)
        assert json.loads(plain.request("GET", "/metrics")[2])["draft_calls_total"] == 0
    finally:
        plain.stop()
    spec = LiveServer(str(t_art), "--draft-model", str(a_art), "--num-draft-tokens", "3", "--max-batch-size", "4")
    try:
        assert replies(spec) == want
        metrics = json.loads(spec.request("GET", "/metrics")[2])
        assert metrics["draft_tokens_proposed_total"] > 0 and metrics["speculative_steps_total"] > 0
        # the assistant drafts every row's next position in one call
        assert 0 < metrics["draft_calls_total"] <= metrics["draft_tokens_proposed_total"]
    finally:
        spec.stop()
