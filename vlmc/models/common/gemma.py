"""Gemma decoders (Gemma 1, Gemma 2, Gemma 3 text) on the shared decoder blocks.

What Gemma adds to a Llama-style decoder, each a shared-block option: embeddings scaled
by sqrt(hidden), RMSNorm weights applied as ``1 + w`` (folded at compile time), GELU-tanh
MLPs. Gemma 2 adds sandwich norms around attention and MLP, an attention scale from
``query_pre_attn_scalar``, sliding-window layers beside global ones, soft-capped attention
scores and logits. Gemma 3 adds QK-norm to Gemma 2's layer, gives the sliding-window
layers their own rotary base and the global ones linear rotary scaling, and drops the
attention soft-capping (Gemma 3 text soft-caps its logits when configured to).

transformers writes the rotary settings two ways: v4 configs (most hub checkpoints) have
``rope_theta`` + ``rope_scaling`` for the global layers and ``rope_local_base_freq`` for the
local ones, v5 configs ``rope_parameters`` keyed by layer type; layer types are
``layer_types`` or, in v4 configs, ``sliding_window_pattern`` (every n-th layer global).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.core import Program
from .layers import decoder_layer, text_entry_points
from .text_config import Decoder, TextConfig, text_config

SLIDING, FULL = "sliding_attention", "full_attention"
# transformers' GemmaConfig / Gemma3TextConfig defaults for absent fields
_DEFAULTS = {
    "gemma": dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, head_dim=256, vocab_size=256000),
    "gemma2": dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh",
                   max_position_embeddings=8192, head_dim=256, vocab_size=256000),
    "gemma3_text": dict(rms_norm_eps=1e-6, rope_theta=1_000_000.0, hidden_act="gelu_pytorch_tanh",
                        max_position_embeddings=131072, head_dim=256, vocab_size=262208),
}
# Gemma2Config's defaults (PaliGemma 2's hub configs set them anyway)
_GEMMA2_DEFAULTS = dict(query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                        attn_logit_softcapping=50.0)
_LOCAL_THETA = 10000.0  # Gemma 3's default rope_local_base_freq
_TABLES = {SLIDING: "local", FULL: "global"}


@dataclass
class GemmaText:
    """A Gemma decoder's settings (``tc`` holds the Llama-style ones)."""

    tc: TextConfig
    sandwich: bool                       # Gemma 2/3: norms around attention and MLP
    qk_norm: bool                        # Gemma 3
    attn_scale: float
    attn_softcap: float | None           # Gemma 2
    layer_types: list[str]               # SLIDING or FULL per layer
    window: int | None
    rope: dict[str, dict[str, Any]]      # rotary table ("global"/"local") -> rope_freqs attributes
    final_softcap: float | None


