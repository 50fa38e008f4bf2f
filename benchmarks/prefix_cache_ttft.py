"""TTFT of a prompt whose long start an earlier prompt already had, with and without the
prefix cache (``runtime.prefix_cache``), through the batching loop.

    python benchmarks/prefix_cache_ttft.py ARTIFACT [--rules 60]
    python benchmarks/prefix_cache_ttft.py ARTIFACT --repeat --rounds 3 [--rules 60]
    python benchmarks/prefix_cache_ttft.py --make-hybrid CKPT     # then: vlmc compile CKPT ART

Default: a shared system prompt, then two different questions. ``--repeat``: the same long
prompt asked twice per round (each round's prompt is new), timed three ways in an order
that alternates between rounds: a loop without the cache, the first ask in a loop with it
(a miss, which also keeps the blocks and, for recurrent layers, their states), the second
ask there (a hit); medians over the rounds.

``--make-hybrid`` writes a random-weight Qwen3.5-style hybrid checkpoint (not a published
config): hidden 1024, 24 decoder layers, every fourth full attention (8 query heads, 2 KV
heads of 256) and the others Gated DeltaNet (16 key and 16 value heads of 128, conv 4),
MLP 3584, the test suite's small tokenizer and vision tower.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def ttft(batcher, prompt) -> tuple[float, int]:
    """Seconds to the first event (one token is asked for) and the prompt tokens reused."""
    from vlmc.runtime.batcher import FinishEvent, Job

    done, out = threading.Event(), {}

    def emit(ev):
        out.setdefault("first", time.perf_counter())
        if isinstance(ev, FinishEvent):
            out["cached"] = ev.cached_tokens
            done.set()

    t0 = time.perf_counter()
    batcher.submit(Job(prompt, emit, max_tokens=1))
    done.wait()
    return out["first"] - t0, out["cached"]


def make_hybrid(out: Path) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    import transformers as tf
    from fixtures import qwen3_5 as q35

    def make_model(ids, vocab_size):
        text, vision, top = q35.model_configs(ids, vocab_size)
        layers = ["full_attention" if i % 4 == 3 else "linear_attention" for i in range(24)]
        text.update(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, layer_types=layers,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=256, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=16,
                    rope_parameters={**text["rope_parameters"], "rope_theta": 10_000_000.0,
                                     "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]})
        vision["out_hidden_size"] = 1024
        return tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision, **top))

    info = q35.build_qwen3_5_checkpoint(out, make_model=make_model)
    print(f"wrote {info['path']}")


def shared_start(model, system: str) -> None:
    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    for name, cache in (("no cache", None), ("prefix cache", PrefixCache())):
        batcher = Batcher(model, prefix_cache=cache)
        ttft(batcher, model.build_prompt("warm up", system=system))
        for question in ("What is rule 3?", "What is rule 7?"):
            prompt = model.build_prompt(question, system=system)
            seconds, cached = ttft(batcher, prompt)
            print(f"{name:13s} {len(prompt.ids):6d} prompt tokens  TTFT {seconds:7.3f} s  reused {cached}")
        batcher.shutdown()


def repeat(model, system: str, rounds: int) -> None:
    import os

    from vlmc.runtime.batcher import Batcher
    from vlmc.runtime.prefix_cache import PrefixCache

    plain, cached = Batcher(model), Batcher(model, prefix_cache=PrefixCache())
    ttft(plain, model.build_prompt("warm up"))
    ttft(cached, model.build_prompt("warm up"))
    times: dict[str, list[float]] = {"no cache": [], "miss (cache on)": [], "hit": []}
    try:
        for r in range(rounds):
            prompt = model.build_prompt("What is rule 3?", system=f"Round {r}. {system}")  # new blocks each round
            order = ["no cache", "cache"] if r % 2 == 0 else ["cache", "no cache"]
            for which in order:
                if which == "no cache":
                    seconds, _ = ttft(plain, prompt)
                    times["no cache"].append(seconds)
                    print(f"round {r}  no cache         TTFT {seconds:7.3f} s", flush=True)
                    continue
                miss, reused = ttft(cached, prompt)
                assert reused == 0
                hit, reused = ttft(cached, prompt)
                times["miss (cache on)"].append(miss)
                times["hit"].append(hit)
                print(f"round {r}  miss (cache on)  TTFT {miss:7.3f} s;  hit TTFT {hit:7.3f} s  "
                      f"(reused {reused} of {len(prompt.ids)} tokens)", flush=True)
    finally:
        plain.shutdown()
        cached.shutdown()
    stats = cached.prefix_cache.stats()
    print(f"prompt {len(prompt.ids)} tokens; load {os.getloadavg()[0]:.2f}; prefix cache {stats}")
    for name, ts in times.items():
        print(f"median {name:16s} {statistics.median(ts):7.3f} s  ({', '.join(f'{t:.3f}' for t in ts)})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?")
    ap.add_argument("--rules", type=int, default=60, help="Length of the shared system prompt, in rules.")
    ap.add_argument("--repeat", action="store_true", help="Time a repeated prompt: no cache, miss, hit.")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--make-hybrid", metavar="CKPT", help="Write the Qwen3.5-style checkpoint and exit.")
    args = ap.parse_args()
    if args.make_hybrid:
        make_hybrid(Path(args.make_hybrid))
        return
    if not args.artifact:
        ap.error("ARTIFACT is needed")
    import vlmc

    model = vlmc.load(args.artifact)
    system = " ".join(f"rule {i}: answer briefly and cite the rule number." for i in range(args.rules))
    if args.repeat:
        repeat(model, system, args.rounds)
    else:
        shared_start(model, system)


if __name__ == "__main__":
    main()
