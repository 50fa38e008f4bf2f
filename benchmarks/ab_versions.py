"""Two vlmc source trees (e.g. before and after a change) on the same checkpoint, alternating.

    git worktree add /tmp/vlmc-before <commit>
    python benchmarks/ab_versions.py /tmp/ck2b --tree before=/tmp/vlmc-before --tree after=. \\
        --rounds 3 --compile "-q q4" --compile "-q q4 --kv-bits 4" --out /tmp/ab

Each tree compiles the checkpoint once per ``--compile`` option set with its own code (an
artifact is only readable by the code that wrote it), into ``OUT/<tree>/<n>``. Then, for
each round, every (options, tree) pair runs ``vlmc bench`` once in a fresh process with
that tree first on PYTHONPATH, the trees' order alternating between rounds (the host is
noisy: absolute times move by ±30% between minutes, so only runs close in time compare).
Reported per (options, tree): the median over rounds of prefill tok/s at each prompt
length, decode tok/s, the one-image TTFT and its vision share, and the ratio of each tree
to the first one. All JSON results stay in OUT.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def run(tree: Path, args: list[str], log: Path | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "vlmc.cli", *args]
    print("$", "PYTHONPATH=" + str(tree), " ".join(shlex.quote(a) for a in cmd[1:]), flush=True)
    with open(log, "a") if log else open(os.devnull, "w") as f:
        subprocess.run(cmd, env=env, check=True, stdout=f, stderr=subprocess.STDOUT)


def figures(result: dict) -> dict[str, float]:
    out = {f"prefill{p['prompt_tokens']}_tps": p["prompt_tps"] for p in result["prefill"]}
    out["decode_tps"] = result["decode"]["decode_tps"]
    if "image" in result:
        out["image_ttft_ms"] = result["image"]["ttft_ms"]
        out["image_vision_ms"] = result["image"]["encode_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a vlmc source tree (2 or more)")
    ap.add_argument("--compile", action="append", default=None, help="vlmc compile options (repeatable)")
    ap.add_argument("--bench", default="--prompt-lengths 128 --decode-tokens 32 --image-size 448",
                    help="vlmc bench options")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    trees = [(n, Path(p).resolve()) for n, p in (t.split("=", 1) for t in a.tree)]
    option_sets = a.compile or ["-q q4"]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, tree in trees:
        for i, opts in enumerate(option_sets):
            art = out / name / str(i)
            if not (art / "manifest.json").is_file():
                run(tree, ["compile", a.checkpoint, "-o", str(art), *shlex.split(opts)], out / "compile.log")
    results: dict[tuple[int, str], list[dict]] = {}
    for r in range(a.rounds):
        order = trees if r % 2 == 0 else list(reversed(trees))
        for i in range(len(option_sets)):
            for name, tree in order:
                path = out / f"bench-{i}-{name}-{r}.json"
                run(tree, ["bench", str(out / name / str(i)), "--quiet", "--json", str(path), *shlex.split(a.bench)])
                results.setdefault((i, name), []).append(figures(json.loads(path.read_text())))
    summary = []
    for i, opts in enumerate(option_sets):
        base = None
        for name, _ in trees:
            runs = results[(i, name)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            base = base or med
            row = {"compile": opts, "tree": name, "rounds": len(runs), **{k: round(v, 2) for k, v in med.items()},
                   **{f"{k}_ratio": round(v / base[k], 3) for k, v in med.items()}}
            summary.append(row)
            print(json.dumps(row))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
