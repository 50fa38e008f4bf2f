"""Normalize config.json across transformers layouts.

v4 layout (most hub checkpoints): text fields at the top level (Qwen-VL) or in
``text_config`` (LLaVA), rotary settings in ``rope_theta`` + ``rope_scaling``.
v5 layout (``save_pretrained`` in transformers 5): nested ``text_config`` /
``vision_config`` and ``rope_parameters`` holding theta, type and sections.
Both become one TextConfig so importers never look at raw layouts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import UnsupportedModelError

# Defaults transformers uses when a field is absent, per text model_type.
_TEXT_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=2048),
    "mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=32768),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=32768),
    "qwen2_vl": dict(rms_norm_eps=1e-5, rope_theta=1000000.0, hidden_act="silu", max_position_embeddings=32768),
    "qwen2_5_vl": dict(rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", max_position_embeddings=128000),
}
SUPPORTED_TEXT_TYPES = tuple(_TEXT_DEFAULTS)


@dataclass
class TextConfig:
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_kind: str                      # "default" | "mrope"
    mrope_sections: list[int] | None
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    extra: dict[str, Any] = field(default_factory=dict)


def rope_settings(cfg: dict[str, Any], default_theta: float) -> tuple[float, str, dict[str, Any]]:
    """(theta, rope_type, all rope fields) from either rope_parameters (v5) or rope_scaling (v4)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", cfg.get("rope_theta", default_theta)))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    return theta, rope_type, merged


def text_config(raw: dict[str, Any], *, nested: bool, text_type: str | None = None) -> TextConfig:
    """Build a TextConfig. ``nested`` means the text fields live in raw["text_config"]
    (always for LLaVA; for Qwen-VL only in the v5 layout, detected by the caller)."""
    cfg = dict(raw.get("text_config") or {}) if nested else dict(raw)
    mt = text_type or cfg.get("model_type") or raw.get("model_type")
    mt = {"qwen2_vl_text": "qwen2_vl", "qwen2_5_vl_text": "qwen2_5_vl"}.get(mt, mt)
    if mt not in _TEXT_DEFAULTS:
        raise UnsupportedModelError(
            f"text model type {mt!r} is not supported; supported: {', '.join(SUPPORTED_TEXT_TYPES)}")
    d = _TEXT_DEFAULTS[mt]

    def get(key: str, default: Any = None) -> Any:
        for src in (cfg, raw):
            if key in src and src[key] is not None:
                return src[key]
        return d.get(key, default)

    def need(key: str, kind: type = int) -> Any:
        """A field the model cannot be built without: present and a positive number."""
        value = get(key)
        where = "text_config" if nested else "config.json"
        if value is None:
            raise UnsupportedModelError(f"{where} lacks the required field {key!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError):
            number = None
        if number is None or isinstance(value, bool) or number <= 0:
            raise UnsupportedModelError(f"{where} field {key!r} must be a positive number, got {value!r}")
        return number

    hidden = need("hidden_size")
    heads = need("num_attention_heads")
    for key in ("num_hidden_layers", "intermediate_size", "vocab_size", "max_position_embeddings"):
        need(key)
    theta, rope_type, rope = rope_settings(cfg if ("rope_parameters" in cfg or "rope_scaling" in cfg
                                                  or "rope_theta" in cfg) else raw, d["rope_theta"])
    sections = rope.get("mrope_section")
    if mt in ("qwen2_vl", "qwen2_5_vl"):
        rope_kind = "mrope"
        sections = list(sections or [16, 24, 24])
    elif rope_type in ("default", None):
        rope_kind = "default"
    else:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet (only default and mrope)")
    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = cfg.get("tie_word_embeddings", False)
    qwen_like = mt in ("qwen2", "qwen2_vl", "qwen2_5_vl")
    return TextConfig(
        model_type=mt, hidden_size=hidden, num_layers=int(get("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(get("num_key_value_heads", heads) or heads),
        head_dim=int(get("head_dim", hidden // heads) or hidden // heads),
        intermediate_size=int(get("intermediate_size")), vocab_size=int(get("vocab_size")),
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta, rope_kind=rope_kind,
        mrope_sections=sections if rope_kind == "mrope" else None, hidden_act=str(get("hidden_act")),
        max_position_embeddings=int(get("max_position_embeddings")), tie_word_embeddings=bool(tie),
        qkv_bias=True if qwen_like else bool(get("attention_bias", False)),
        o_bias=False if qwen_like else bool(get("attention_bias", False)),
        mlp_bias=False if qwen_like else bool(get("mlp_bias", False)),
    )


def vision_field(vc: dict[str, Any], *names: str, default: Any = None) -> Any:
    """First present field among aliases (configs renamed fields across versions)."""
    for n in names:
        if vc.get(n) is not None:
            return vc[n]
    if default is None:
        raise UnsupportedModelError(f"vision_config lacks {names[0]!r}")
    return default
