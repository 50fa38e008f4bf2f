"""Gemma 3: a SigLIP tower, an average-pooled projector (a fixed number of soft tokens per
image between ``<start_of_image>`` and ``<end_of_image>``, attending to each other in both
directions) and a Gemma 3 decoder (sliding-window and global layers); ``gemma3_text`` is
the decoder alone. ``do_pan_and_scan`` in the preprocessor config adds crops of elongated
images after each image, as transformers' Gemma3Processor does."""
from __future__ import annotations

from typing import Any

from ..family import Family


class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3", "gemma3_text")

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)

    def processor_spec(self, preprocessor_config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        from ..common.clip_processor import pan_and_scan_spec
        from ..common.processors import spec_from_preprocessor_config
        cfg = dict(preprocessor_config)
        # Gemma 3's own step (the generic SigLIP kind refuses the switch). transformers 5.24's
        # Gemma3Processor applies it only when a call asks (its defaults override the image
        # processor's); vlmc follows the config, with transformers' arithmetic when it is on.
        pas = pan_and_scan_spec(cfg)
        cfg.pop("do_pan_and_scan", None)
        extra = {"pan_and_scan": pas} if pas else {}
        return spec_from_preprocessor_config(cfg, "siglip", tokens_per_image=meta["inputs"]["tokens_per_image"],
                                             **extra)

    def inputs(self, meta: dict[str, Any], processor_spec: dict[str, Any], tokenizer: Any = None):
        from .inputs import Gemma3Inputs
        return Gemma3Inputs(meta, processor_spec, tokenizer)


FAMILY = Gemma3()
