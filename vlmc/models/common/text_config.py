"""The text decoder's settings, from either transformers config layout.

v4 layout (most hub checkpoints): text fields at the top level (Qwen-VL) or in
``text_config`` (LLaVA), rotary settings in ``rope_theta`` + ``rope_scaling``.
v5 layout (``save_pretrained`` in transformers 5): nested ``text_config`` and
``rope_parameters``. Both become one TextConfig, so importers never read raw layouts.

A family that brings its own decoder flavour (defaults, biases, rotary kind) passes a
``Decoder``; otherwise the text model_type picks one of ``DECODERS`` (LLaVA's case).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.config import rope_settings


@dataclass(frozen=True)
class Decoder:
    """A decoder flavour: transformers' defaults for absent fields, which projections carry
    biases (``"qwen"``: q/k/v only; ``"config"``: ``attention_bias`` / ``mlp_bias``), and
    the rotary kind (``"mrope"`` and ``"mrope_interleaved"``, Qwen3-VL's, take
    ``mrope_section``, default ``mrope_sections``)."""

    defaults: dict[str, Any]
    biases: str = "config"
    rope: str = "default"
    mrope_sections: tuple[int, ...] = ()


DECODERS: dict[str, Decoder] = {
    "llama": Decoder(dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=2048)),
    "mistral": Decoder(dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=32768)),
    "qwen2": Decoder(dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=32768),
                     biases="qwen"),
}


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
    rope_kind: str                      # "default" | "mrope" | "mrope_interleaved"
    mrope_sections: list[int] | None
    hidden_act: str
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """What the runtime needs to know of the decoder (``meta["text"]``)."""
        return {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings, "model_type": self.model_type}


def text_config(raw: dict[str, Any], *, nested: bool, decoder: Decoder | None = None,
                text_type: str | None = None) -> TextConfig:
    """Build a TextConfig. ``nested`` means the text fields live in raw["text_config"]
    (always for LLaVA; for Qwen-VL only in the v5 layout, detected by the caller)."""
    cfg = dict(raw.get("text_config") or {}) if nested else dict(raw)
    mt = text_type or cfg.get("model_type") or raw.get("model_type")
    if decoder is None:
        if mt not in DECODERS:
            raise UnsupportedModelError(
                f"text model type {mt!r} is not supported; supported: {', '.join(DECODERS)}")
        decoder = DECODERS[mt]
    d = decoder.defaults

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
    sections = None
    if decoder.rope in ("mrope", "mrope_interleaved"):
        rope_kind = decoder.rope
        sections = list(rope.get("mrope_section") or decoder.mrope_sections)
    elif rope_type in ("default", None):
        rope_kind = "default"
    else:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported yet (only default and mrope)")
    tie = raw.get("tie_word_embeddings")
    if tie is None:
        tie = cfg.get("tie_word_embeddings", False)
    qwen_like = decoder.biases == "qwen"
    return TextConfig(
        model_type=mt, hidden_size=hidden, num_layers=int(get("num_hidden_layers")),
        num_heads=heads, num_kv_heads=int(get("num_key_value_heads", heads) or heads),
        head_dim=int(get("head_dim", hidden // heads) or hidden // heads),
        intermediate_size=int(get("intermediate_size")), vocab_size=int(get("vocab_size")),
        rms_norm_eps=float(get("rms_norm_eps")), rope_theta=theta, rope_kind=rope_kind,
        mrope_sections=sections, hidden_act=str(get("hidden_act")),
        max_position_embeddings=int(get("max_position_embeddings")), tie_word_embeddings=bool(tie),
        qkv_bias=True if qwen_like else bool(get("attention_bias", False)),
        o_bias=False if qwen_like else bool(get("attention_bias", False)),
        mlp_bias=False if qwen_like else bool(get("mlp_bias", False)),
    )
