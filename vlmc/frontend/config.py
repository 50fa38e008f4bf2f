"""config.json fields that moved between transformers layouts.

v4 layout (most hub checkpoints): rotary settings in ``rope_theta`` + ``rope_scaling``;
v5 layout (``save_pretrained`` in transformers 5): ``rope_parameters`` holding theta, type
and sections, and renamed vision fields. Family importers read through these helpers
(``vlmc.models.common.text_config`` builds the decoder's settings on top of them).
"""
from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError


def rope_settings(cfg: dict[str, Any], default_theta: float) -> tuple[float, str, dict[str, Any]]:
    """(theta, rope_type, all rope fields) from either rope_parameters (v5) or rope_scaling (v4)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", default_theta)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    return theta, rope_type, merged


def vision_field(vc: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present field among aliases (configs renamed fields across versions)."""
    for n in names:
        if vc.get(n) is not None:
            return vc[n]
    if default is None:
        raise UnsupportedModelError(f"vision_config lacks {names[0]!r}")
    return default
