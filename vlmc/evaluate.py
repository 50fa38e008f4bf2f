"""Exact-match accuracy of a model on the demo task's held-out splits (``vlmc.demo.shapes``).

    import vlmc
    from vlmc.evaluate import evaluate
    report = evaluate(vlmc.load("vlmc/demo/model"), split="test")
    print(report["accuracy"], report["per_kind"])

Every question of every image of the split is asked through ``VLM.generate`` (the path a
user's request takes: chat template, image preprocessing, prefill, decode) with greedy
decoding; the answer counts when it equals the canonical one after ``shapes.normalize``
(lowercase, final period dropped). This is the quality bar every optimization of the demo
model (quantization, KV layouts, fusion) is measured against. Needs no torch.
"""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Any, TextIO

from .demo import shapes
from .runtime.engine import VLM
from .runtime.sampling import Sampler, SamplingParams

DEFAULT_SIZES = {"validation": shapes.VALIDATION_IMAGES, "test": shapes.TEST_IMAGES}


class ProgressBar:
    """A one-line progress bar on a stream (stderr): redrawn in place on a terminal, a line
    every 10% otherwise (logs stay readable)."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None, width: int = 28):
        self.total, self.label, self.width = max(total, 1), label, width
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1

    def update(self, done: int, note: str = "") -> None:
        now = time.perf_counter()
        final = done >= self.total
        if self.tty:
            if not final and now - self._last_draw < 0.1:
                return
        else:
            decile = done * 10 // self.total
            if decile == self._last_decile and not final:
                return
            self._last_decile = decile
        self._last_draw = now
        elapsed = now - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        filled = int(self.width * done / self.total)
        bar = "#" * filled + "-" * (self.width - filled)
        line = (f"{self.label} [{bar}] {done}/{self.total} {note} {rate:.1f}/s "
                f"{'elapsed' if final else 'eta'} {_clock(elapsed if final else eta)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def answer(model: VLM, image: Any, questions: list[str], max_tokens: int = 24, batch: bool = True) -> list[str]:
    """Greedy answers to several questions about one image.

    ``batch=True`` decodes them together (one left-padded batch through
    ``VLM.generate_steps``, each row stopping at its own EOS); ``batch=False`` calls
    ``VLM.generate`` once per question. Both give the same text (greedy, batch rows equal
    single runs); batching is several times faster on CPU.
    """
    if not batch:
        return [model.generate(q, images=[image], max_tokens=max_tokens, temperature=0.0).text for q in questions]
    prompts = [model.build_prompt(q, images=[image]) for q in questions]
    out: list[list[int]] = [[] for _ in questions]
    done = [False] * len(questions)
    for tokens, _ in model.generate_steps(prompts, Sampler(SamplingParams()), max_tokens):
        for b, t in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if t in model.eos_ids:
                done[b] = True
            else:
                out[b].append(t)
        if all(done):
            break
    return [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in out]


def evaluate(model: VLM, split: str = "test", limit: int | None = None, progress: bool = True,
             max_tokens: int = 24, batch: bool = True) -> dict[str, Any]:
    """Exact-match accuracy of ``model`` on ``split`` ("test" or "validation").

    ``limit``: the number of images (the first ones of the split, each with all its
    questions); None means the whole split (``shapes.TEST_IMAGES`` / ``VALIDATION_IMAGES``).
    ``batch``: decode the questions of an image as one batch (see ``answer``).
    Returns ``{"split", "images", "n", "correct", "accuracy", "per_kind": {kind: {"accuracy",
    "n"}}, "seconds", "failures": [first 20 wrong answers]}``.
    """
    if split not in DEFAULT_SIZES:
        raise ValueError(f"split must be one of {tuple(DEFAULT_SIZES)}, got {split!r}")
    n_images = DEFAULT_SIZES[split] if limit is None else int(limit)
    if n_images < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    seeds = shapes.split_seeds(split, n_images)
    # Questions per image vary (4-8); generate images lazily but count questions first.
    examples = [(seed, *shapes.make_example(seed)) for seed in seeds]
    total = sum(len(qas) for _, _, qas in examples)
    bar = ProgressBar(total, f"eval {split}") if progress else None
    per: dict[str, list[int]] = defaultdict(list)
    failures: list[dict[str, Any]] = []
    done = correct = 0
    t0 = time.perf_counter()
    for seed, image, qas in examples:
        replies = answer(model, image, [q for q, _ in qas], max_tokens=max_tokens, batch=batch)
        for (question, expected), got in zip(qas, replies):
            ok = shapes.normalize(got) == shapes.normalize(expected)
            per[shapes.question_kind(question)].append(int(ok))
            correct += ok
            done += 1
            if not ok and len(failures) < 20:
                failures.append({"seed": seed, "question": question, "expected": expected, "got": got})
        if bar:
            bar.update(done, f"acc {100 * correct / done:.1f}%")
    return {
        "split": split,
        "images": n_images,
        "n": done,
        "correct": correct,
        "accuracy": correct / done if done else 0.0,
        "per_kind": {k: {"accuracy": sum(per[k]) / len(per[k]), "n": len(per[k])} for k in shapes.KINDS if per.get(k)},
        "seconds": round(time.perf_counter() - t0, 1),
        "failures": failures,
    }
