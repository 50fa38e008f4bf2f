"""The end-to-end quality benchmark: the demo model's exact-match accuracy on a held-out
split for float32 and every weight scheme and KV-cache layout vlmc offers.

    python benchmarks/quality_demo.py                       # test split, every config
    python benchmarks/quality_demo.py --limit 200 --json out.json
    python benchmarks/quality_demo.py --only q4,kv4         # a subset (names below)

Per config: accuracy (greedy answers equal to the canonical ones, ``vlmc.evaluate``), its
change against float32 in points, and teacher-forced top-1 agreement with the float32
model on fixed image questions (``vlmc.quality.compare``). Bars (from the issues): q8
within 1 point of float32, q4 within 3 points; 8-bit KV top-1 agreement >= 99%, 4-bit
>= 95%. A config outside its bar is printed as FAIL and the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import vlmc  # noqa: E402
from vlmc.demo import MODEL_DIR, shapes  # noqa: E402
from vlmc.evaluate import evaluate  # noqa: E402
from vlmc.quality import compare  # noqa: E402

# name -> (compile options, KV options at load, bar)
# bar: ("points", p) = accuracy within p points of float32; ("top1", f) = agreement >= f
CONFIGS: dict[str, tuple[dict, dict, tuple[str, float] | None]] = {
    "float32": ({}, {}, None),
    "bfloat16": ({"dtype": "bfloat16"}, {}, None),
    "q8": ({"quantize": "q8"}, {}, ("points", 1.0)),
    "q8-f32params": ({"quantize": "q8", "quant_params": "float32"}, {}, ("points", 1.0)),
    "q6": ({"quantize": "q6"}, {}, None),
    "q5": ({"quantize": "q5"}, {}, None),
    "q4": ({"quantize": "q4"}, {}, ("points", 3.0)),
    "q4-f32params": ({"quantize": "q4", "quant_params": "float32"}, {}, ("points", 3.0)),
    "q4-mixed": ({"quantize": "q4", "recipe": "mixed"}, {}, ("points", 3.0)),
    "q3": ({"quantize": "q3"}, {}, None),
    "q2": ({"quantize": "q2"}, {}, None),
    "mxfp8": ({"quantize": "mxfp8"}, {}, None),
    "mxfp4": ({"quantize": "mxfp4"}, {}, None),
    "nvfp4": ({"quantize": "nvfp4"}, {}, None),
    # activations rounded too (a cuda-target artifact; here its rounding is emulated)
    "mxfp8+act": ({"quantize": "mxfp8", "target": "cuda", "quantize_activations": True}, {}, None),
    "nvfp4+act": ({"quantize": "nvfp4", "target": "cuda", "quantize_activations": True}, {}, None),
    "kv8": ({}, {"kv_bits": 8}, ("top1", 0.99)),
    "kv4": ({}, {"kv_bits": 4}, ("top1", 0.95)),
    "kv4-all": ({}, {"kv_bits": 4, "kv_quantize_last": True}, ("top1", 0.95)),
    "turbo4": ({}, {"kv_bits": 4, "kv_quant_scheme": "turboquant"}, None),
    "turbo3.5": ({}, {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}, None),
    "turbo3": ({}, {"kv_bits": 3, "kv_quant_scheme": "turboquant"}, None),
    "q4+kv4": ({"quantize": "q4"}, {"kv_bits": 4}, None),
}


def question_prompts(model, n: int = 8) -> list:
    """Fixed image questions from the validation split (not the evaluated split)."""
    prompts = []
    for sample in shapes.split("validation", n):
        q, _ = sample.qas[0]
        prompts.append(model.build_prompt(q, images=[sample.image]))
    return prompts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL_DIR))
    p.add_argument("--split", choices=["test", "validation"], default="test")
    p.add_argument("--limit", type=int, default=None, help="images (default: the whole split)")
    p.add_argument("--only", default=None, help="comma-separated config names")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    names = list(CONFIGS) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    if "float32" not in names:
        names.insert(0, "float32")
    tmp = Path(tempfile.mkdtemp(prefix="vlmc-quality-"))
    artifacts: dict[str, Path] = {}
    rows, failed = [], []
    reference = None
    for name in names:
        compile_opts, kv, bar = CONFIGS[name]
        key = json.dumps(compile_opts, sort_keys=True)
        if key not in artifacts:
            artifacts[key] = vlmc.compile(args.model, tmp / f"a{len(artifacts)}", **compile_opts)
        model = vlmc.load(artifacts[key], **kv)
        t = time.perf_counter()
        result = evaluate(model, split=args.split, limit=args.limit, progress=True)
        row = {"config": name, "compile": compile_opts, "kv": kv, "accuracy": result["accuracy"], "n": result["n"],
               "per_kind": {k: v["accuracy"] for k, v in result["per_kind"].items()},
               "seconds": round(time.perf_counter() - t, 1),
               "weights_bytes": model.artifact.manifest["param_bytes"],
               "kv_bytes_per_token": (model.kv_plan or {}).get("bytes_per_token")}
        if reference is None:
            reference = model
            prompts = question_prompts(reference)
        else:
            q = compare(reference, model, prompts=prompts, steps=8)
            row["top1_agreement"], row["mean_kl"] = q.top1_agreement, q.mean_kl
        base = rows[0]["accuracy"] if rows else row["accuracy"]
        row["points_vs_float32"] = 100 * (row["accuracy"] - base)
        if bar:
            kind, limit = bar
            ok = row["points_vs_float32"] >= -limit if kind == "points" else row.get("top1_agreement", 1) >= limit
            row["bar"] = f"{'within' if kind == 'points' else 'top-1 >='} {limit:g}{' points' if kind == 'points' else ''}"
            row["pass"] = ok
            if not ok:
                failed.append(name)
        rows.append(row)
        status = "" if "pass" not in row else ("  ok" if row["pass"] else "  FAIL: outside its bar " + row["bar"])
        agree = f"  top-1 {100 * row['top1_agreement']:.1f}%" if "top1_agreement" in row else ""
        print(f"{name:<10} {100 * row['accuracy']:6.2f}%  ({row['points_vs_float32']:+.2f} pts){agree}{status}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps({"split": args.split, "limit": args.limit, "model": args.model, "rows": rows},
                                        indent=1))
    if failed:
        print(f"FAILED BARS: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
