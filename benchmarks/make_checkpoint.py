"""Random-weight checkpoints with the real shapes of published VLMs, for benchmarks.

    python benchmarks/make_checkpoint.py qwen2_vl /tmp/qwen2vl-2b-shapes [--dtype bfloat16]
    python benchmarks/make_checkpoint.py smolvlm_500m /tmp/smolvlm-500m-shapes

The shapes come from ``reference_configs/<preset>.json`` (published config values of
Qwen2-VL-2B-Instruct, Qwen2.5-VL-3B-Instruct, llava-interleave-qwen-0.5b, gemma-3-4b-it,
paligemma-3b-mix-224, Qwen3-VL-2B-Instruct, SmolVLM-256M-Instruct (``idefics3``),
SmolVLM2-256M-Video-Instruct (``smolvlm``), Ministral-3-3B-Instruct-2512 (``mistral3``: the
smallest published Mistral 3, 3.85B parameters, 7.7 GB in bfloat16, about 2 GB as q4; the hub
repo ships FP8, the preset writes the BF16 layout) and gemma-4-E2B-it (``gemma4``: the smallest
published Gemma 4 with vision, 5.1B parameters with its audio tower and 2.3B of per-layer
embeddings; vlmc reads all but the audio tower), Qwen3.5-0.8B (``qwen3_5``: the smallest
published Qwen3.5 with vision, 0.85B parameters, 18 Gated DeltaNet + 6 gated full-attention
layers; the published values, which transformers' Qwen3_5Config defaults (a 9B) do not give;
its multi-token-prediction layer is not written, as transformers' class has none) and
``qwen3_5_moe``: Qwen3.5-35B-A3B's layer shapes, vocabulary and vision tower with its depth
REDUCED to 2 decoder layers (of 40: one linear-attention, one full-attention; 6.2 GB in
bfloat16; the reference config's ``about`` says where each value comes from)). A preset is a family's name or one of
``PRESETS``, a further model of a family: ``smolvlm_500m`` (SmolVLM-500M-Instruct, an
``idefics3`` checkpoint) and ``llava_1_5_7b`` (llava-1.5-7b-hf: a Llama-2-7B decoder, 7.06B
parameters, 14.1 GB in bfloat16) and ``gemma4_moe`` (gemma-4-26B-A4B's text shapes, 128 experts
of 704 with 8 per token beside a dense MLP in every layer, with its depth REDUCED to 6
decoder layers of 30: one period of 5 sliding + 1 full attention layers, about 11.5 GB in
bfloat16; the vision tower gemma-4-E2B's, as its reference config's ``about`` says). Tensor names
and shapes are read from transformers' model class instantiated on the meta device (no
memory); weights are drawn with numpy one tensor at a time (one block of rows at a time for
tensors over ``BLOCK_VALUES``) and streamed to safetensors shards, so a 2B model needs no
more RAM than its largest tensor, a 5B one no more than 4 GB. The tokenizer is the
test suite's small BPE with the family's special tokens and chat template (token ids in
config.json are rewritten to match it); vocab_size keeps the real value so the embedding
and LM head have their real cost.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from fixtures.checkpoints import build_tokenizer  # noqa: E402
from fixtures.gemma import build_tokenizer as build_gemma_tokenizer  # noqa: E402
from fixtures.gemma4 import build_tokenizer as build_gemma4_tokenizer  # noqa: E402
from fixtures.idefics3 import build_tokenizer as build_idefics3_tokenizer  # noqa: E402
from fixtures.pixtral import build_tokenizer as build_pixtral_tokenizer  # noqa: E402
from fixtures.qwen3_vl import build_tokenizer as build_qwen3_tokenizer  # noqa: E402
from fixtures.qwen3_5 import build_tokenizer as build_qwen3_5_tokenizer  # noqa: E402
from compare import TO_HUB  # noqa: E402  (one table of hub names; compare.py renames older checkpoints)
from vlmc.backends.safetensors_io import ShardWriter, to_storage  # noqa: E402

SHARD_BYTES = 2 << 30
BLOCK_VALUES = 1 << 30  # tensors larger than this are drawn and written in blocks of rows
FAMILIES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
            "llava": "LlavaForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration",
            "paligemma": "PaliGemmaForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
            "idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration",
            "mistral3": "Mistral3ForConditionalGeneration", "gemma4": "Gemma4ForConditionalGeneration",
            "qwen3_5": "Qwen3_5ForConditionalGeneration", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration"}
# further published models of a family: preset -> (family, test tokenizer variant)
PRESETS = {"smolvlm_500m": ("idefics3", "default"), "llava_1_5_7b": ("llava", "llava15"),
           "gemma4_moe": ("gemma4", "default")}
# families whose transformers 5 module names are the published ones
SAME_NAMES = ("qwen3_vl", "idefics3", "smolvlm", "gemma4", "qwen3_5", "qwen3_5_moe")
# the hub names of the Gemma families (transformers 4.x): vision_tower.vision_model.*, language_model.model.*
GEMMA_TO_HUB = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector.")]


def _shapes(family: str, config: dict) -> dict[str, tuple[int, ...]]:
    import torch
    import transformers
    cls = getattr(transformers, FAMILIES[family])
    cfg = cls.config_class.from_dict(config)
    with torch.device("meta"):
        model = cls(cfg)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))  # the class default where config.json has none
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k.endswith("lm_head.weight"))}


def hub_name(name: str, family: str) -> str:
    """transformers' in-memory (v5 module) name -> the name published checkpoints use,
    which every framework (mlx-vlm included) reads."""
    if family in SAME_NAMES:
        return name
    rules = GEMMA_TO_HUB if family in ("gemma3", "paligemma") else TO_HUB[
        "llava" if family in ("llava", "mistral3") else "qwen"]
    for old, new in rules:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith(("layer_scalar", "router.scale", "per_expert_scale")):
        return np.ones(shape, np.float32)
    if name.endswith(("input_min", "output_min", "input_max", "output_max")):  # clip bounds: none binding
        return np.full(shape, -1e4 if name.endswith("_min") else 1e4, np.float32)
    if name.endswith(".bias"):
        return np.zeros(shape, np.float32)
    if len(shape) == 1 and ("norm" in name or "ln_" in name):
        return np.ones(shape, np.float32)
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)


def make_checkpoint(preset: str, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    ref = json.loads((HERE / "reference_configs" / f"{preset}.json").read_text())
    family, variant = PRESETS.get(preset, (preset, "default"))
    config = dict(ref["config.json"])
    out.mkdir(parents=True, exist_ok=True)
    gemma = family in ("gemma3", "paligemma")
    if family == "qwen3_vl":
        tok = build_qwen3_tokenizer(out)
    elif family in ("qwen3_5", "qwen3_5_moe"):
        tok = build_qwen3_5_tokenizer(out)
    elif family in ("idefics3", "smolvlm"):
        tok = build_idefics3_tokenizer(out)
    elif family == "mistral3":
        tok = build_pixtral_tokenizer(out)
    elif family == "gemma4":
        tok = build_gemma4_tokenizer(out)
    else:
        tok = build_gemma_tokenizer(out, family) if gemma else build_tokenizer(out, family, variant)
    ids = tok["special_token_ids"]
    if gemma:
        eos, bos = ids["<eos>"], ids["<bos>"]
    elif family in ("idefics3", "smolvlm"):
        eos, bos = ids["<end_of_utterance>"], ids["<|im_start|>"]
    elif family == "mistral3":
        eos, bos = ids["</s>"], ids["<s>"]
    elif family == "gemma4":
        eos, bos = ids["<eos>"], ids["<bos>"]
    else:
        eos, bos = ids["<|im_end|>"], ids["<|endoftext|>"]
    if family in ("qwen3_vl", "qwen3_5", "qwen3_5_moe"):
        config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
        config["text_config"] = {**config["text_config"], "eos_token_id": eos, "bos_token_id": bos}
    elif family in ("idefics3", "smolvlm"):
        config["image_token_id"] = ids["<image>"]
        config["text_config"] = {**config["text_config"], "eos_token_id": eos, "bos_token_id": bos,
                                 "pad_token_id": ids["<|endoftext|>"]}
    elif gemma:
        tokens = dict(bos_token_id=bos, eos_token_id=eos, pad_token_id=ids["<pad>"])
        config["text_config"] = {**config["text_config"], **tokens}
        if family == "gemma3":
            config.update(boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                          image_token_index=ids["<image_soft_token>"], eos_token_id=[eos, ids["<end_of_turn>"]])
        else:
            config.update(image_token_index=ids["<image>"], **tokens)
    elif family == "gemma4":
        config.update(image_token_id=ids["<|image|>"], boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
                      video_token_id=ids["<|video|>"], audio_token_id=ids["<|audio|>"], boa_token_id=ids["<|audio>"],
                      eoa_token_index=ids["<audio|>"])
        config["text_config"] = {**config["text_config"], "eos_token_id": eos, "bos_token_id": bos,
                                 "pad_token_id": ids["<pad>"]}
    elif family == "mistral3":
        config["image_token_index"] = ids["[IMG]"]
        config["text_config"] = {**config["text_config"], "eos_token_id": eos, "bos_token_id": bos,
                                 "pad_token_id": ids["<pad>"]}
    elif family == "llava":
        config["image_token_index"] = ids["<image>"]
        if variant == "llava15":   # Llama tokenizers: <s> ... </s>
            eos, bos = ids["</s>"], ids["<s>"]
            config["pad_token_id"] = ids["<|endoftext|>"]
        config["text_config"] = {**config["text_config"], "eos_token_id": eos, "bos_token_id": bos}
    else:
        config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                      vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                      vision_token_id=ids["<|vision_pad|>"], eos_token_id=ids["<|im_end|>"],
                      bos_token_id=ids["<|endoftext|>"])
    # transformers' from_dict rewrites nested dicts in place (Qwen3-VL's vision model_type
    # "qwen3_vl" becomes "qwen3_vl_vision", which mlx-vlm refuses): give it a copy
    shapes = {hub_name(k, family): v for k, v in _shapes(family, copy.deepcopy(config)).items()}
    rng = np.random.default_rng(seed)
    item = 2 if dtype in ("bfloat16", "float16") else 4
    shards, cur, size = [], [], 0
    for tensor, shape in shapes.items():
        n = int(np.prod(shape)) * item
        if cur and size + n > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(tensor)
        size += n
    shards.append(cur)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        writer = ShardWriter(out / fname, [(n, shapes[n], dtype) for n in names])
        for n in names:
            shape = shapes[n]
            if int(np.prod(shape)) <= BLOCK_VALUES:
                writer.write(n, to_storage(_tensor(n, shape, rng), dtype))
            else:  # blocks of rows: gemma-4-E2B's per-layer embeddings (2.3B values) in one draw need 20 GB
                rows = max(1, BLOCK_VALUES // int(np.prod(shape[1:])))
                for r in range(0, shape[0], rows):
                    writer.write(n, to_storage(_tensor(n, (min(rows, shape[0] - r), *shape[1:]), rng), dtype))
            weight_map[n] = fname
        writer.close()
        print(f"wrote {fname}", file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=1))
    pre = dict(ref["preprocessor_config.json"])
    if family in ("idefics3", "smolvlm"):
        vc = config["vision_config"]
        tile = (vc["image_size"] // vc["patch_size"]) // config["scale_factor"]
        (out / "processor_config.json").write_text(json.dumps(
            {"processor_class": pre["processor_class"], "image_seq_len": tile * tile}))
    if family in ("mistral3", "gemma4"):
        (out / "processor_config.json").write_text(json.dumps(ref["processor_config.json"]))
    if family == "llava":
        (out / "processor_config.json").write_text(json.dumps(
            {"processor_class": "LlavaProcessor", "patch_size": config["vision_config"]["patch_size"],
             "vision_feature_select_strategy": config.get("vision_feature_select_strategy", "full"),
             # CLIP towers have a CLS row, which the "default" strategy drops
             "num_additional_image_tokens": int(config["vision_config"].get("model_type") == "clip_vision_model")}))
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=1))
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos], "bos_token_id": bos}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", choices=sorted([*FAMILIES, *PRESETS]))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(make_checkpoint(a.preset, a.out, a.dtype, a.seed))


if __name__ == "__main__":
    main()
