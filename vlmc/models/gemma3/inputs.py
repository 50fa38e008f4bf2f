"""The runtime half of Gemma 3: image placeholders expanded as transformers' Gemma3Processor
expands them, and each image's soft tokens attending to each other in both directions.

The chat template writes ``<start_of_image>`` for an image; the processor replaces it with
"\\n\\n<start_of_image>" + ``<image_soft_token>`` x N + "<end_of_image>\\n\\n" in the *text*
and then tokenizes, so the newlines merge with the text around them ("user\\n" + "\\n\\n"
is one "\\n\\n\\n" token with Gemma's tokenizer). The expansion therefore re-tokenizes the
prompt's text with the image sequences in place, with the artifact's tokenizer. An image
that pan-and-scan cut into crops (rows > 1 in ``grid_thw``) becomes "Here is the original
image <seq> and here are some crops to help you see better <seq> <seq> ...", one soft-token
sequence per crop.
"""
from __future__ import annotations

from typing import Any

from ...errors import InputError
from ..common.image_processing import ProcessedImages
from ..family import Inputs


def runs_of(ids: list[int], token: int | None) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ``token`` in ids."""
    spans: list[tuple[int, int]] = []
    start = None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            spans.append((start, i))
            start = None
    return spans


class Gemma3Inputs(Inputs):
    def __init__(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        super().__init__(meta, processor_spec, tokenizer)
        self.boi_token_id: int | None = self.settings.get("boi_token_id")
        self.eoi_token_id: int | None = self.settings.get("eoi_token_id")

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        n_images = self.matched_images(ids, images, self.boi_token_id if self.image_token_id is not None else None)
        if not n_images:
            return list(ids)
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("Gemma 3 prompts are expanded with the artifact's tokenizer; none was given")
        boi, soft, eoi = (tok.id_to_token(t) for t in (self.boi_token_id, self.image_token_id, self.eoi_token_id))
        text = tok.decode(ids, skip_special_tokens=False)
        pieces = text.split(boi)
        out = pieces[0]
        per_row = int(self.settings["tokens_per_image"])
        rows = images.grid_thw[:, 0].tolist() if images.grid_thw is not None else [1] * n_images
        for piece, n in zip(pieces[1:], rows):
            seq = f"\n\n{boi}{soft * per_row}{eoi}\n\n"
            if n > 1:  # pan-and-scan: the image, then its crops, in Gemma3Processor's words
                seq = (f"Here is the original image {seq} and here are some crops to help you see better "
                       + " ".join([seq] * (n - 1)))
            out += seq + piece
        expanded = tok.encode(out, add_special_tokens=False)
        if sum(1 for t in expanded if t == self.image_token_id) != sum(images.num_tokens):
            raise InputError(f"the prompt's text holds {soft!r} itself; images go in image parts")
        return expanded

    def attention_spans(self, ids: list[int], images: ProcessedImages | None) -> list[tuple[int, int]]:
        """Each image's soft tokens, as transformers' token_type_ids mark them."""
        return runs_of(ids, self.image_token_id) if images is not None else []
