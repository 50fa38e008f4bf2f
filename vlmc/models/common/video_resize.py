"""Antialiased bicubic resizing of uint8 frames, bit-exact with torch's uint8 CPU kernel
(``torchvision.transforms.v2.functional.resize(..., BICUBIC, antialias=True)`` on a uint8
tensor, what transformers' video processors call).

It is Pillow's separable filter (bicubic a = -0.5, or Lanczos a = 3; support widened by
the scale when shrinking, weights normalised per output pixel, computed in double) with torch's
fixed-point arithmetic: each pass's weights are rounded to int16 at the largest precision
that keeps them in range, sums start at half a unit, shift right and clamp to 0..255. The
horizontal pass runs first, into uint8, then the vertical one; an axis whose size does not
change is not filtered.
"""
from __future__ import annotations

import numpy as np


def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0, 1.0, np.sin(np.pi * x) / (np.pi * x))


def _lanczos(x: np.ndarray) -> np.ndarray:
    return np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3.0), 0.0)


FILTERS = {"bicubic": (_bicubic, 2.0), "lanczos": (_lanczos, 3.0)}   # filter, half support (scale 1)


def _weights(in_size: int, out_size: int, kind: str = "bicubic") -> tuple[np.ndarray, np.ndarray, int]:
    """(first input index [out], int16-valued weights [out, K], precision bits) of one axis."""
    scale = in_size / out_size
    filt, half = FILTERS[kind]
    support = half * scale if scale >= 1.0 else half
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centers = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size)
    sizes = xmax - xmin
    k = int(sizes.max())
    taps = np.arange(k)
    w = filt((taps[None, :] + xmin[:, None] - centers[:, None] + 0.5) * invscale)
    w = np.where(taps[None, :] < sizes[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total != 0, w / np.where(total == 0, 1, total), w)
    # the largest precision whose rounded largest weight still fits in int16
    top = float(w.max())
    precision = 0
    while precision < 22 and int(0.5 + top * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = w * (1 << precision)
    ints = np.where(scaled < 0, (scaled - 0.5).astype(np.int64), (scaled + 0.5).astype(np.int64))
    return xmin, ints, precision


def _pass(x: np.ndarray, axis: int, out_size: int, kind: str) -> np.ndarray:
    """Filter uint8 ``x`` along ``axis`` (1: rows, 2: columns of [T, H, W, C]) to ``out_size``."""
    in_size = x.shape[axis]
    xmin, w, precision = _weights(in_size, out_size, kind)
    k = w.shape[1]
    idx = np.minimum(xmin[:, None] + np.arange(k)[None, :], in_size - 1)    # [out, K]
    src = np.take(x, idx.reshape(-1), axis=axis).astype(np.int32)
    shape = list(x.shape)
    shape[axis:axis + 1] = [out_size, k]
    src = src.reshape(shape)
    wshape = [1] * len(shape)
    wshape[axis], wshape[axis + 1] = out_size, k
    acc = (src * w.reshape(wshape).astype(np.int32)).sum(axis=axis + 1, dtype=np.int64)
    acc += 1 << (precision - 1)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_frames(frames: np.ndarray, height: int, width: int, kind: str = "bicubic") -> np.ndarray:
    """[T, H, W, C] uint8 -> [T, height, width, C] uint8 (``kind``: "bicubic" or "lanczos")."""
    out = frames
    if width != frames.shape[2]:
        out = _pass(out, 2, width, kind)
    if height != frames.shape[1]:
        out = _pass(out, 1, height, kind)
    return np.ascontiguousarray(out)
