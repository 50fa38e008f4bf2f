"""What EAGLE-3 drafting costs on one target: the target's steps with and without the
captured hidden states, and the drafter's proposals.

    python benchmarks/eagle3.py TARGET_ARTIFACT [--draft EAGLE3_ARTIFACT] [--prompt-tokens 128]
                                [--rounds 5] [--json out.json]

Without --draft, a random EAGLE-3 drafter with the target's widths (one Llama layer of the
target's heads and MLP width, a 32000-token draft vocabulary, the target's embeddings) is
written and compiled first. Per round, alternating: a decode step of the plain target and of
the target that returns the states (``capture_hidden``), a verify step of 5 tokens of each,
and the drafter's proposals of k = 1..4 tokens after a step (it feeds that step's row, then
k - 1 rows of its own). Medians over the rounds, in ms; the acceptance a trained drafter
reaches is what decides the gain (``benchmarks/speculative.py`` (b) gives the verify side).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import vlmc  # noqa: E402
from vlmc.bench import synthetic_ids  # noqa: E402
from vlmc.runtime.engine import Prompt  # noqa: E402
from vlmc.runtime.step import Sequences  # noqa: E402


def random_drafter(target: Path, out: Path, draft_vocab: int = 32000, seed: int = 0) -> Path:
    """A random speculators EAGLE-3 checkpoint for this target's widths, compiled."""
    from safetensors.numpy import save_file
    meta = json.loads((target / "manifest.json").read_text())["meta"]["text"]
    h, v = int(meta["hidden_size"]), int(meta["vocab_size"])
    hd, kv = int(meta["head_dim"]), int(meta["num_kv_heads"])
    heads = max(h // hd, kv)
    ff = 4 * h
    rng = np.random.default_rng(seed)

    def rnd(*shape, std=0.02):
        return (rng.standard_normal(shape) * std).astype(np.float32)
    keep = np.sort(rng.choice(v, size=min(draft_vocab, v), replace=False))
    vd = keep.size
    t2d = np.zeros(v, dtype=bool)
    t2d[keep] = True
    p = "layers.0."
    tensors = {"fc.weight": rnd(h, 3 * h), "norm.weight": np.ones(h, np.float32), "lm_head.weight": rnd(vd, h),
               "d2t": (keep - np.arange(vd)).astype(np.int64), "t2d": t2d,
               p + "input_layernorm.weight": np.ones(h, np.float32), p + "hidden_norm.weight": np.ones(h, np.float32),
               p + "post_attention_layernorm.weight": np.ones(h, np.float32),
               p + "self_attn.q_proj.weight": rnd(heads * hd, 2 * h),
               p + "self_attn.k_proj.weight": rnd(kv * hd, 2 * h),
               p + "self_attn.v_proj.weight": rnd(kv * hd, 2 * h), p + "self_attn.o_proj.weight": rnd(h, heads * hd),
               p + "mlp.gate_proj.weight": rnd(ff, h), p + "mlp.up_proj.weight": rnd(ff, h),
               p + "mlp.down_proj.weight": rnd(h, ff)}
    ckpt = out / "eagle3-ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text(json.dumps({
        "speculators_model_type": "eagle3", "draft_vocab_size": vd, "norm_before_residual": False,
        "transformer_layer_config": {
            "model_type": "llama", "hidden_size": h, "num_attention_heads": heads, "num_key_value_heads": kv,
            "head_dim": hd, "intermediate_size": ff, "num_hidden_layers": 1, "vocab_size": v, "rms_norm_eps": 1e-6,
            "rope_theta": 1e6, "max_position_embeddings": int(meta["max_position_embeddings"]), "hidden_act": "silu"}}))
    return vlmc.compile(ckpt, out / "eagle3-art")


def _timed(fn) -> float:
    t = time.perf_counter()
    mx.eval(fn())
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target")
    ap.add_argument("--draft")
    ap.add_argument("--workdir", default="/tmp/vlmc-eagle3-bench")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    draft_path = Path(a.draft) if a.draft else random_drafter(Path(a.target), Path(a.workdir))
    draft = vlmc.load(draft_path)
    plain = vlmc.load(a.target)
    captured = vlmc.load(a.target, draft=draft)
    drafter = captured.speculation.drafter
    ids = synthetic_ids(plain.tokenizer, a.prompt_tokens)
    runs = {}
    for name, m in (("plain", plain), ("captured", captured)):
        seqs = Sequences.start(m.decoder, [m.prompt_inputs(Prompt(ids=ids))])
        mx.eval(seqs.prefill())
        runs[name] = (m, seqs)
    seqs = runs["captured"][1]
    state = drafter.start(ids, None, seqs)
    drafter.propose(state, list(ids) + [ids[0]], 1)      # the prompt's rows, fed once
    context = list(ids) + [ids[0], ids[1]]               # after one more step
    times: dict[str, list[float]] = {}
    toks = mx.array([ids[:5]], dtype=mx.int32)
    for r in range(a.rounds + 1):
        for name, (m, s) in runs.items():
            d = _timed(lambda: s.decode(toks[0, :1]))
            s.trim(1)
            v = _timed(lambda: s.verify(toks))
            s.trim(5)
            if r:
                times.setdefault(f"{name} decode", []).append(d)
                times.setdefault(f"{name} verify5", []).append(v)
        for k in range(1, 5):  # after a decode step, as in generation: its row, then k - 1 of its own
            mx.eval(seqs.decode(toks[0, :1]))
            drafter.accepted(state, context[:-1])
            ms = _timed(lambda: mx.array(drafter.propose(state, context, k).tokens))
            seqs.trim(1)                                 # back to the prompt, both of them
            for c in state.caches:
                c.trim(1)
            state.fed, state.pending, state.last = len(ids), [], None
            if r:
                times.setdefault(f"propose k={k}", []).append(ms)
    out = {name: round(statistics.median(v), 2) for name, v in times.items()}
    for name, ms in out.items():
        print(f"{name:<18} {ms:8.2f} ms")
    if a.json:
        Path(a.json).write_text(json.dumps({"target": a.target, "prompt_tokens": a.prompt_tokens, "ms": out}, indent=1))


if __name__ == "__main__":
    main()
