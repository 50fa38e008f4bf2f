"""Checkpoint weight names -> vlmc's canonical names, and Params built from them.

Hub checkpoints (transformers v4) and transformers v5 ``save_pretrained`` name the same
tensors differently; both map onto one canonical scheme:
``text.*`` (decoder), ``lm_head.*``, ``vision.*`` (tower), ``projector.*``.
"""
from __future__ import annotations

from typing import Any

from ..errors import WeightError
from ..ir.core import PARTS, ROLES, Param, TensorRef, TensorType
from .tensors import TensorStore

# Ordered prefix rewrites; the first match wins.
_PREFIXES = [
    ("model.language_model.", "text."),
    ("language_model.model.", "text."),
    ("language_model.lm_head.", "lm_head."),
    ("model.visual.", "vision."),
    ("visual.", "vision."),
    ("model.vision_tower.vision_model.", "vision."),
    ("model.vision_tower.", "vision."),
    ("vision_tower.vision_model.", "vision."),
    ("vision_tower.", "vision."),
    ("model.multi_modal_projector.", "projector."),
    ("multi_modal_projector.", "projector."),
    ("model.", "text."),
    ("lm_head.", "lm_head."),
]


def canonical_name(name: str, extra: list[tuple[str, str]] | tuple = ()) -> str | None:
    """The canonical name of a checkpoint tensor (``extra``: a family's own prefix rules,
    tried first), or None for a tensor no program uses."""
    for old, new in [*extra, *_PREFIXES]:
        if name.startswith(old):
            rest = name[len(old):]
            if new == "vision." and rest.startswith("vision_model."):
                rest = rest[len("vision_model."):]
            return new + rest
    return None


class Weights:
    """Canonical name -> TensorRef for one checkpoint, plus Param construction with checks."""

    def __init__(self, store: TensorStore, prefixes: list[tuple[str, str]] | tuple = ()):
        """``prefixes``: a family's (checkpoint prefix, canonical prefix) rules, before the shared ones."""
        self.store = store
        self.refs: dict[str, TensorRef] = {}
        for key, ref in store.refs.items():
            canon = canonical_name(key, prefixes)
            if canon is not None:
                self.refs[canon] = ref
        self.params: dict[str, Param] = {}

    def has(self, name: str) -> bool:
        return name in self.refs

    def ref(self, name: str) -> TensorRef:
        if name not in self.refs:
            raise WeightError(f"checkpoint is missing weight {name!r} (canonical name)")
        return self.refs[name]

    def add(self, name: str, shape: tuple[int, ...], *, role: str, part: str, layer: int | None = None,
            source: str | list[str] | None = None, transforms: list[tuple[str, dict[str, Any]]] | None = None,
            source_shape: tuple[int, ...] | None = None) -> Param:
        """Declare a program param with its role in the model (``ir.core.ROLES``), its part
        (``ir.core.PARTS``) and, in a repeated layer, the layer index. ``shape`` is its final
        shape; the source tensor must have ``source_shape`` (default: ``shape``) or the
        checkpoint is mis-shaped."""
        if role not in ROLES or part not in PARTS:
            raise ValueError(f"{name}: unknown role {role!r} or part {part!r}")
        names = [source or name] if not isinstance(source, list) else source
        refs = [self.ref(n) for n in names]
        expect = tuple(source_shape or shape)
        if len(refs) == 1 and tuple(refs[0].shape) != expect:
            raise WeightError(f"weight {names[0]!r} has shape {list(refs[0].shape)}, expected {list(expect)}")
        attrs: dict[str, Any] = {"role": role, "part": part}
        if layer is not None:
            attrs["layer"] = layer
        p = Param(name=name, shape=tuple(shape), dtype="float32", sources=refs,
                  transforms=list(transforms or []), attrs=attrs)
        self.params[name] = p
        return p

    def types(self) -> dict[str, TensorType]:
        return {n: TensorType(p.shape, p.dtype) for n, p in self.params.items()}
