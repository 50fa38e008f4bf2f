"""Streaming safetensors writer: header first (sizes are known from the IR), then each
tensor's bytes in order, whole or in consecutive parts, so writing never holds more than
the part at hand."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from ..kernels.dtypes import bf16_bits

_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int32": "I32", "int64": "I64",
       "uint32": "U32", "uint8": "U8", "bool": "BOOL"}
_ITEM = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8, "uint32": 4, "uint8": 1,
         "bool": 1}


def to_storage(arr: np.ndarray, dtype: str) -> np.ndarray:
    """float32 array -> the bytes-ready array of ``dtype`` (bfloat16 as uint16)."""
    if dtype == "bfloat16":
        return bf16_bits(arr)
    return np.ascontiguousarray(arr.astype({"float32": np.float32, "float16": np.float16, "int32": np.int32,
                                            "int64": np.int64, "uint32": np.uint32, "uint8": np.uint8,
                                            "bool": np.bool_}[dtype]))


class ShardWriter:
    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], str]]):
        header, offset = {}, 0
        for name, shape, dtype in entries:
            n = int(np.prod(shape, dtype=np.int64)) * _ITEM[dtype]
            header[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = {"format": "mlx"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._expected = [(n, header[n]["data_offsets"][1] - header[n]["data_offsets"][0]) for n, _, _ in entries]
        self._i = 0
        self._done = 0   # bytes of the current tensor written so far

    def write(self, name: str, data: np.ndarray) -> None:
        """Write ``data`` as tensor ``name``, or as the next part of it: a tensor may come in
        several consecutive C-ordered parts (blocks of rows)."""
        exp_name, size = self._expected[self._i]
        assert name == exp_name, (name, exp_name)
        data = np.ascontiguousarray(data)
        self._done += data.nbytes
        assert self._done <= size, name
        self._f.write(memoryview(data).cast("B"))   # (no bytes copy of the array)
        if self._done == size:
            self._i, self._done = self._i + 1, 0

    def close(self) -> None:
        assert self._i == len(self._expected), f"{len(self._expected) - self._i} tensors not written"
        self._f.flush()
        import os
        os.fsync(self._f.fileno())
        self._f.close()
