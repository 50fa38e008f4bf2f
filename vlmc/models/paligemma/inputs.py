"""The runtime half of PaliGemma: its prompt format, 1-based positions and the prefix-LM span.

transformers' PaliGemmaProcessor builds "<image>" x (images x tokens) + "<bos>" + text +
"\\n" and gives every prompt token token_type 0 (the prefix: full attention among them);
generated tokens are causal. There is no chat template: a request is one user message
(a task prompt such as "caption en"), its images in order, placed before the text
whatever their position among the message's parts. ``prompt_text`` writes the part
after the images ("<bos>" + text + "\\n", so the tokenizer adds no second BOS) and
``expand`` puts the image tokens before it. Positions start at 1 (PaliGemma's
``position_ids`` are 1-indexed). A prompt without images (which transformers' processor
refuses) is the same format with no image tokens.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import InputError
from ..common.image_processing import ProcessedImages
from ..family import Inputs


class PaliGemmaInputs(Inputs):
    def prompt_text(self, messages: list[dict[str, Any]], tokenizer: Any) -> str:
        roles = [m.get("role") for m in messages]
        if roles != ["user"]:
            raise InputError(f"PaliGemma takes one user message (a task prompt such as 'caption en'), "
                             f"not {'/'.join(str(r) for r in roles)} messages: it has no chat format")
        content = messages[0].get("content", "")
        text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
        return f"{tokenizer.bos_token}{text}\n"

    def expand(self, ids: list[int], images: ProcessedImages | None) -> list[int]:
        if self.image_token_id in ids:
            raise InputError("the prompt's text holds the image token itself; images go in image parts")
        n = 0 if images is None else sum(images.num_tokens)
        return [self.image_token_id] * n + list(ids)

    def positions(self, ids: list[int], images: ProcessedImages | None) -> tuple[np.ndarray, int]:
        return np.arange(1, len(ids) + 1, dtype=np.int64)[None], 1

    def attention_spans(self, ids: list[int], images: ProcessedImages | None) -> list[tuple[int, int]]:
        """The whole prompt (images, BOS, text, newline) is the bidirectional prefix."""
        return [(0, len(ids))]
