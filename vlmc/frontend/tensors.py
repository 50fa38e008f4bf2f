"""Lazy, memory-mapped safetensors reading (single file or sharded with an index).

Only headers are parsed up front; a tensor's bytes (or a block of its rows) are mapped when
they are read and unmapped when the returned array is dropped, so the pages a compile reads
do not pile up in its resident memory and it never holds two full copies of a model.
Truncated files are detected from the header's offsets before any tensor is used.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..errors import WeightError
from ..ir.core import TensorRef

_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I64": "int64",
              "I32": "int32", "U8": "uint8", "BOOL": "bool", "F64": "float64", "I8": "int8",
              "I16": "int16", "U32": "uint32"}
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "uint8": np.uint8, "bool": np.bool_, "float64": np.float64, "int8": np.int8,
       "int16": np.int16, "uint32": np.uint32, "bfloat16": np.uint16}


class TensorStore:
    """All tensors of a checkpoint folder, by name."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.refs: dict[str, TensorRef] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightError(f"{index} is not a valid safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
        if not files:
            raise WeightError(f"no .safetensors weights in {folder}")
        for name in files:
            self._read_header(folder / name)

    def _read_header(self, path: Path) -> None:
        if not path.is_file():
            raise WeightError(f"weight shard {path.name} named in the index is missing from {path.parent}")
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightError(f"{path.name} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise WeightError(f"{path.name} is corrupt or truncated (header length {n} > file size)")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise WeightError(f"{path.name} has a corrupt safetensors header") from None
        if not isinstance(header, dict):
            raise WeightError(f"{path.name} has a corrupt safetensors header (not a JSON object)")
        data_start = 8 + n
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES.get(info.get("dtype"))
                begin, end = (int(o) for o in info["data_offsets"])
                shape = tuple(int(d) for d in info["shape"])
            except (AttributeError, KeyError, TypeError, ValueError):
                raise WeightError(f"{path.name} has a corrupt safetensors header (bad entry for tensor {key})") \
                    from None
            if dtype is None:
                raise WeightError(f"{path.name}: tensor {key} has unsupported dtype {info.get('dtype')}")
            if not 0 <= begin <= end or any(d < 0 for d in shape):
                raise WeightError(f"{path.name} has a corrupt safetensors header (bad entry for tensor {key})")
            if data_start + end > size:
                raise WeightError(
                    f"{path.name} is truncated: tensor {key} ends at byte {data_start + end} "
                    f"but the file has {size} bytes (an interrupted download? fetch it again)")
            if int(np.prod(shape, dtype=np.int64)) * np.dtype(_NP[dtype]).itemsize != end - begin:
                raise WeightError(f"{path.name}: tensor {key} byte size does not match its shape")
            self.refs[key] = TensorRef(path.name, key, shape, dtype)
            self._offsets[key] = (data_start + begin, data_start + end)

    def read(self, ref: TensorRef, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor as float32 (floating types) or its integer type, memory-mapped when possible;
        with ``rows`` = (start, stop), only those rows of the tensor viewed as [-1, last dim]."""
        begin, end = self._offsets[ref.key]
        shape = ref.shape
        if rows is not None:
            k = ref.shape[-1] if ref.shape else 1
            row_bytes = k * np.dtype(_NP[ref.dtype]).itemsize
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape = (rows[1] - rows[0], k)
        # a mapping per read (not one per file kept open): its pages leave the process's
        # resident memory with the last array that uses them
        raw = np.memmap(self.folder / ref.file, dtype=np.uint8, mode="r", offset=begin, shape=(end - begin,)) \
            if end > begin else np.zeros(0, np.uint8)
        arr = raw.view(_NP[ref.dtype]).reshape(shape)
        if ref.dtype == "bfloat16":
            out = arr.astype(np.uint32)
            out <<= 16   # (in place: one float32-sized array, not two)
            return out.view(np.float32)
        if ref.dtype in ("float16", "float64"):
            return arr.astype(np.float32)
        return arr