def _rope_tables(cfg: dict[str, Any], types: list[str]) -> dict[str, dict[str, Any]]:
    """Each layer type's rotary table from either config layout (Gemma 3)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and (FULL in params or SLIDING in params):  # v5: per layer type
        per_type = {t: dict(params.get(t) or {}) for t in (FULL, SLIDING)}
        per_type[FULL].setdefault("rope_theta", cfg.get("rope_theta", _DEFAULTS["gemma3_text"]["rope_theta"]))
        per_type[SLIDING].setdefault("rope_theta", cfg.get("rope_local_base_freq", _LOCAL_THETA))
    else:  # v4: rope_scaling (or flat rope_parameters) is the global layers'
        full = {**(cfg.get("rope_scaling") or {}), **(params or {})}
        full.setdefault("rope_theta", cfg.get("rope_theta", _DEFAULTS["gemma3_text"]["rope_theta"]))
        per_type = {FULL: full, SLIDING: {"rope_type": "default",
                                          "rope_theta": cfg.get("rope_local_base_freq", _LOCAL_THETA)}}
    tables: dict[str, dict[str, Any]] = {}
    for t in dict.fromkeys(types):
        p = per_type[t]
        kind = p.get("rope_type", p.get("type", "default"))
        attrs: dict[str, Any] = {"kind": "default", "theta": float(p["rope_theta"])}
        if kind == "linear":
            attrs["factor"] = float(p["factor"])
        elif kind != "default":
            raise UnsupportedModelError(f"rope type {kind!r} of the {t} layers is not supported (default, linear)")
        tables[_TABLES[t]] = attrs
    return tables


def gemma_text(raw: dict[str, Any], *, nested: bool, prefix_lm: bool = False) -> GemmaText:
    """The decoder of a Gemma (``gemma``), Gemma 2 (``gemma2``) or Gemma 3 (``gemma3_text``) text config, found in
    raw["text_config"] when ``nested`` (PaliGemma, Gemma 3), else at the top level.
    ``prefix_lm``: the model masks attention itself (PaliGemma), so the text config's
    ``use_bidirectional_attention`` (which transformers' PaliGemmaConfig sets) changes nothing."""
    cfg = dict(raw.get("text_config") or {}) if nested else dict(raw)
    mt = cfg.get("model_type") or ("gemma3_text" if raw.get("model_type") == "gemma3" else "gemma")
    if mt not in _DEFAULTS:
        raise UnsupportedModelError(f"text model type {mt!r} is not supported here; supported: {', '.join(_DEFAULTS)}")
    gemma3, gemma2 = mt == "gemma3_text", mt == "gemma2"
    if gemma2:
        cfg = {**_GEMMA2_DEFAULTS, **cfg}  # absent: Gemma2Config's default; an explicit null: none
    if cfg.get("use_bidirectional_attention") and not prefix_lm:
        raise UnsupportedModelError("use_bidirectional_attention (an encoder-only Gemma) is not supported")
    if cfg.get("attn_logit_softcapping") is not None and not gemma2:
        raise UnsupportedModelError("attention logit soft-capping (attn_logit_softcapping) is supported for "
                                    "Gemma 2 only")

    clean = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta")}
    types: list[str] = []
    if gemma3 or gemma2:
        act = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
        n_layers = cfg.get("num_hidden_layers", raw.get("num_hidden_layers"))
        types = list(cfg.get("layer_types") or [])
        if not types and n_layers:
            pattern = 2 if gemma2 else int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
            types = [SLIDING if (i + 1) % pattern else FULL for i in range(int(n_layers))]
        if set(types) - {SLIDING, FULL}:
            raise UnsupportedModelError(f"layer types {sorted(set(types) - {SLIDING, FULL})} are not supported")
    if gemma3:
        rope = _rope_tables(cfg, types)
    else:
        if not gemma2:
            act = cfg.get("hidden_act") or "gelu_pytorch_tanh"
            act = "gelu_pytorch_tanh" if act == "gelu" else act  # transformers' reading of legacy Gemma configs
        rope_type = (cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}).get("rope_type", "default")
        if rope_type != "default":
            raise UnsupportedModelError(f"rope type {rope_type!r} is not supported for Gemma (default only)")
        rope = {}
        theta = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta"))
        if theta is not None:
            clean["rope_theta"] = theta
    clean["hidden_act"] = act
    tie = raw.get("tie_word_embeddings", cfg.get("tie_word_embeddings"))
    top = {k: v for k, v in raw.items() if k in ("hidden_size", "vocab_size")}  # PaliGemma v4 configs
    src = {**top, "text_config": clean} if nested else clean
    tc = text_config({**src, "tie_word_embeddings": True if tie is None else bool(tie)}, nested=nested,
                     decoder=Decoder(_DEFAULTS[mt]), text_type=mt)
    attn_softcap = None
    if gemma3 or gemma2:
        layer_types = types
        if len(layer_types) != tc.num_layers:
            raise UnsupportedModelError(f"layer_types has {len(layer_types)} entries for {tc.num_layers} layers")
        window = int(cfg["sliding_window"]) if SLIDING in layer_types and cfg.get("sliding_window") else None
        if SLIDING in layer_types and window is None:
            raise UnsupportedModelError("sliding-window layers without a sliding_window size")
        scalar = float(cfg.get("query_pre_attn_scalar", 256))
        softcap = cfg.get("final_logit_softcapping")
        if gemma2 and cfg.get("attn_logit_softcapping") is not None:
            attn_softcap = float(cfg["attn_logit_softcapping"])
    else:
        layer_types, window, scalar, softcap = [FULL] * tc.num_layers, None, float(tc.head_dim), None
    return GemmaText(tc=tc, sandwich=gemma3 or gemma2, qk_norm=gemma3, attn_scale=scalar ** -0.5,
                     attn_softcap=attn_softcap, layer_types=layer_types, window=window, rope=rope,
                     final_softcap=None if softcap is None else float(softcap))


def gemma_decoder(prog: Program, w: Weights, g: GemmaText, *, final_softcap: bool = True) -> None:
    """The decoder block and the text entry points (embed, prefill, decode, verify) of a
    Gemma decoder. ``final_softcap``: whether the logits are soft-capped when the config says
    so (transformers' Gemma3ForConditionalGeneration never does)."""
    tc = g.tc
    rope_of = [_TABLES[t] for t in g.layer_types] if g.rope else None
    windows = [g.window if t == SLIDING else None for t in g.layer_types]
    block = decoder_layer(w, tc, qk_norm=g.qk_norm, sandwich_norms=g.sandwich, norm_offset=1.0,
                          attn_scale=g.attn_scale, attn_softcap=g.attn_softcap, layer_rope=rope_of,
                          layer_window=windows)
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block, embed_scale=tc.hidden_size ** 0.5, norm_offset=1.0,
                      final_softcap=g.final_softcap if final_softcap else None,
                      rope_tables=g.rope or None)
