"""The demo model's task: synthetic shape images with short, canonical question/answer pairs.

Everything here is a pure function of an integer seed (numpy's PCG64 ``default_rng`` and
PIL drawing), so the same seed gives the same pixels and the same questions on every
machine and in every process. It needs numpy and pillow only (the runtime's own
dependencies), because ``vlmc.evaluate`` runs it without torch.

A scene holds one to three shapes of *different* kinds (circle, square, triangle, star),
each with one of six colors (colors may repeat), a size and a position. Shapes never
overlap, and every pair's centers are at least ``MIN_DX`` pixels apart horizontally, so
"left or right" is always well defined.
Backgrounds are solid light colors, light gradients, either with or without light noise.

Questions (``KINDS``) and their canonical answers::

    shape     "What shape is in the image?"                 "circle"   (one-shape scenes)
    color     "What color is the circle?"                   "red"      (one per shape)
    count     "How many shapes are there?"                  "two"
    position  "Is the red circle left or right of the blue square?"   "left"  (one per pair)
    describe  "Describe the image."                          "A red circle and a blue square."
              (shapes listed in the fixed order circle, square, triangle, star)

Splits come from disjoint seed ranges (``SPLIT_SEEDS``); ``check_disjoint`` also hashes
every image so no identical image (hence no identical image+question pair) crosses splits.
"""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 112          # pixels; the processor resizes any user image to about this area
SUPERSAMPLE = 4           # shapes are drawn at 4x and downsampled (anti-aliased edges)
MIN_SIZE, MAX_SIZE = 28, 40   # shape size (bounding width of a circle), pixels
MIN_DX = 16               # minimum horizontal distance between two shapes' centers
GAP = 4                   # minimum gap between two shapes' bounding circles

SHAPES = ("circle", "square", "triangle", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (214, 36, 36),
    "green": (36, 158, 58),
    "blue": (36, 78, 216),
    "yellow": (240, 202, 20),
    "purple": (136, 50, 178),
    "orange": (246, 126, 20),
}
COLOR_JITTER = 16
NUMBER_WORDS = ("zero", "one", "two", "three")
KINDS = ("shape", "color", "count", "position", "describe")

# Disjoint seed ranges. Examples in examples/ use seeds from EXAMPLE_SEEDS, outside all splits.
SPLIT_SEEDS: dict[str, range] = {
    "train": range(0, 1_000_000),
    "validation": range(1_000_000, 1_100_000),
    "test": range(2_000_000, 2_100_000),
}
EXAMPLE_SEEDS = range(3_000_000, 3_100_000)
# examples/*.png: picked from EXAMPLE_SEEDS (the first seed with the wanted look), outside every split.
EXAMPLES = {
    "shapes-1.png": 3_000_091,  # a yellow square left of a green circle (solid background)
    "shapes-2.png": 3_000_034,  # a red circle, a yellow triangle and a yellow star (gradient)
    "shapes-3.png": 3_000_021,  # one purple star (gradient + noise)
}
# The canonical sizes (images; every question of each) of the held-out splits.
VALIDATION_IMAGES = 300
TEST_IMAGES = 1000

Q_SHAPE = "What shape is in the image?"
Q_COLOR = "What color is the {shape}?"
Q_COUNT = "How many shapes are there?"
Q_POSITION = "Is the {c1} {s1} left or right of the {c2} {s2}?"
Q_DESCRIBE = "Describe the image."


@dataclass(frozen=True)
class Shape:
    kind: str
    color: str
    rgb: tuple[int, int, int]
    cx: float
    cy: float
    size: float
    angle: float   # degrees

    @property
    def radius(self) -> float:
        """Radius of a circle that contains the shape whatever its rotation."""
        return {"circle": 0.5, "square": 0.62, "triangle": 0.58, "star": 0.55}[self.kind] * self.size


@dataclass
class Sample:
    """One image of a split with all its questions (``qas`` are (question, answer) pairs)."""

    seed: int
    split: str
    image: Image.Image
    qas: list[tuple[str, str]] = field(default_factory=list)
    shapes: list[Shape] = field(default_factory=list)  # left to right

    def items(self) -> list[tuple[str, str, str]]:
        """(question, answer, kind) triples."""
        return [(q, a, question_kind(q)) for q, a in self.qas]


# ----------------------------------------------------------------------------- scenes


