"""The vlmc intermediate representation.

A Program is what a frontend importer produces and what passes rewrite:

- ``params``: name -> Param, a *lazy* reference to checkpoint tensors plus pending
  transforms (transpose, reshape, concat, add, cast). Passes rewrite params without
  loading them; the backend materializes each one exactly once when it writes shards.
- ``blocks``: a repeated layer is one Block (a Function over per-layer params named
  relative to ``param_prefix``) plus a per-layer attribute table, not N copies.
- ``functions``: the entry points (``vision_encode``, ``embed``, ``prefill``,
  ``decode``); each is a list of Ops over typed Values with symbolic dims ("B", "L", ...).
- ``meta``: host-side facts the runtime needs (the family and its inputs' settings, the
  KV plan) -- plain JSON, copied into the manifest.

Params carry their role in the model as attributes (``role``: q, k, v, o, gate, up, down,
embed, head, ...; ``part``: text, vision or projector; ``layer``: the layer index), which
passes match on instead of names. Values carry real dtypes: ``"float"`` is the compute
dtype still to be chosen, which ``lower`` fixes per target.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Union

Dim = Union[int, str]
DTYPES = ("float32", "bfloat16", "float16", "int32", "int64", "uint32", "uint8", "bool")
FLOATS = ("float32", "bfloat16", "float16")
COMPUTE = "float"  # an activation in the compute dtype, not chosen yet (``lower`` picks it)

# What a param is to the model, for passes to match on.
ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "norm", "embed", "head",
         "patch_embed", "pos_embed", "class_embed", "proj",
         # mixture of experts: the router (and a shared expert's scalar gate), and the routed
         # experts' stacked [experts, out, in] gate+up and down projections
         "router", "experts_gate_up", "experts_down",
         # a scalar bound a layer clamps its activations to (Gemma 4's clippable linears)
         "clip")
PARTS = ("text", "vision", "projector")

# The KV-cache types a layer can have (the ``kv`` entry of a decoder block's layer table)
# and the fields each one needs.
KV_LAYOUTS = {"dense": (), "rotating": ("window",), "quantized": ("bits", "group_size"),
              "turboquant": ("k_bits", "v_bits"),
              # a linear-attention layer's state (not keys and values): sizes per sequence
              "recurrent": ("heads", "key_dim", "value_dim", "conv_channels", "conv_width")}


def kv_spec_error(spec) -> str | None:
    """Why ``spec`` is not a KV-cache type (None when it is one)."""
    if not isinstance(spec, dict) or spec.get("layout") not in KV_LAYOUTS:
        return f"{spec!r} is not a KV cache type (layouts: {', '.join(KV_LAYOUTS)})"
    missing = [f for f in KV_LAYOUTS[spec["layout"]] if not isinstance(spec.get(f), int) or spec[f] < 1]
    if missing:
        return f"{spec['layout']} KV cache lacks a positive {', '.join(missing)}"
    return None


def promote(a: str, b: str) -> str:
    """The dtype MLX gives a binary op of a and b (the float ones; anything else keeps a)."""
    if a == b or b not in FLOATS + (COMPUTE,):
        return a
    if a not in FLOATS + (COMPUTE,):
        return b
    if COMPUTE in (a, b):
        return COMPUTE if "float32" not in (a, b) else "float32"
    return "float32"  # bf16 with f16, or either with f32


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __str__(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{self.dtype}[{dims}]"


@dataclass(frozen=True)
class TensorRef:
    """One tensor stored in a checkpoint file."""

    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Param:
    """A weight the program uses: sources + transforms applied at compile time.

    ``transforms`` is a list of (name, options) applied in order to the source tensor(s)
    (several sources are combined by a leading ``concat``). ``shape``/``dtype`` describe
    the tensor after all transforms. ``attrs`` carries pass decisions (e.g. quantization).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    sources: list[TensorRef]
    transforms: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        return self.attrs.get("role")

    @property
    def part(self) -> str | None:
        return self.attrs.get("part")

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes plus scales/biases when quantized."""
        n = 1
        for d in self.shape:
            n *= d
        q = self.attrs.get("quant")
        if not q:
            return n * dtype_size(self.dtype)
        groups = n // q["group_size"]
        if q["mode"] == "affine":
            return n * q["bits"] // 8 + 2 * groups * dtype_size(q.get("param_dtype", self.dtype))
        return n * q["bits"] // 8 + groups  # one uint8 scale per group


@dataclass
class Op:
    op: str
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class Function:
    """A straight-line list of ops. Inputs and params are values like any other.

    Names starting with ``%`` are values; ``@name`` in inputs refers to a param (in a
    Block: a per-layer param relative to the layer's prefix).
    """

    name: str
    inputs: list[str]
    outputs: list[str]
    ops: list[Op] = field(default_factory=list)
    types: dict[str, TensorType] = field(default_factory=dict)
    doc: str = ""


@dataclass
class Block:
    """A repeated layer: one body Function, instantiated once per row of ``layers``.

    ``param_prefix`` is a format string over the layer index (``"text.layers.{i}."``);
    ``param_shapes`` lists the per-layer params (relative names) and their types,
    ``param_roles`` their roles (as each layer's Param says);
    ``layers`` is the per-layer attribute table, e.g. ``{"index": 3, "mask": "window"}``; a
    block that caches keys and values has each layer's KV-cache type under ``kv``;
    ``fast_path``: an optional op over the body's inputs and params that computes the body's
    output in one call when it can and returns None otherwise (the body then runs).
    """

    name: str
    body: Function
    param_prefix: str
    param_shapes: dict[str, TensorType]
    layers: list[dict[str, Any]]
    fast_path: Op | None = None
    param_roles: dict[str, str] = field(default_factory=dict)


@dataclass
class Program:
    name: str
    params: dict[str, Param] = field(default_factory=dict)
    blocks: dict[str, Block] = field(default_factory=dict)
    functions: dict[str, Function] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # passes that ran

    def clone(self) -> "Program":
        return copy.deepcopy(self)

    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params.values())

    def param_count(self) -> int:
        total = 0
        for p in self.params.values():
            n = 1
            for d in p.shape:
                n *= d
            total += n
        return total


_DTYPE_SIZES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8,
                "uint32": 4, "uint8": 1, "bool": 1}


def dtype_size(dtype: str) -> int:
    return _DTYPE_SIZES[dtype]
