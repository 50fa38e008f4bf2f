"""Qwen3.5 MoE: Qwen3.5's hybrid decoder (Gated DeltaNet and gated full-attention layers,
``models/qwen3_5``) with every layer's MLP a sparse mixture of experts (a softmax top-k
router over the routed experts, renormalised, plus a sigmoid-gated shared expert:
``common/moe.py``), behind the same vision tower and inputs."""
from __future__ import annotations

from ..qwen3_5 import Qwen35


class Qwen35Moe(Qwen35):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)

    def build(self, config, weights, name):
        from .importer import build_program
        return build_program(config, weights, name)


FAMILY = Qwen35Moe()