def _place(rng: np.random.Generator, n: int) -> list[tuple[float, float, float]]:
    """(cx, cy, size) for n shapes: inside the image, not overlapping, x-centers apart."""
    while True:  # rejection sampling; a few tries at most for n <= 3
        placed: list[tuple[float, float, float]] = []
        for _ in range(n):
            for _attempt in range(100):
                size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
                r = 0.62 * size + 2
                cx = float(rng.uniform(r, IMAGE_SIZE - r))
                cy = float(rng.uniform(r, IMAGE_SIZE - r))
                ok = all(
                    math.hypot(cx - x, cy - y) >= 0.62 * (size + s) + GAP and abs(cx - x) >= MIN_DX
                    for x, y, s in placed
                )
                if ok:
                    placed.append((cx, cy, size))
                    break
            else:
                break
        if len(placed) == n:
            return placed


def make_scene(seed: int) -> tuple[list[Shape], dict]:
    """The shapes (left to right) and background parameters of ``seed``."""
    rng = np.random.default_rng([seed, 0x5EA5])
    n = int(rng.integers(1, 4))
    kinds = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
    names = list(COLORS)
    shapes = []
    for kind, (cx, cy, size) in zip(kinds, _place(rng, n)):
        color = names[int(rng.integers(len(names)))]
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
        rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLORS[color], jitter))
        angle = float(rng.uniform(0, 72)) if kind == "star" else float(rng.uniform(-10, 10))
        shapes.append(Shape(kind, color, rgb, cx, cy, size, angle))
    shapes.sort(key=lambda s: s.cx)

    def light() -> np.ndarray:
        gray = rng.uniform(215, 250)
        return np.clip(gray + rng.uniform(-14, 14, size=3), 0, 255)

    style = ["solid", "gradient", "noise", "gradient+noise"][int(rng.integers(4))]
    background = {
        "style": style,
        "a": light(),
        "b": light(),
        "angle": float(rng.uniform(0, 2 * math.pi)),
        "noise": float(rng.uniform(4, 12)),
        "noise_seed": int(rng.integers(2**31)),
    }
    return shapes, background


def _background(bg: dict) -> np.ndarray:
    n = IMAGE_SIZE
    if bg["style"].startswith("gradient"):
        y, x = np.mgrid[0:n, 0:n].astype(np.float64) / (n - 1)
        t = (x - 0.5) * math.cos(bg["angle"]) + (y - 0.5) * math.sin(bg["angle"])
        t = (t - t.min()) / (t.max() - t.min())
        arr = bg["a"] * (1 - t[..., None]) + bg["b"] * t[..., None]
    else:
        arr = np.broadcast_to(bg["a"], (n, n, 3)).astype(np.float64)
    if bg["style"].endswith("noise"):
        arr = arr + np.random.default_rng(bg["noise_seed"]).normal(0, bg["noise"], size=arr.shape)
    return np.clip(np.round(arr), 0, 255).astype(np.uint8)


def _polygon(shape: Shape, scale: float) -> list[tuple[float, float]] | None:
    cx, cy, half = shape.cx * scale, shape.cy * scale, shape.size * scale / 2
    a0 = math.radians(shape.angle)
    if shape.kind == "circle":
        return None
    if shape.kind == "square":
        h = 0.85 * half
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape.kind == "triangle":
        r = 1.1 * half  # circumradius; centroid at the center
        pts = [(r * math.cos(math.radians(-90 + 120 * i)), r * math.sin(math.radians(-90 + 120 * i))) for i in range(3)]
    else:  # star: 5 points, inner radius 0.45 of the outer one
        r_out = 1.1 * half
        pts = []
        for i in range(10):
            r = r_out if i % 2 == 0 else 0.45 * r_out
            a = math.radians(-90 + 36 * i)
            pts.append((r * math.cos(a), r * math.sin(a)))
    c, s = math.cos(a0), math.sin(a0)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def coverage(shape: Shape) -> np.ndarray:
    """[H, W] float64 in [0, 1]: how much of each pixel the shape covers (anti-aliased)."""
    big = IMAGE_SIZE * SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    poly = _polygon(shape, SUPERSAMPLE)
    if poly is None:
        r = shape.size * SUPERSAMPLE / 2
        cx, cy = shape.cx * SUPERSAMPLE, shape.cy * SUPERSAMPLE
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(mask.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX), dtype=np.float64) / 255


def render(shapes: list[Shape], background: dict) -> Image.Image:
    """The RGB image: background, then each shape composited through its coverage mask."""
    arr = _background(background).astype(np.float64)
    for shape in shapes:
        alpha = coverage(shape)[..., None]
        arr = arr * (1 - alpha) + np.array(shape.rgb, dtype=np.float64) * alpha
    return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), mode="RGB")


# ----------------------------------------------------------------------------- questions


