"""vlmc's bundled demo: a tiny trained Qwen2-VL checkpoint and the synthetic task it solves.

``MODEL_DIR`` is an ordinary Hugging Face checkpoint folder shipped inside the package
(config.json, model.safetensors, tokenizer, chat template, processor config, model card), so
``vlmc run`` has a model that gives a checkable answer about an image with no download;
every command and ``vlmc.load`` also know it by ``NAME`` (``vlmc-demo``).
``shapes`` generates the task's images and questions (train / validation / test splits);
``vlmc.evaluate`` measures a model on them. ``benchmarks/train_demo.py`` trains the model.
"""
from __future__ import annotations

from pathlib import Path

MODEL_DIR: Path = Path(__file__).resolve().parent / "model"
NAME = "vlmc-demo"  # what every command and vlmc.load accept for MODEL_DIR

__all__ = ["MODEL_DIR", "NAME"]
