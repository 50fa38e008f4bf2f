"""A param -> the tensors it is stored as in an artifact, streamed a block of rows at a time.

The IR's params are lazy (checkpoint tensors plus pending transforms). The artifact writer
turns each into its stored tensors here: the param is viewed as rows of its last dimension
(``[-1, K]``, the rows quantization works on: groups never cross a row) and, where its
transforms allow, read from the checkpoint, transformed, converted or quantized and written
``PIECE_ELEMENTS`` values at a time. So a compile holds one block of one weight and its
temporaries (a few times 256 MB) whatever the size of the weight or of the model: a
262k-token embedding is 2.7 GB as float32. The bytes written are the same as for the whole
param at once (every step works per row or per element).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import numpy as np

from ..ir.core import Param
from .safetensors_io import ShardWriter, to_storage

# float32 values of one param handled at a time (256 MB; temporaries come on top)
PIECE_ELEMENTS = 1 << 26

# transforms that act on each value alone, so they apply to any block of rows
_ELEMENTWISE = ("add", "scale")


def materialize(p: Param, read: Callable) -> np.ndarray:
    """Apply a param's pending transforms to its source tensors (float32 math)."""
    arrays = [read(ref) for ref in p.sources]
    x = arrays[0] if len(arrays) == 1 else None
    for name, opts in p.transforms:
        if name == "concat":
            x = np.concatenate(arrays, axis=opts.get("axis", 0))
        elif name == "stack":  # per-expert tensors -> one [experts, ...] tensor
            x = np.stack(arrays, axis=opts.get("axis", 0))
        elif name == "reshape":
            x = x.reshape(opts["shape"])
        elif name == "transpose":
            x = x.transpose(opts["axes"])
        elif name in _ELEMENTWISE:
            x = _elementwise(x, name, opts)
        elif name == "pad":  # zeros after each of ``parts`` equal parts of an axis (pad_hidden)
            x = _pad(x, opts["axis"], opts["after"], opts.get("parts", 1))
        else:
            raise ValueError(f"unknown weight transform {name!r}")
    if x is None:
        raise ValueError(f"param {p.name} has several sources but no concat or stack transform")
    if tuple(x.shape) != tuple(p.shape):
        raise ValueError(f"param {p.name}: transforms give shape {x.shape}, IR says {p.shape}")
    return x


def _elementwise(x: np.ndarray, name: str, opts: dict[str, Any]) -> np.ndarray:
    if name == "add":
        return x.astype(np.float32) + opts["value"]
    return x.astype(np.float32) * opts["value"]


def _pad(x: np.ndarray, axis: int, after: int, parts: int) -> np.ndarray:
    pieces = np.split(x, parts, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, after)
    return np.concatenate([np.pad(p, widths) for p in pieces], axis=axis)


def _by_rows(p: Param) -> bool:
    """Whether ``p`` is its sources' rows one after the other, each changed value by value
    (a leading concat or stack on axis 0, then adds and scales), with the shapes its
    transforms give: then each block of ``p``'s rows is read from the sources' rows."""
    refs, transforms = p.sources, p.transforms
    if not p.shape or not refs:
        return False
    first = transforms[0] if transforms else ("", {})
    if first[0] == "concat" and first[1].get("axis", 0) == 0:
        fits = len(p.shape) > 1 and all(tuple(r.shape[1:]) == tuple(p.shape[1:]) for r in refs) and \
            sum(r.shape[0] for r in refs) == p.shape[0]
        transforms = transforms[1:]
    elif first[0] == "stack" and first[1].get("axis", 0) == 0:
        fits = len(refs) == p.shape[0] and all(tuple(r.shape) == tuple(p.shape[1:]) for r in refs)
        transforms = transforms[1:]
    else:
        fits = len(refs) == 1 and tuple(refs[0].shape) == tuple(p.shape)
    return fits and all(n in _ELEMENTWISE for n, _ in transforms)


