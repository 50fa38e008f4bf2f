"""Teacher-forced top-1 agreement of quantized KV layouts with the dense cache on the test
suite's tiny random-weight checkpoints (Qwen2-VL, Qwen2.5-VL, LLaVA), over the fixed
prompts of ``vlmc.quality``, with the last full-attention layer spared (the default) and
quantized like the others.

    python benchmarks/kv_quality_tiny.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import vlmc  # noqa: E402
from fixtures.checkpoints import build_checkpoint  # noqa: E402
from vlmc.quality import compare  # noqa: E402

OPTIONS = [{"kv_bits": 8}, {"kv_bits": 4}, {"kv_bits": 4, "kv_quantize_last": True},
           {"kv_bits": 3.5, "kv_quant_scheme": "turboquant"}]


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    print(f"{'family':12s} {'KV options':55s} {'top-1':>7s} {'mean KL':>9s}")
    for family in ("qwen2_vl", "qwen2_5_vl", "llava"):
        build_checkpoint(tmp / family, family)
        art = vlmc.compile(str(tmp / family), str(tmp / f"{family}-art"))
        reference = vlmc.load(art)
        for opts in OPTIONS:
            report = compare(reference, vlmc.load(art, **opts))
            print(f"{family:12s} {str(opts):55s} {report.top1_agreement:7.1%} {report.mean_kl:9.5f}")


if __name__ == "__main__":
    main()
