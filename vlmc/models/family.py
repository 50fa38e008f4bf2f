"""The family interface: what a model family tells the compiler and the runtime.

A family is one folder, ``vlmc/models/<family>/``, whose ``__init__.py`` defines a
``Family`` subclass and ``FAMILY = ThatClass()``. The class is small and its methods
import the rest of the folder when called, so the runtime can ask a family for its
``Inputs`` without loading the importer (which needs the frontend and the IR builders).

Compile half (``vlmc.compiler``):
- ``build(config, weights, name)``: the checkpoint's config.json and weights -> an IR
  ``Program`` with its entry points, and ``meta["inputs"]``: the plain-JSON settings the
  runtime half needs (token ids, patch and merge sizes, ...), ``meta["inputs"]
  ["position_streams"]`` among them (1, or 3 for M-RoPE's t/h/w positions);
- ``processor_spec(preprocessor_config, meta)``: the image preprocessing spec stored as
  ``processor.json``.

Runtime half (``vlmc.runtime``): ``inputs(meta, processor_spec, tokenizer)`` -> an ``Inputs``: the
family's image preprocessing, prompt expansion (image placeholders), rotary positions,
bidirectional attention spans, the vision tower's host-planned inputs and how image
features merge into the text embeddings. The runtime calls nothing else of a family.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import mlx.core as mx
import numpy as np

from ..errors import InputError
from .common.image_processing import ImageProcessor, ProcessedImages
from .common.processors import make_image_processor

if TYPE_CHECKING:  # the compile half's types, not imported at run time
    from ..frontend.weights import Weights
    from ..ir.core import Program


class Inputs:
    """A family's inputs for one artifact: images and token ids -> what its program takes.

    The defaults fit a family whose images are fixed-size token runs at an image
    placeholder id and whose decoder has one stream of rotary positions (LLaVA); a family
    overrides what it does differently."""

    def __init__(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        """``tokenizer``: the artifact's (``vlmc.runtime.tokenizer.Tokenizer``), for families
        whose placeholder expansion works on text, as their processors do."""
        self.settings = dict(meta["inputs"])
        self.tokenizer = tokenizer
        self.image_token_id: int | None = self.settings.get("image_token_id")
        self.position_streams: int = int(self.settings.get("position_streams", 1))
        # a text-only model's spec has kind "none": it takes no images (build_prompt says so)
        self.processor: ImageProcessor | None = \
            None if processor_spec.get("kind") == "none" else make_image_processor(processor_spec)

    def prompt_text(self, messages: list[dict[str, Any]], tokenizer: Any) -> str | None:
        """The prompt for these (normalised) messages when the family formats prompts
        itself instead of through the checkpoint's chat template (e.g. PaliGemma's
        "<image>...<bos>text\n"); None: the chat template."""
        return None

    def preprocess(self, images: Sequence[Any]) -> ProcessedImages:
        """PIL images -> pixels and per-image token counts, as transformers' processor makes them."""
        if self.processor is None:
            raise InputError("this model takes no images")
        return self.processor.process(images)

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        """The rendered prompt's ids with each image placeholder repeated to its token count."""
        tok = self.image_token_id
        n_slots = sum(1 for i in ids if i == tok) if tok is not None else 0
        n_images = 0 if images is None else len(images.num_tokens)
        if n_slots != n_images:
            raise InputError(f"the prompt has {n_slots} image placeholder(s) but {n_images} image(s) were given")
        if not n_images:
            return list(ids)
        out: list[int] = []
        k = 0
        for i in ids:
            if i == tok:
                out.extend([tok] * images.num_tokens[k])
                k += 1
            else:
                out.append(i)
        return out

    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        """(rotary positions [position_streams, L] of an expanded prompt, delta): the token
        after the prompt's last one is at position len(ids) + delta on every stream."""
        return np.arange(len(ids), dtype=np.int64)[None], 0

    def attention_spans(self, ids: list[int], images: ProcessedImages | None) -> list[tuple[int, int]]:
        """[start, end) ranges of the expanded prompt whose tokens attend to each other in
        both directions (e.g. each image's tokens, or a prefix-LM's whole prefix); the rest
        is causal. The default: none."""
        return []

    def vision_inputs(self, images: ProcessedImages) -> dict[str, mx.array]:
        """The ``vision_encode`` entry point's keyword arguments for these images."""
        return {"pixels": mx.array(images.pixel_values)}

    def merge(self, embeds: mx.array, ids: mx.array, features: mx.array) -> mx.array:
        """Text embeddings [B, L, D] with the image features' rows at the placeholders, in order."""
        from ..kernels.reference import merge_features
        return merge_features(embeds, ids, features, self.image_token_id)


class Family:
    """One model family (see the module docstring). Subclasses set ``name`` (the folder)
    and ``model_types`` (config.json's ``model_type`` values it compiles)."""

    name = ""
    model_types: tuple[str, ...] = ()
    # (checkpoint prefix, canonical prefix) rules for this family's weight names, tried
    # before the shared ones in vlmc.frontend.weights (e.g. ("model.connector.", "projector."))
    weight_prefixes: tuple[tuple[str, str], ...] = ()

    def build(self, config: dict[str, Any], weights: "Weights", name: str) -> "Program":  # pragma: no cover
        raise NotImplementedError

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None) -> Inputs:
        return Inputs(meta, processor_spec, tokenizer)
