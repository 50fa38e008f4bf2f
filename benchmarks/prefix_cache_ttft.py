"""TTFT of a prompt whose long start (a shared system prompt) an earlier prompt already had,
with and without the prefix cache (``runtime.prefix_cache``), through the batching loop.

    python benchmarks/prefix_cache_ttft.py ARTIFACT [--rules 60]
"""
from __future__ import annotations

import argparse
import threading
import time

import vlmc
from vlmc.runtime.batcher import Batcher, FinishEvent, Job
from vlmc.runtime.prefix_cache import PrefixCache


def ttft(batcher: Batcher, prompt) -> tuple[float, int]:
    """Seconds to the first event (one token is asked for) and the prompt tokens reused."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--rules", type=int, default=60, help="Length of the shared system prompt, in rules.")
    args = ap.parse_args()
    model = vlmc.load(args.artifact)
    system = " ".join(f"rule {i}: answer briefly and cite the rule number." for i in range(args.rules))
    for name, cache in (("no cache", None), ("prefix cache", PrefixCache())):
        batcher = Batcher(model, prefix_cache=cache)
        ttft(batcher, model.build_prompt("warm up", system=system))
        for question in ("What is rule 3?", "What is rule 7?"):
            prompt = model.build_prompt(question, system=system)
            seconds, cached = ttft(batcher, prompt)
            print(f"{name:13s} {len(prompt.ids):6d} prompt tokens  TTFT {seconds:7.3f} s  reused {cached}")
        batcher.shutdown()


if __name__ == "__main__":
    main()