def row_blocks(p: Param, read: Callable) -> Iterator[Callable[[], np.ndarray]]:
    """``p``'s values as consecutive float32 blocks of rows ``[r, K]`` (``p`` viewed as
    ``[-1, K]``), each a loader called when its block is due, so that a consumer holds one
    block at a time. Where ``p``'s transforms work row by row, blocks have at most
    PIECE_ELEMENTS values (a block may span sources: a param of up to PIECE_ELEMENTS values
    is one block whatever its sources); otherwise the whole param is one block."""
    if not _by_rows(p):
        def whole() -> np.ndarray:
            x = materialize(p, read)
            return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
        yield whole
        return
    k = p.shape[-1]
    step = max(1, PIECE_ELEMENTS // max(k, 1))
    elementwise = [(n, o) for n, o in p.transforms if n in _ELEMENTWISE]
    spans, start = [], 0   # (source, its first row in p's rows, its row count)
    for ref in p.sources:
        n = math.prod(ref.shape[:-1])
        spans.append((ref, start, n))
        start += n

    def block(r0: int, r1: int) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            parts = [read(ref, (max(r0, s) - s, min(r1, s + n) - s)) for ref, s, n in spans if s < r1 and r0 < s + n]
            x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            for name, opts in elementwise:
                x = _elementwise(x, name, opts)
            return x
        return load

    for r0 in range(0, start, step):
        yield block(r0, min(start, r0 + step))
    if not start:
        yield lambda: np.zeros((0, k), np.float32)


def stored_tensors(p: Param) -> list[tuple[str, tuple[int, ...], str]]:
    """The (name, shape, dtype) tensors a param becomes in the artifact."""
    q = p.attrs.get("quant")
    if not q:
        return [(p.name, tuple(p.shape), p.dtype)]
    *rows, k = p.shape   # [N, K], or stacked experts [E, N, K] (each row quantized on its own)
    rows, groups = tuple(rows), k // q["group_size"]
    out = [(p.name, rows + (k * q["bits"] // 32,), "uint32")]
    if q["mode"] == "affine":
        pd = q.get("param_dtype", p.dtype)
        out += [(p.name + ".scales", rows + (groups,), pd), (p.name + ".biases", rows + (groups,), pd)]
    else:
        out += [(p.name + ".scales", rows + (groups,), "uint8")]
    return out


def write_param(writer: ShardWriter, p: Param, read: Callable, report: dict[str, Any]) -> None:
    """Stream ``p``'s stored tensors (``stored_tensors``, in order) into ``writer``, quantized
    when the IR says so; a quantized weight's reconstruction error goes into ``report``."""
    q = p.attrs.get("quant")
    if not q:
        for load in row_blocks(p, read):
            writer.write(p.name, to_storage(load(), p.dtype))
        return
    import mlx.core as mx
    params: list[list[np.ndarray]] = []   # per block: scales (and biases); small beside the codes
    sums: list[tuple[mx.array, mx.array]] = []
    for load in row_blocks(p, read):
        w = mx.array(load())   # (the float32 block is dropped once MLX has its copy)
        codes, block_params, squared = _quantize_block(w, q, q.get("param_dtype", p.dtype))
        del w
        writer.write(p.name, codes)
        params.append(block_params)
        sums.append(squared)
    for i, suffix in enumerate([".scales", ".biases"][:len(params[0])]):
        for block_params in params:
            writer.write(p.name + suffix, block_params[i])
    report[p.name] = {**q, "rel_error": round(_rel_error(sums), 6), "bytes": p.nbytes}


def _quantize_block(w, q: dict[str, Any], dtype: str):
    """A float32 [r, K] MLX block -> (packed codes, [scales(, biases)] as stored in ``dtype``,
    (squared error, squared norm) as float64 numbers)."""
    import mlx.core as mx
    from .quantize import dequantized, quantize_array
    qw = quantize_array(w, bits=q["bits"], group_size=q["group_size"], mode=q["mode"],
                        param_dtype=getattr(mx, dtype))
    # the error of the stored parameters and codes, dequantized in float32 as the CPU kernels
    # do; the dequantized block is not held here, so MLX reuses its buffer for the
    # difference and its square
    deq = dequantized(qw)
    # per row in float32 (a few thousand values), the rows added in float64 below: one
    # float32 sum over millions of values drifts (0.1-10%), and then the error would depend
    # on how the weight was split into blocks
    diff = np.asarray(mx.sum(mx.square(deq - w), axis=-1), np.float64).sum()
    del deq
    norm = np.asarray(mx.sum(mx.square(w), axis=-1), np.float64).sum()
    codes = np.asarray(qw.weight)
    if q["mode"] == "affine":
        stored = [to_storage(np.asarray(a.astype(mx.float32)), dtype) for a in (qw.scales, qw.biases)]
    else:
        stored = [np.asarray(qw.scales)]
    return codes, stored, (diff, norm)


def _rel_error(sums) -> float:
    """sqrt(squared error / squared norm) over the whole weight from its blocks' sums (each
    block's row sums added in float64: the same number however the weight was split)."""
    diff = sum(float(d) for d, _ in sums)
    norm = sum(float(n) for _, n in sums)
    return float(np.sqrt(diff / max(norm, 1e-30)))
