"""Idefics3 / SmolVLM checkpoints -> IR: SigLIP tower, pixel-shuffle connector, Llama decoder.

Every tile is one square image of the tower's ``image_size``. Its patch embeddings get the
position table's rows at host-planned ids (transformers buckets each patch's fractional
coordinate into the table's grid; for a full tile that is the identity except for some
grid sizes, where float rounding moves a patch to the previous bucket). The connector
(Idefics3Connector) folds each ``scale_factor`` x ``scale_factor`` block of patches into
one token ("pixel shuffle": rows of the patch grid taken ``scale_factor`` columns at a
time, then transposed, as transformers' view/permute sequence does it) and projects it
without a bias. ``tile_tokens`` = (patches per side / scale_factor)^2 per tile.
"""
from __future__ import annotations

from typing import Any

from ...errors import SourceError, UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import Program
from ..common.layers import decoder_layer, finish, siglip_tower, text_entry_points
from ..common.text_config import DECODERS, Decoder, text_config

# Idefics3VisionConfig's defaults for absent fields (not SigLIP's)
_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                        layer_norm_eps=1e-6)
_TOWERS = ("idefics3_vision", "smolvlm_vision")
# Idefics3Config builds an absent text config as a Llama with rms_norm_eps 1e-5
_LLAMA = Decoder({**DECODERS["llama"].defaults, "rms_norm_eps": 1e-5})


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = raw.get("text_config") or {}
    text_type = text.get("model_type", "llama")
    tc = text_config(raw, nested=True, decoder=_LLAMA if text_type == "llama" else None, text_type=text_type)
    vc = raw.get("vision_config") or {}
    tower = vc.get("model_type", _TOWERS[0])
    if tower not in _TOWERS:
        raise UnsupportedModelError(f"{raw['model_type']} vision tower {tower!r} is not supported; "
                                    f"supported: {', '.join(_TOWERS)}")
    vc = {**_VISION_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
    scale = int(raw.get("scale_factor", 2))
    prog = Program(name=name)

    fb = FunctionBuilder("vision_encode", w.types(), doc=(
        "tiles [N, C, T, T] -> SigLIP last hidden state -> pixel shuffle, projection: tile_tokens feature "
        "rows per tile; position ids planned on the host"))
    x, tw = siglip_tower(w, prog, vc, fb, position_ids=True)
    grid = tw["image_size"] // tw["patch"]
    if scale < 1 or grid % scale:
        raise UnsupportedModelError(f"scale_factor {scale} does not divide the {grid}x{grid} patch grid")
    dim, h = tw["dim"], tc.hidden_size
    w.add("projector.proj.weight", (h, dim * scale * scale), role="proj", part="projector")
    fb.param_types.update(w.types())
    # Idefics3Connector.pixel_shuffle: [N, g*g, E] -> [N, g, g/s, E*s] -> swap the grid axes ->
    # [N, g/s, g/s, E*s*s] -> swap back -> [N, (g/s)^2, E*s*s]
    x = fb.op("reshape", x, shape=[0, grid, grid // scale, dim * scale], name="shuffle")
    x = fb.op("transpose", x, axes=[0, 2, 1, 3], name="shuffle")
    x = fb.op("reshape", x, shape=[0, grid // scale, grid // scale, dim * scale * scale], name="shuffle")
    x = fb.op("transpose", x, axes=[0, 2, 1, 3], name="shuffle")
    x = fb.op("reshape", x, shape=[0, (grid // scale) ** 2, dim * scale * scale], name="shuffle")
    x = fb.op("linear", x, fb.param("projector.proj.weight"), name="proj")
    prog.functions["vision_encode"] = fb.output(fb.op("reshape", x, shape=[-1, h], name="features"))

    block = decoder_layer(w, tc)
    prog.blocks[block.name] = block
    text_entry_points(prog, w, tc, block)

    image_token = raw.get("image_token_id", text.get("image_token_id"))
    prog.meta["inputs"] = {
        "position_streams": 1,
        "image_token_id": None if image_token is None else int(image_token),
        "tile_size": tw["image_size"], "patch_size": tw["patch"], "tile_tokens": (grid // scale) ** 2,
        "position_grid": grid,
    }
    return finish(prog, w, tc)


def processor_spec(preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The splitting processor's spec, checked against the tower: its tiles must be the
    images the tower takes."""
    from ..common.processors import spec_from_preprocessor_config
    inp = meta["inputs"]
    spec = spec_from_preprocessor_config(preprocessor_config, "idefics3", tile_tokens=inp["tile_tokens"])
    if spec["max_image_size"] != inp["tile_size"]:
        raise SourceError(f"preprocessor_config.json max_image_size {spec['max_image_size']} differs from the vision "
                          f"tower's image_size {inp['tile_size']}; vlmc needs tiles of the tower's size")
    return spec
