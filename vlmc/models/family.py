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
from .common.image_processing import ImageProcessor, ProcessedImages, concat_processed
from .common.processors import make_image_processor, make_video_processor
from .common.video import Sampler, Video

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
        video_spec = self.video_spec(processor_spec)
        self.video_processor: Any = None if video_spec is None else make_video_processor(video_spec)
        self.video_token_id: int | None = self.settings.get("video_token_id") if self.video_processor else None

    @property
    def placeholder_ids(self) -> tuple[int, ...]:
        """The token ids whose positions take vision features (images', then videos')."""
        return tuple(t for t in (self.image_token_id, self.video_token_id) if t is not None)

    def video_spec(self, processor_spec: dict[str, Any]) -> dict[str, Any] | None:
        """The artifact's video preprocessing spec (``processor.json``'s ``video``), or None
        for a model that takes no videos."""
        return processor_spec.get("video")

    def video_sampler(self, fps: float | None = None, max_frames: int | None = None,
                      num_frames: int | None = None) -> Sampler:
        """Which frames of a video to decode, as the family's transformers video processor
        samples them; None settings take the spec's defaults."""
        if self.video_processor is None:
            raise InputError("this model takes no videos")
        return self.video_processor.sampler(fps=fps, max_frames=max_frames, num_frames=num_frames)

    def preprocess_media(self, media: Sequence[Any]) -> ProcessedImages:
        """Images (PIL) and videos (``Video``) in prompt order -> one ProcessedImages whose
        items follow that order (``token_ids`` tells which placeholder each item fills)."""
        if not any(isinstance(m, Video) for m in media):
            return self.preprocess(media)
        if self.video_processor is None:
            raise InputError("this model takes no videos")
        parts, run = [], []
        for m in list(media) + [None]:   # consecutive images are processed together
            if isinstance(m, Video) or m is None:
                if run:
                    parts.append(self.preprocess(run))
                    run = []
                if m is not None:
                    parts.append(self.preprocess_video(m))
            else:
                run.append(m)
        return concat_processed(parts, self.image_token_id)

    def preprocess_video(self, video: Video) -> ProcessedImages:
        """One decoded video -> its rows, its placeholder token and its timing."""
        out = self.video_processor.process([video])
        out.token_ids = [self.video_token_id]
        out.timing = [{"fps": video.sampled_fps, "timestamps": video.timestamps, "native_fps": video.meta.fps,
                       "indices": [int(i) for i in video.indices]}]
        return out

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

    def matched_images(self, ids: list[int], images: ProcessedImages | None, placeholder: int | None) -> int:
        """The number of images given, which must equal the prompt's ``placeholder`` ids (none
        where the family has no placeholder): one clear error otherwise."""
        n_slots = sum(1 for i in ids if i == placeholder) if placeholder is not None else 0
        n_images = 0 if images is None else len(images.num_tokens)
        if n_slots != n_images:
            raise InputError(f"the prompt has {n_slots} image placeholder(s) but {n_images} image(s) were given")
        return n_images

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        """The rendered prompt's ids with each image placeholder repeated to its token count."""
        slots = set(self.placeholder_ids)
        n_slots = sum(1 for i in ids if i in slots)
        n_images = 0 if images is None else len(images.num_tokens)
        if n_slots != n_images:
            if len(slots) > 1:
                raise InputError(f"the prompt has {n_slots} image or video placeholder(s) but {n_images} image(s) "
                                 "and video(s) were given")
            raise InputError(f"the prompt has {n_slots} image placeholder(s) but {n_images} image(s) were given")
        if not n_images:
            return list(ids)
        kinds = images.item_token_ids(self.image_token_id)
        out: list[int] = []
        k = 0
        for i in ids:
            if i in slots:
                if i != kinds[k]:
                    raise InputError(f"item {k + 1} of the prompt's images and videos does not match its placeholder")
                out.extend([i] * images.num_tokens[k])
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
        slots = self.placeholder_ids
        return merge_features(embeds, ids, features, slots if len(slots) > 1 else self.image_token_id)


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

    def video_spec(self, video_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any] | None:
        """The video preprocessing spec stored as ``processor.json``'s ``video``, from the
        checkpoint's ``video_preprocessor_config.json`` (or, where it has none, its
        ``preprocessor_config.json``, as transformers falls back); None: takes no videos."""
        return None

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None) -> Inputs:
        return Inputs(meta, processor_spec, tokenizer)
