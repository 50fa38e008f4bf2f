"""Speculative decoding on one artifact: what a verify step costs, and what speculation gains.

    python benchmarks/speculative.py ARTIFACT [--prompt-tokens 128] [--tokens 64] [--json out.json]

(a) Verify cost curve: after a prompt, one decode step (1 token) against verify steps of
    n = 2..9 tokens (k = 1..8 drafted), each timed after a warm-up and rewound with trim;
    ms per step and the ratio to one decode step (medians of --reps).
(b) Speculation at a given acceptance: an oracle drafter proposes the target's own greedy
    continuation (recorded first, without speculation), each token replaced by a wrong one
    with probability 1 - a, for a in --acceptance; decode tok/s with k = --k (fixed, not
    adaptive) against plain decoding in the same run, alternating. The verify machinery is
    the real one; only the drafter is synthetic, so random-weight checkpoints with real
    shapes give honest costs (their own text does not repeat its prompt).
(c) Prompt lookup on a prompt the reply copies (``--copy``; a trained model such as the
    bundled demo): acceptance and decode tok/s with and without it.
(d) Batching: aggregate tok/s of --concurrency requests in one batching loop with and
    without prompt lookup.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from vlmc.bench import synthetic_ids  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402
from vlmc.runtime.sampling import Sampler, SamplingParams  # noqa: E402
from vlmc.runtime.speculative import Draft, Drafter, PromptLookup, Speculation  # noqa: E402
from vlmc.runtime.step import Sequences  # noqa: E402


def verify_curve(m, ids: list[int], reps: int, max_n: int = 9) -> list[dict]:
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(Prompt(ids=ids))])
    mx.eval(seqs.prefill())
    out = []
    for n in range(1, max_n + 1):
        toks = mx.array([ids[:n]], dtype=mx.int32)
        times = []
        for r in range(reps + 1):
            t = time.perf_counter()
            logits = seqs.decode(toks[0, :1]) if n == 1 else seqs.verify(toks)
            mx.eval(logits)
            if r:
                times.append(time.perf_counter() - t)
            seqs.trim(n)
        out.append({"tokens": n, "ms": statistics.median(times) * 1e3})
    base = out[0]["ms"]
    for row in out:
        row["x_decode"] = round(row["ms"] / base, 3)
    return out


class Oracle(Drafter):
    """Proposes the recorded greedy continuation, each token wrong with probability 1 - a."""

    name = "oracle"

    def __init__(self, prompt_len: int, continuation: list[int], acceptance: float, vocab: int, seed: int = 0):
        self.start_at, self.cont, self.a, self.vocab = prompt_len, continuation, acceptance, vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, state, context, k, sampler=None, rng=None):
        i = len(context) - self.start_at
        tokens = list(self.cont[i:i + k])
        for j in range(len(tokens)):
            if self.rng.random() > self.a:
                tokens[j] = (tokens[j] + 1 + int(self.rng.integers(self.vocab - 1))) % self.vocab
        return Draft(tokens)


def timed_decode(m, prompt: Prompt, n: int, speculation=None) -> tuple[float, list[int], dict]:
    stats: dict = {}
    steps = m.generate_steps([prompt], Sampler(SamplingParams()), n + 1) if speculation is None else \
        m.speculative_steps(prompt, Sampler(SamplingParams()), n + 1, speculation, stats)
    toks, t_first = [], None
    for tok, _ in steps:
        toks.append(int(tok[0].item()))
        if t_first is None:
            t_first = time.perf_counter()
    return n / (time.perf_counter() - t_first), toks, stats


def batching(m, prompts: list[Prompt], n: int, speculation) -> float:
    from vlmc.runtime.batcher import Batcher, FinishEvent, Job
    b = Batcher(m, max_batch=len(prompts), speculation=speculation)
    done, left, count = threading.Event(), [len(prompts)], [0]

    def emit(ev):
        if isinstance(ev, FinishEvent):
            count[0] += ev.completion_tokens
            left[0] -= 1
            if not left[0]:
                done.set()
    t = time.perf_counter()
    try:
        for p in prompts:
            b.submit(Job(p, emit, SamplingParams(), n))
        done.wait()
    finally:
        b.shutdown()
    return count[0] / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--acceptance", default="0.5,0.7,0.8,0.9",
                    help="per-token probability that the oracle's draft token is right; the measured "
                         "accepted/proposed rate is lower (a rejection discards the rest of the draft)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--copy", action="store_true", help="(c): a copy-this-text chat prompt (needs a trained model)")
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    m = vlmc.load(a.artifact)
    ids = synthetic_ids(m.tokenizer, a.prompt_tokens, seed=1)
    result: dict = {"artifact": a.artifact, "prompt_tokens": a.prompt_tokens, "tokens": a.tokens}

    timed_decode(m, Prompt(ids=ids[:16]), 2)  # warm-up
    result["verify_curve"] = verify_curve(m, ids, a.reps)
    print(json.dumps(result["verify_curve"]))

    prompt = Prompt(ids=ids)
    _, cont, _ = timed_decode(m, prompt, a.tokens)
    vocab = int(m.meta["text"]["vocab_size"])
    rows = []
    for acc in [float(x) for x in a.acceptance.split(",")]:
        plain, spec = [], []
        seen = {"draft_accepted": 0, "draft_proposed": 0, "verify_steps": 0, "decode_steps": 0}
        for r in range(a.rounds):
            spec_cfg = Speculation(Oracle(len(ids), cont, acc, vocab, seed=r), a.k, adaptive=False)
            order = [None, spec_cfg] if r % 2 == 0 else [spec_cfg, None]
            for s in order:
                tps, toks, stats = timed_decode(m, prompt, a.tokens, s)
                assert toks == cont, "speculation changed the greedy output"
                (plain if s is None else spec).append(tps)
                if s is not None:
                    for key in seen:
                        seen[key] += stats.get(key, 0)
        row = {"acceptance_target": acc, "k": a.k, "plain_tps": statistics.median(plain),
               "spec_tps": statistics.median(spec),
               "accepted": seen["draft_accepted"], "proposed": seen["draft_proposed"],
               # accepted / proposed over every round: the rate a server's metrics report
               "acceptance_rate": round(seen["draft_accepted"] / max(seen["draft_proposed"], 1), 3),
               "verify_steps": seen["verify_steps"], "decode_steps": seen["decode_steps"]}
        row["speedup"] = round(row["spec_tps"] / row["plain_tps"], 3)
        rows.append(row)
        print(json.dumps(row))
    result["oracle"] = rows

    if a.copy:
        text = ("The quick brown fox jumps over the lazy dog near the river bank. " * 4).strip()
        p = m.build_prompt(f"Repeat this text exactly: {text}")
        plain_tps, toks, _ = timed_decode(m, p, a.tokens)
        spec_tps, toks2, stats = timed_decode(m, p, a.tokens, Speculation(PromptLookup(), a.k))
        result["prompt_lookup_copy"] = {"plain_tps": plain_tps, "spec_tps": spec_tps, "same": toks == toks2,
                                        "accepted": stats["draft_accepted"], "proposed": stats["draft_proposed"]}
        print(json.dumps(result["prompt_lookup_copy"]))

    batch_rows = []
    for c in [int(x) for x in a.concurrency.split(",")]:
        prompts = [Prompt(ids=synthetic_ids(m.tokenizer, a.prompt_tokens, seed=10 + i)) for i in range(c)]
        plain = batching(m, prompts, a.tokens, None)
        spec = batching(m, prompts, a.tokens, Speculation(PromptLookup(), a.k))
        batch_rows.append({"concurrency": c, "plain_tps": plain, "prompt_lookup_tps": spec})
        print(json.dumps(batch_rows[-1]))
    result["batching"] = batch_rows
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
