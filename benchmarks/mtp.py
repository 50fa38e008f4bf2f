"""Gemma 4 MTP drafting (a shared-KV assistant): what a draft step costs against a target
step, what that predicts at a given acceptance, and tok/s with and without it.

    python benchmarks/mtp.py make-target OUT [--vocab 262144]          # E2B shapes (a smaller vocabulary if asked)
    python benchmarks/mtp.py make-assistant TARGET_CHECKPOINT OUT      # a random assistant for it
    python benchmarks/mtp.py run TARGET_ARTIFACT ASSISTANT_ARTIFACT [--prompt-tokens 128]
        [--tokens 32] [--rounds 3] [--concurrency 1,4,8] [--steered 0.5,0.7,0.9] [--json out.json]

``make-assistant``: a Gemma4AssistantForCausalLM with random weights for the target's
widths (its hidden size, KV heads, head sizes, window and rope) and the assistant's own
shape of google/gemma-4-E2B-it-assistant's config.json (4 layers, 3 sliding + 1 global, all
reading the target's KV; width 256, 4 heads, MLP 2048, no soft-capping, ordered embeddings
of 2048 centroids, 32 scored). With an E2B target (1 KV head, window 512, 131,072
positions) that is the published assistant's config, as public code quoting it gives
(the hub is not reachable here); the larger targets' assistants are wider (1024).

``run``, all in one process except (c), each comparison alternating within rounds:
(a) Measured step costs at batch B in --concurrency, after B prompts of --prompt-tokens:
    a target decode step (B tokens), verify steps of n = 2..k+1 tokens per row, and one
    drafter call (one drafted token for every row) with every row ending at the caches'
    end (the path after a decode step) and with rows ending at different columns (after a
    verify step whose rows kept different counts). Medians of the rounds' medians.
(b) Derived: the speedup those costs predict at per-token acceptance a (each drafted token
    right with probability a, independently): a step drafting k tokens yields
    (1 - a^(k+1)) / (1 - a) tokens and costs verify(k+1) + k draft calls, against one
    decode step per token; the best k and the largest k the loop allows at that batch
    (--k, and rows x (k + 1) <= 16, the loop's max_step_tokens).
(c) Measured in the server (``vlmc serve`` subprocesses, one at a time, plain and
    --draft-model alternating per round): C concurrent greedy chats of --tokens tokens
    each (min_tokens = max_tokens), tok/s = completion tokens / wall time, with the
    server's drafted and accepted token counts. Random weights make the assistant's
    acceptance meaningless (near 0: the adaptive draft length then turns drafting off
    except for probes), so (d) measures the other end.
(d) Measured in the batching loop with steered drafts: the assistant drafts for real
    (its cost is paid) and each drafted token is then replaced by the request's known
    greedy continuation with probability a (a wrong token otherwise); k = --k fixed.
    Decode tok/s (the tokens after every row's first, over the time from the last row's
    first token to the last token) against the loop without drafting, alternating;
    greedy output checked equal.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from vlmc.bench import synthetic_ids  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402
from vlmc.runtime.step import Sequences  # noqa: E402


def make_target(out: Path, vocab: int) -> Path:
    """gemma-4-E2B-it's shapes (``make_checkpoint.py gemma4``) with a vocabulary of ``vocab``
    tokens for the embeddings, the tied head and the per-layer input table (the real
    262,144 by default: ~10 GB in bfloat16, 4.7 GB of it the per-layer table; smaller where
    the disk is short), and no audio tower (vlmc does not read it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_checkpoint as mc
    ref = json.loads((mc.HERE / "reference_configs" / "gemma4.json").read_text())
    cfg = ref["config.json"]
    cfg["audio_config"] = None
    cfg["text_config"] = {**cfg["text_config"], "vocab_size": vocab, "vocab_size_per_layer_input": vocab}
    presets = out.parent / (out.name + "-preset")
    (presets / "reference_configs").mkdir(parents=True, exist_ok=True)
    (presets / "reference_configs" / "gemma4.json").write_text(json.dumps(ref))
    mc.HERE = presets
    return mc.make_checkpoint("gemma4", out)


def make_assistant(target: Path, out: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf
    cfg = json.loads((target / "config.json").read_text())
    tc = cfg.get("text_config", cfg)
    text = tf.Gemma4TextConfig(
        vocab_size=tc["vocab_size"], hidden_size=256, intermediate_size=2048, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=tc["num_key_value_heads"], head_dim=tc["head_dim"],
        global_head_dim=tc.get("global_head_dim") or tc["head_dim"], sliding_window=tc["sliding_window"],
        max_position_embeddings=tc["max_position_embeddings"], rms_norm_eps=tc["rms_norm_eps"],
        layer_types=["sliding_attention"] * 3 + ["full_attention"], rope_parameters=tc["rope_parameters"],
        hidden_size_per_layer_input=0, vocab_size_per_layer_input=0, num_kv_shared_layers=4,
        use_double_wide_mlp=False, tie_word_embeddings=True, bos_token_id=tc.get("bos_token_id"),
        eos_token_id=tc.get("eos_token_id"), pad_token_id=tc.get("pad_token_id"))
    acfg = tf.Gemma4AssistantConfig(text_config=text, backbone_hidden_size=tc["hidden_size"],
                                    use_ordered_embeddings=True, num_centroids=2048, centroid_intermediate_top_k=32)
    torch.manual_seed(seed)
    model = tf.Gemma4AssistantForCausalLM(acfg).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("token_ordering"):
                buf.copy_(torch.randperm(buf.shape[0]))
    model.save_pretrained(out, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.json", "generation_config.json"):
        if (target / f).exists():
            (out / f).write_text((target / f).read_text())
    return out


# ---------------------------------------------------------------------------- (a), (b)

def step_costs(m, drafter, batch: int, prompt_tokens: int, k: int, reps: int) -> dict:
    """ms per call (medians over reps) at this batch size."""
    prompts = [Prompt(ids=synthetic_ids(m.tokenizer, prompt_tokens, seed=20 + b)) for b in range(batch)]
    seqs = Sequences.start(m.decoder, [m.prompt_inputs(p) for p in prompts])
    tok = mx.argmax(seqs.prefill(), axis=-1).astype(mx.int32)
    mx.eval(tok)
    last = [int(t) for t in np.asarray(tok)]
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        mx.eval(out) if isinstance(out, mx.array) else None
        times.setdefault(name, []).append((time.perf_counter() - t) * 1e3)
    for _ in range(reps + 1):
        timed("decode", lambda: seqs.decode(tok))
        timed("draft_even", lambda: drafter.propose_rows(seqs, last, [seqs.offset] * batch, [1] * batch))
        seqs.trim(1)
        for n in range(2, k + 2):
            ids = mx.broadcast_to(tok[:, None], (batch, n))
            timed(f"verify{n}", lambda: seqs.verify(ids))
            if n == k + 1:  # rows ending at different columns, as after rows kept different counts
                ends = [seqs.offset - n + 1 + b % n for b in range(batch)]
                if batch == 1:
                    ends = [seqs.offset - n + 1]
                timed("draft_ragged", lambda: drafter.propose_rows(seqs, last, ends, [1] * batch))
            seqs.trim(n)
    return {name: statistics.median(v[1:]) for name, v in times.items()}


def predict(costs: dict, k_max: int, rates=(0.5, 0.7, 0.9), max_step_tokens: int = 16) -> list[dict]:
    """Speedup over plain decoding at per-token acceptance a, from the measured costs; k as
    the loop allows it (rows x (k + 1) <= max_step_tokens)."""
    out = []
    k_max = max(1, min(k_max, max_step_tokens // costs["batch"] - 1))
    for a in rates:
        best = None
        for k in range(1, k_max + 1):
            draft = costs["draft_ragged"] if costs["batch"] > 1 else costs["draft_even"]
            tokens = (1 - a ** (k + 1)) / (1 - a)
            cost = (costs[f"verify{k + 1}"] + k * draft) / costs["decode"]
            s = round(tokens / cost, 3)
            if best is None or s > best[1]:
                best = (k, s)
            if k == k_max:
                at_k = s
        out.append({"acceptance": a, "best_k": best[0], "speedup_best_k": best[1], "k_max": k_max,
                    "speedup_k_max": at_k})
    return out


# ---------------------------------------------------------------------------- (c) the server

def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(base: str, path: str, payload: dict) -> dict:
    req = urllib.request.Request(base + path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=1800) as r:
        return json.loads(r.read())


def _metrics(base: str) -> dict:
    with urllib.request.urlopen(base + "/metrics", timeout=60) as r:
        return json.loads(r.read())


class Server:
    def __init__(self, target: str, *args: str):
        self.port = _port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.name = Path(target).name
        self.proc = subprocess.Popen([sys.executable, "-c", "from vlmc.cli import main; main()", "serve", target,
                                      "--port", str(self.port), "--max-batch-size", "8", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
        for _ in range(1200):
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("the server did not become healthy")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _question(i: int, words: int) -> str:
    topics = ["river", "mountain", "city", "forest", "ocean", "desert", "village", "island"]
    return (f"Tell a long story about the {topics[i % len(topics)]} and everything near it. " * (words // 12 + 1))


def server_level(server: Server, c: int, tokens: int, words: int) -> dict:
    before = _metrics(server.base)
    outs: list = [None] * c

    def one(i):
        outs[i] = _post(server.base, "/v1/chat/completions", {
            "model": server.name, "temperature": 0, "max_tokens": tokens, "min_tokens": tokens,
            "messages": [{"role": "user", "content": _question(i, words)}]})
    threads = [threading.Thread(target=one, args=(i,)) for i in range(c)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    after = _metrics(server.base)
    n = sum(o["usage"]["completion_tokens"] for o in outs)
    return {"tok_s": n / wall, "tokens": n, "texts": [o["choices"][0]["message"]["content"] for o in outs],
            "proposed": after.get("draft_tokens_proposed_total", 0) - before.get("draft_tokens_proposed_total", 0),
            "accepted": after.get("draft_tokens_accepted_total", 0) - before.get("draft_tokens_accepted_total", 0)}


# ---------------------------------------------------------------------------- (d) steered drafts

def steered_loop(m, drafter, prompts, tokens: int, k: int, rate: float | None, want=None, seed: int = 0):
    """(tok/s, tokens per request, counters) of one batching loop over these prompts;
    ``rate`` None: no speculation."""
    from vlmc.runtime.batcher import Batcher, FinishEvent, Job, TokenEvent
    from vlmc.runtime.sampling import SamplingParams
    from vlmc.runtime.speculative import Speculation
    rng = np.random.default_rng(seed)
    vocab = int(m.meta["text"]["vocab_size"])

    class Steered(Batcher):
        def _draft_ahead(self, rows, seqs, ends, batch):
            super()._draft_ahead(rows, seqs, ends, batch)
            for row in rows:
                i = next((i for i, p in enumerate(prompts) if p is row.job.prompt), None)
                done = len(row.history) - len(row.job.prompt.ids)
                for j in range(len(row.draft)):
                    right = want[i][done + j] if done + j < len(want[i]) else 0
                    row.draft[j] = right if rng.random() < rate else (right + 1) % vocab
    spec = None if rate is None else Speculation(drafter, k, adaptive=False)
    loop = (Batcher if rate is None else Steered)(m, max_batch=len(prompts), max_queue=len(prompts), speculation=spec)
    got, stamps = [[] for _ in prompts], [[] for _ in prompts]
    done, left = threading.Event(), [len(prompts)]

    def emit_for(i):
        def emit(ev):
            if isinstance(ev, TokenEvent):
                got[i].append(ev.token)
                stamps[i].append(time.perf_counter())
            elif isinstance(ev, FinishEvent):
                left[0] -= 1
                if not left[0]:
                    done.set()
        return emit
    try:
        for i, p in enumerate(prompts):
            loop.submit(Job(p, emit_for(i), SamplingParams(), tokens, min_tokens=tokens))
        done.wait()
    finally:
        loop.shutdown()
    # decode tok/s: the tokens after each row's first, from the last row's first token (every
    # prompt was prefilled by then) to the last token
    start, end = max(t[0] for t in stamps), max(t[-1] for t in stamps)
    after = sum(sum(1 for x in t[1:] if x > start) for t in stamps)
    return after / (end - start), got, dict(loop.counters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["make-target", "make-assistant", "run"])
    ap.add_argument("target")
    ap.add_argument("assistant", nargs="?")
    ap.add_argument("--vocab", type=int, default=262144, help="make-target: the vocabulary size (E2B: 262144)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--concurrency", default="1,4,8")
    ap.add_argument("--steered", default="0.5,0.7,0.9")
    ap.add_argument("--steered-concurrency", default="1,4")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: costs,server,steered")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.what == "make-target":
        print(make_target(Path(a.target), a.vocab))
        return
    if a.what == "make-assistant":
        print(make_assistant(Path(a.target), Path(a.assistant)))
        return
    skip = set(a.skip.split(","))
    levels = [int(x) for x in a.concurrency.split(",")]
    m = vlmc.load(a.target, draft=a.assistant, num_draft_tokens=a.k)
    drafter = m.speculation.drafter
    result: dict = {"target": a.target, "assistant": a.assistant, "load_before": os.getloadavg()}
    if "costs" not in skip:
        rows = {c: [] for c in levels}
        for _ in range(a.rounds):
            for c in levels:
                rows[c].append(step_costs(m, drafter, c, a.prompt_tokens, a.k, a.reps))
        result["costs"] = []
        for c in levels:
            med = {key: round(statistics.median(r[key] for r in rows[c]), 2) for key in rows[c][0]}
            med["batch"] = c
            med["draft_even_x_decode"] = round(med["draft_even"] / med["decode"], 3)
            med["draft_ragged_x_decode"] = round(med["draft_ragged"] / med["decode"], 3)
            med["predicted"] = predict(med, a.k)
            result["costs"].append(med)
            print(json.dumps(med), flush=True)
    if "steered" not in skip:
        rates = [float(x) for x in a.steered.split(",")]
        result["steered"] = []
        for c in [int(x) for x in a.steered_concurrency.split(",")]:
            prompts = [Prompt(ids=synthetic_ids(m.tokenizer, a.prompt_tokens, seed=40 + i)) for i in range(c)]
            _, want, _ = steered_loop(m, drafter, prompts, a.tokens, a.k, None)
            runs = {r: [] for r in [None, *rates]}
            counts = {r: [0, 0] for r in rates}
            for rnd in range(a.rounds):
                order = [None, *rates] if rnd % 2 == 0 else [*rates, None]
                for r in order:
                    tps, got, counters = steered_loop(m, drafter, prompts, a.tokens, a.k, r, want, seed=rnd)
                    assert got == want, "speculation changed the greedy output"
                    runs[r].append(tps)
                    if r is not None:
                        counts[r][0] += counters.get("draft_accepted", 0)
                        counts[r][1] += counters.get("draft_proposed", 0)
            plain = statistics.median(runs[None])
            for r in rates:
                row = {"concurrency": c, "token_rate": r, "k": a.k, "plain_tok_s": round(plain, 3),
                       "mtp_tok_s": round(statistics.median(runs[r]), 3),
                       "speedup": round(statistics.median(runs[r]) / plain, 3),
                       "acceptance": round(counts[r][0] / max(counts[r][1], 1), 3),
                       "per_round_plain": [round(x, 3) for x in runs[None]],
                       "per_round_mtp": [round(x, 3) for x in runs[r]]}
                result["steered"].append(row)
                print(json.dumps(row), flush=True)
    del m, drafter
    if "server" not in skip:
        runs = {(c, s): [] for c in levels for s in (False, True)}
        seen = {c: [0, 0] for c in levels}
        texts: dict = {}
        for rnd in range(a.rounds):
            for spec in ([False, True] if rnd % 2 == 0 else [True, False]):
                args = ["--draft-model", a.assistant, "--num-draft-tokens", str(a.k)] if spec else []
                server = Server(a.target, *args)
                try:
                    server_level(server, 1, 4, 20)  # warm-up
                    for c in levels:
                        out = server_level(server, c, a.tokens, a.prompt_tokens // 2)
                        runs[(c, spec)].append(out["tok_s"])
                        texts.setdefault((c, spec), out["texts"])
                        if spec:
                            seen[c][0] += out["accepted"]
                            seen[c][1] += out["proposed"]
                        print(json.dumps({"round": rnd, "mtp": spec, "concurrency": c, "tok_s": round(out["tok_s"], 3),
                                          "proposed": out["proposed"], "accepted": out["accepted"]}), flush=True)
                finally:
                    server.stop()
        result["server"] = []
        for c in levels:
            plain, spec = statistics.median(runs[(c, False)]), statistics.median(runs[(c, True)])
            row = {"concurrency": c, "plain_tok_s": round(plain, 3), "mtp_tok_s": round(spec, 3),
                   "ratio": round(spec / plain, 3), "proposed": seen[c][1], "accepted": seen[c][0],
                   "same_text": texts[(c, False)] == texts[(c, True)],
                   "per_round_plain": [round(x, 3) for x in runs[(c, False)]],
                   "per_round_mtp": [round(x, 3) for x in runs[(c, True)]]}
            result["server"].append(row)
            print(json.dumps(row), flush=True)
    result["load_after"] = os.getloadavg()
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
