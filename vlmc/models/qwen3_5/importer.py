"""Qwen3.5 checkpoints -> IR.

The decoder's ``layer_types`` (or every ``full_attention_interval``-th layer) say which
layers are full attention; the others are Gated DeltaNet layers. Each kind is one block
(``text_attn_layer``, ``text_linear_layer``) holding its layers, with params renamed per
block (``text.attn_layers.<i>.*`` read from ``text.layers.<layer>.*``); the entry points
run them in decoder order, each block's layer with its own decoder layer's cache
(``text_entry_points(..., stack=...)``). ``kv_layout`` plans KV caches for the
full-attention layers and recurrent states (bytes per sequence) for the others.

Full attention: QK-norm, q_proj making each head's query and an output gate, rotary on
the first ``partial_rotary_factor`` of each head with interleaved M-RoPE sections. Every
RMSNorm except the DeltaNet's gated one applies ``1 + w`` (folded at compile time). The
vision tower is Qwen3-VL's (``common/qwen3_vision.py``), here with no DeepStack mergers.
Multi-token-prediction weights (``mtp.*``) are not used.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.core import Program
from ..common.layers import decoder_layer, finish, text_entry_points
from ..common.linear_attention import LinearAttention, gated_deltanet_layer
from ..common.qwen3_vision import qwen3_vision_tower
from ..common.text_config import Decoder, text_config

# transformers' Qwen3_5TextConfig defaults for absent fields
_DECODER = Decoder(dict(rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", max_position_embeddings=32768),
                   rope="mrope_interleaved", mrope_sections=(11, 11, 10))


def _token(raw: dict[str, Any], key: str) -> int | None:
    for src in (raw, raw.get("text_config") or {}):
        if src.get(key) is not None:
            return int(src[key])
    return None


def layer_types(text: dict[str, Any], n_layers: int) -> list[str]:
    types = text.get("layer_types")
    if types is None:
        every = int(text.get("full_attention_interval", 4))
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(n_layers)]
    types = list(types)
    unknown = sorted(set(types) - {"full_attention", "linear_attention"})
    if len(types) != n_layers or unknown:
        raise UnsupportedModelError(f"layer_types must name {n_layers} layers as full_attention or "
                                    f"linear_attention; got {len(types)} ({', '.join(unknown) or 'lengths differ'})")
    return types


def build_program(raw: dict[str, Any], w: Weights, name: str, *, ffn: Any = None,
                  decoder: Decoder = _DECODER, text_type: str = "qwen3_5_text") -> Program:
    """The program of a Qwen3.5 checkpoint; ``ffn`` replaces every layer's gated MLP (the
    MoE variant's ``SparseMoe``), ``decoder`` and ``text_type`` are the text config's
    defaults and model type."""
    text = raw.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UnsupportedModelError("a Qwen3.5 config.json needs a text_config with the decoder's sizes")
    tc = text_config(raw, nested=True, decoder=decoder, text_type=text.get("model_type") or text_type)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"Qwen3.5 rope type {rope['rope_type']!r} is not supported yet (only default)")
    if text.get("attn_output_gate") is False:
        raise UnsupportedModelError("Qwen3.5 full attention without its output gate is not supported")
    factor = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    rope_dim = int(tc.head_dim * factor)
    if rope_dim < 2 or rope_dim % 2 or rope_dim > tc.head_dim:
        raise UnsupportedModelError(f"partial_rotary_factor {factor} gives rotary dim {rope_dim} for head dim "
                                    f"{tc.head_dim}")
    if sum(tc.mrope_sections) * 2 != rope_dim:
        raise UnsupportedModelError(f"mrope_section {tc.mrope_sections} does not cover the rotary dim {rope_dim}")
    types = layer_types(text, tc.num_layers)
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    linear = [i for i, t in enumerate(types) if t == "linear_attention"]
    if not full:
        raise UnsupportedModelError("a Qwen3.5 decoder without full-attention layers is not supported")
    la = LinearAttention.from_config(text)
    prog = Program(name=name)

    vision = qwen3_vision_tower(prog, w, raw.get("vision_config") or {}, tc.hidden_size, tc.num_layers)
    if vision["deepstack_levels"]:
        raise UnsupportedModelError("Qwen3.5 vision towers with DeepStack mergers are not supported")

    attn = decoder_layer(w, tc, "text.attn_layers.{i}.", qk_norm=True, norm_offset=1.0, output_gate=True,
                         rope_dim=rope_dim, layers=full, ffn=ffn, name="text_attn_layer")
    stack = [(attn, full)]
    if linear:
        lin = gated_deltanet_layer(w, tc, la, linear, norm_offset=1.0, ffn=ffn)
        prog.blocks[lin.name] = lin
        stack.append((lin, linear))
    prog.blocks[attn.name] = attn
    text_entry_points(prog, w, tc, attn, position_streams=3, norm_offset=1.0, rope_dim=rope_dim, stack=stack)

    prog.meta["inputs"] = {
        "position_streams": 3,
        "image_token_id": _token(raw, "image_token_id"),
        "video_token_id": _token(raw, "video_token_id"),
        "vision_start_token_id": _token(raw, "vision_start_token_id"),
        **vision,
    }
    prog.meta["layer_types"] = types
    return finish(prog, w, tc)
