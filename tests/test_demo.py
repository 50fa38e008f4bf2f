"""The bundled demo model and its synthetic task (vlmc.demo, vlmc.evaluate, examples/)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlmc.demo import shapes as S

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# ----------------------------------------------------------------------------- the task


def test_generator_is_deterministic():
    for seed in (0, 7, 2_000_123):
        a_img, a_qas = S.make_example(seed)
        b_img, b_qas = S.make_example(seed)
        assert a_img.tobytes() == b_img.tobytes() and a_qas == b_qas
    assert S.make_example(1)[0].tobytes() != S.make_example(2)[0].tobytes()


def test_generator_is_deterministic_across_processes():
    code = ("from vlmc.demo import shapes as S; import sys; "
            "sys.stdout.write(' '.join(S.image_hash(S.make_example(s)[0]) for s in (3, 2_000_005)))")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == [S.image_hash(S.make_example(s)[0]) for s in (3, 2_000_005)]


def test_questions_are_pinned():
    """The questions of a few seeds, written down: a change to the generator (or to numpy's
    random streams) that would silently change the test split fails here."""
    assert S.make_example(1)[1] == [
        ("What color is the square?", "orange"),
        ("What color is the circle?", "red"),
        ("How many shapes are there?", "two"),
        ("Is the orange square left or right of the red circle?", "left"),
        ("Describe the image.", "An orange square and a red circle."),
    ]
    assert S.make_example(2_000_000)[1] == S.split("test", 1)[0].qas


def test_scenes_are_well_formed():
    for sample in S.split("validation", 200):
        shapes = sample.shapes
        assert 1 <= len(shapes) <= 3 and len({s.kind for s in shapes}) == len(shapes)
        assert [s.cx for s in shapes] == sorted(s.cx for s in shapes)
        for i, a in enumerate(shapes):
            assert a.radius <= a.cx <= S.IMAGE_SIZE - a.radius and a.radius <= a.cy <= S.IMAGE_SIZE - a.radius
            for b in shapes[i + 1:]:
                assert abs(a.cx - b.cx) >= S.MIN_DX
                assert ((a.cx - b.cx) ** 2 + (a.cy - b.cy) ** 2) ** 0.5 >= a.radius + b.radius
        kinds = [k for _, _, k in sample.items()]
        assert kinds.count("count") == kinds.count("describe") == 1
        assert kinds.count("color") == len(shapes) and kinds.count("shape") == (len(shapes) == 1)
        assert kinds.count("position") == len(shapes) * (len(shapes) - 1) // 2
        assert sample.image.size == (S.IMAGE_SIZE, S.IMAGE_SIZE) and sample.image.mode == "RGB"


def test_splits_do_not_overlap():
    ranges = list(S.SPLIT_SEEDS.values()) + [S.EXAMPLE_SEEDS]
    for i, a in enumerate(ranges):
        for b in ranges[i + 1:]:
            assert a.stop <= b.start or b.stop <= a.start
    assert all(seed in S.EXAMPLE_SEEDS for seed in S.EXAMPLES.values())
    examples = [S.Sample(seed, "examples", *S.make_example(seed)) for seed in S.EXAMPLES.values()]
    counts = S.check_disjoint({
        "train": S.split("train", 1000),
        "validation": S.split("validation", S.VALIDATION_IMAGES),
        "test": S.split("test", S.TEST_IMAGES),
        "examples": examples,
    })
    assert counts["test"] > 5 * S.TEST_IMAGES


def test_overlap_is_detected():
    sample = S.split("test", 1)[0]
    with pytest.raises(AssertionError, match="also occurs"):
        S.check_disjoint({"train": [S.Sample(5, "train", sample.image, sample.qas)], "test": [sample]})


def test_normalize_and_kinds():
    assert S.normalize("  A red circle and a Blue square. ") == "a red circle and a blue square"
    assert S.normalize("red") == S.normalize("Red.") == "red"
    assert S.question_kind("What color is the star?") == "color"
    assert S.question_kind("Is the red circle left or right of the blue square?") == "position"
    with pytest.raises(ValueError):
        S.question_kind("What is the meaning of life?")


def test_examples_come_from_the_generator():
    for name, seed in S.EXAMPLES.items():
        from PIL import Image

        with Image.open(EXAMPLES / name) as im:
            assert im.convert("RGB").tobytes() == S.make_example(seed)[0].tobytes(), name
    qas = dict(S.make_example(S.EXAMPLES["shapes-1.png"])[1])
    assert qas["What color is the circle?"] == "green"