def describe(shapes: list[Shape]) -> str:
    """One canonical sentence listing the shapes in the fixed order of ``SHAPES`` (circle,
    square, triangle, star), whatever their places: "A red circle, a blue square and a green star."."""
    ordered = sorted(shapes, key=lambda s: SHAPES.index(s.kind))
    parts = [f"{'an' if s.color[0] in 'aeiou' else 'a'} {s.color} {s.kind}" for s in ordered]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def questions(shapes: list[Shape], seed: int) -> list[tuple[str, str]]:
    """Every question of a scene: shape (one-shape scenes), one color question per shape,
    count, one position question per pair (which shape is the subject: seeded), describe."""
    rng = np.random.default_rng([seed, 0xA5C])
    qas: list[tuple[str, str]] = []
    if len(shapes) == 1:
        qas.append((Q_SHAPE, shapes[0].kind))
    for s in shapes:
        qas.append((Q_COLOR.format(shape=s.kind), s.color))
    qas.append((Q_COUNT, NUMBER_WORDS[len(shapes)]))
    for i in range(len(shapes)):
        for j in range(i + 1, len(shapes)):
            a, b = (shapes[i], shapes[j]) if rng.integers(2) else (shapes[j], shapes[i])
            q = Q_POSITION.format(c1=a.color, s1=a.kind, c2=b.color, s2=b.kind)
            qas.append((q, "left" if a.cx < b.cx else "right"))
    qas.append((Q_DESCRIBE, describe(shapes)))
    return qas


def make_example(seed: int) -> tuple[Image.Image, list[tuple[str, str]]]:
    """The image of ``seed`` and all its (question, answer) pairs."""
    shapes, background = make_scene(seed)
    return render(shapes, background), questions(shapes, seed)


_KIND_PATTERNS = (
    ("shape", re.compile(r"^what shape is in the image\?$")),
    ("color", re.compile(r"^what colou?r is the \w+\?$")),
    ("count", re.compile(r"^how many shapes are there\?$")),
    ("position", re.compile(r"^is the \w+ \w+ left or right of the \w+ \w+\?$")),
    ("describe", re.compile(r"^describe the image\.?$")),
)


def question_kind(question: str) -> str:
    """The kind of a task question ("shape", "color", "count", "position", "describe")."""
    q = question.strip().lower()
    for kind, pattern in _KIND_PATTERNS:
        if pattern.match(q):
            return kind
    raise ValueError(f"not a question of the shapes task: {question!r}")


def normalize(answer: str) -> str:
    """What exact match compares: lowercase, surrounding space and one final period removed."""
    a = " ".join(answer.strip().lower().split())
    return a[:-1].rstrip() if a.endswith(".") else a


# ----------------------------------------------------------------------------- splits


def split_seeds(name: str, n: int, start: int = 0) -> range:
    if name not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {name!r}; expected one of {tuple(SPLIT_SEEDS)}")
    seeds = SPLIT_SEEDS[name]
    if not 0 <= start <= start + n <= len(seeds):
        raise ValueError(f"split {name!r} has {len(seeds)} seeds; asked for {start}..{start + n}")
    return seeds[start:start + n]


def split(name: str, n: int, start: int = 0) -> list[Sample]:
    """The first ``n`` images of split ``name`` (``start`` skips some), each with its questions."""
    out = []
    for seed in split_seeds(name, n, start):
        shapes, background = make_scene(seed)
        out.append(Sample(seed, name, render(shapes, background), questions(shapes, seed), shapes))
    return out


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + repr(image.size).encode()).hexdigest()


def pair_hash(image_digest: str, question: str) -> str:
    return hashlib.sha256(f"{image_digest}\n{question}".encode()).hexdigest()


def check_disjoint(splits: dict[str, list[Sample]]) -> dict[str, int]:
    """Raise if any image (and hence any image+question pair) occurs in two splits.

    Returns the number of distinct image+question pairs per split.
    """
    owners: dict[str, str] = {}
    counts: dict[str, int] = {}
    for name, samples in splits.items():
        pairs = set()
        for s in samples:
            h = image_hash(s.image)
            if owners.setdefault(h, name) != name:
                raise AssertionError(f"an image of split {name!r} (seed {s.seed}) also occurs in {owners[h]!r}")
            pairs.update(pair_hash(h, q) for q, _ in s.qas)
        counts[name] = len(pairs)
    return counts


def write_examples(folder) -> dict[str, list[tuple[str, str]]]:
    """Write ``EXAMPLES`` as PNG files into ``folder``; returns each file's questions."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, seed in EXAMPLES.items():
        image, qas = make_example(seed)
        image.save(folder / name, optimize=True)
        out[name] = qas
    return out
