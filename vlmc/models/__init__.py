"""Model families: one folder each, found by scanning this package.

``family(model_type)`` gives the ``Family`` (``vlmc.models.family``) that compiles
checkpoints of that config.json ``model_type``; a new family is a new folder with a
``FAMILY`` in its ``__init__.py`` (see docs/adding-a-family.md). ``common/`` holds the
shared building blocks (decoder and ViT layers, text config, image processors).
"""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache
from typing import TYPE_CHECKING

from ..errors import UnsupportedModelError
from .family import Family

if TYPE_CHECKING:
    from ..frontend import Checkpoint
    from ..ir.core import Program

_NOT_FAMILIES = {"common", "family"}


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    """model_type -> Family, for every family folder here."""
    out: dict[str, Family] = {}
    for info in pkgutil.iter_modules(__path__):
        if not info.ispkg or info.name in _NOT_FAMILIES:
            continue
        fam = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if not isinstance(fam, Family):
            raise TypeError(f"vlmc.models.{info.name} has no FAMILY (a vlmc.models.family.Family)")
        for mt in fam.model_types:
            if mt in out:
                raise TypeError(f"model_type {mt!r} is claimed by {out[mt].name} and {fam.name}")
            out[mt] = fam
    return out


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(families()))


def family(model_type: str | None) -> Family:
    """The family of a config.json ``model_type``; a clear error listing the supported ones."""
    found = families().get(model_type) if model_type is not None else None
    if found is None:
        what = "config.json has no model_type" if model_type is None else f"model type {model_type!r} is not supported"
        raise UnsupportedModelError(f"{what}; supported: {', '.join(supported_model_types())}")
    return found


def import_checkpoint(ckpt: "Checkpoint") -> "Program":
    """An opened checkpoint -> its IR program, through its family's importer."""
    from ..frontend.weights import Weights
    mt = ckpt.config.get("model_type")
    fam = family(mt)
    prog = fam.build(ckpt.config, Weights(ckpt.store, fam.weight_prefixes), ckpt.folder.name)
    prog.meta.update(family=fam.name, model_type=mt,
                     source={"path": str(ckpt.folder), "fingerprint": ckpt.fingerprint})
    return prog
