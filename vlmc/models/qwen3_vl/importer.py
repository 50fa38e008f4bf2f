"""Qwen3-VL checkpoints -> IR.

The vision tower (``common/qwen3_vision.py``) is Qwen2-VL's with a biased Conv3d patch
embedding, GELU-tanh MLPs and learned position embeddings resampled to each image's grid
(the host plans the taps: ``inputs.position_taps``).

DeepStack: after each vision layer in ``deepstack_visual_indexes`` a merger of its own
(LayerNorm after the 2x2 merge, not before) makes one more feature row per image token;
the decoder adds the k-th of them to its hidden state at the image tokens after layer k.
``vision_encode`` returns [tokens, (1 + K) * hidden]: the merged features, then the K
DeepStack blocks; ``Inputs.merge`` places whole rows at the image tokens of embeddings
that ``embed`` made (1 + K) * hidden wide, and prefill adds block k after layer k
(``text_entry_points``' ``deepstack`` option).

The decoder is Qwen3's: QK-norm, no biases (``attention_bias``), and M-RoPE with the
t/h/w frequencies interleaved (transformers' Qwen3-VL interleaves them whatever
``mrope_interleaved`` says).
"""
from __future__ import annotations

from typing import Any

from ...errors import SourceError, UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.core import Program
from ..common.layers import decoder_layer, finish, text_entry_points
from ..common.qwen3_vision import qwen3_vision_tower
from ..common.text_config import Decoder, text_config

# transformers' Qwen3VLTextConfig defaults for absent fields
_DECODER = Decoder(dict(rms_norm_eps=1e-6, rope_theta=500000.0, hidden_act="silu", max_position_embeddings=128000),
                   rope="mrope_interleaved", mrope_sections=(24, 20, 20))


def _token(raw: dict[str, Any], key: str) -> int | None:
    for src in (raw, raw.get("text_config") or {}):
        if src.get(key) is not None:
            return int(src[key])
    return None


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = raw.get("text_config")
    if not isinstance(text, dict) or "hidden_size" not in text:
        raise UnsupportedModelError("a Qwen3-VL config.json needs a text_config with the decoder's sizes")
    tc = text_config(raw, nested=True, decoder=_DECODER, text_type=text.get("model_type") or "qwen3_vl_text")
    rope_type = (text.get("rope_parameters") or text.get("rope_scaling") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise UnsupportedModelError(f"Qwen3-VL rope type {rope_type!r} is not supported yet (only default)")
    h = tc.hidden_size
    vc = raw.get("vision_config") or {}
    prog = Program(name=name)

    vision = qwen3_vision_tower(prog, w, vc, h, tc.num_layers, default_deepstack=(8, 16, 24))
    block = decoder_layer(w, tc, qk_norm=True)
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block, position_streams=3, deepstack=list(range(vision["deepstack_levels"])))

    prog.meta["inputs"] = {
        "position_streams": 3,
        "image_token_id": _token(raw, "image_token_id"),
        "video_token_id": _token(raw, "video_token_id"),
        "vision_start_token_id": _token(raw, "vision_start_token_id"),
        "vision_end_token_id": _token(raw, "vision_end_token_id"),
        **vision,
    }
    return finish(prog, w, tc)


def processor_spec(preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Qwen2VLImageProcessor's spec (Qwen3-VL's processor), checked against the tower: the
    patches it cuts must be the ones the patch embedding takes."""
    from ..common.processors import spec_from_preprocessor_config
    spec = spec_from_preprocessor_config(preprocessor_config, "qwen2_vl")
    inp = meta["inputs"]
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
        if int(spec[key]) != int(inp[key]):
            raise SourceError(f"preprocessor_config.json {key} {spec[key]} does not match the vision tower's "
                              f"{inp[key]}")
    return spec
