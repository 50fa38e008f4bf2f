"""Train vlmc's bundled demo model: a tiny Qwen2-VL that answers questions about shape images.

    python benchmarks/train_demo.py                      # writes vlmc/demo/model/
    python benchmarks/train_demo.py --out /tmp/demo2     # a reproduction elsewhere
    python benchmarks/train_demo.py --evaluate-only      # re-measure a trained folder

Development only: it needs torch and transformers (``pip install -e ".[test]"``); the
shipped model then runs with vlmc alone. It lives in ``benchmarks/`` beside
``make_checkpoint.py`` (the other dev script that builds checkpoints with transformers):
that folder is never packaged, and the quality benchmark of the same model lives here too.

What it does, in order (every random choice is seeded by ``--seed``):

1. trains a small byte-level BPE tokenizer on the task's text (``vlmc.demo.shapes``), with
   the Qwen-VL special tokens and a Qwen-style chat template (no default system message);
2. builds a tiny ``Qwen2VLForConditionalGeneration`` and the transformers processor
   (``Qwen2VLImageProcessorPil`` + the tokenizer; built directly, as torchvision is absent);
3. generates ``--train-images`` training images (seeds 0..N-1 of the train range) and checks
   by hashing that no image (hence no image+question pair) of the train, validation or test
   split occurs in another split;
4. trains with AdamW on (image, question) -> answer, loss on the answer tokens and
   ``<|im_end|>`` only, measuring teacher-forced exact match on validation as it goes;
5. saves the checkpoint (``--dtype``), then measures greedy-decoding exact match with
   transformers on the full validation and test splits, and with vlmc (compiled float32)
   on the test split, and writes ``training.json`` and the model card ``README.md``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine a spinning thread waits
# for a descheduled peer and a training step took 5-20x longer (measured). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vlmc.demo import shapes as S  # noqa: E402

DEFAULT_OUT = HERE.parent / "vlmc" / "demo" / "model"
DEVICE = "cpu"  # --device: where training runs (tensors made here follow torch's default device)


def on_device(tensors: dict) -> dict:
    return {k: v.to(DEVICE) if hasattr(v, "to") else v for k, v in tensors.items()}

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2-VL's chat template without the default system message (the model never saw one):
# string or list content, image parts as <|vision_start|><|image_pad|><|vision_end|>,
# optional "Picture N: " prefixes with add_vision_id.
CHAT_TEMPLATE = r"""{%- set counter = namespace(image=0, video=0) -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for part in message['content'] -%}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}
{%- set counter.image = counter.image + 1 -%}
{%- if add_vision_id -%}{{- 'Picture ' + counter.image|string + ': ' -}}{%- endif -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif part['type'] == 'video' or 'video' in part -%}
{%- set counter.video = counter.video + 1 -%}
{%- if add_vision_id -%}{{- 'Video ' + counter.video|string + ': ' -}}{%- endif -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in part -%}
{{- part['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

# The Qwen2 pre-tokenizer split (transformers' Qwen2Tokenizer rebuilds the same pipeline).
QWEN_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PIXELS = S.IMAGE_SIZE * S.IMAGE_SIZE  # min_pixels = max_pixels: any image -> about 112x112


# ----------------------------------------------------------------------------- tokenizer


def _corpus() -> list[str]:
    """The task's text: every question template filled in every way, the questions and answers
    of 2000 training scenes, and the bare answer words."""
    lines = [S.Q_SHAPE, S.Q_COUNT, S.Q_DESCRIBE, *S.NUMBER_WORDS, "left", "right"]
    for shape in S.SHAPES:
        lines.append(S.Q_COLOR.format(shape=shape))
        for c1 in S.COLORS:
            lines.append(f"A {c1} {shape}. An {c1} {shape}. a {c1} {shape}, and")
            for s2 in S.SHAPES:
                for c2 in S.COLORS:
                    if s2 != shape:
                        lines.append(S.Q_POSITION.format(c1=c1, s1=shape, c2=c2, s2=s2))
    for seed in S.split_seeds("train", 2000):  # questions and answers as frequent as in training
        shapes, _ = S.make_scene(seed)
        for q, a in S.questions(shapes, seed):
            lines += [q, a]
    lines += ["user\n", "assistant\n", "system\n"] * 20 + ["Picture 1: ", "You are a helpful assistant."]
    # Answers start a reply, with no leading space: repeat them bare so each is one token
    # ("orange", not "o" "r" "ange"), and an answer's first token is the whole decision.
    answers = [*S.COLORS, *S.SHAPES, *S.NUMBER_WORDS[1:], "left", "right"]
    lines += answers * 20
    return lines


def build_tokenizer(out: Path, vocab_target: int) -> dict[str, int]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_target, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                               "single_word": False, "special": True} for t in SPECIALS},
        "additional_special_tokens": [t for t in SPECIALS if t != "<|endoftext|>"],
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": 1024,
        "split_special_tokens": False,
        "processor_class": "Qwen2VLProcessor",
        "tokenizer_class": "Qwen2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2) + "\n")
    ids["__size__"] = tok.get_vocab_size(with_added_tokens=True)
    return ids


def preprocessor_config() -> dict:
    return {
        "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": PIXELS, "max_pixels": PIXELS,
        "size": {"shortest_edge": PIXELS, "longest_edge": PIXELS},
        "merge_size": 2, "patch_size": 14, "temporal_patch_size": 2,
        "resample": 3, "rescale_factor": 1 / 255,
    }


# ----------------------------------------------------------------------------- model + processor


def make_config(ids: dict[str, int], args: argparse.Namespace):
    import transformers as tf

    vocab = (ids["__size__"] + 63) // 64 * 64
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    head_dim = args.text_hidden // args.text_heads
    unit = head_dim // 2 // 8  # mrope sections (t, h, w) in Qwen2-VL's 2:3:3 proportion
    mrope = [unit * 2, unit * 3, head_dim // 2 - unit * 5]
    text = dict(
        vocab_size=vocab, hidden_size=args.text_hidden, intermediate_size=args.text_intermediate,
        num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
        num_key_value_heads=args.text_kv_heads, hidden_act="silu", max_position_embeddings=1024,
        rms_norm_eps=1e-6, initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
        bos_token_id=eot, eos_token_id=im_end, pad_token_id=eot,
    )
    vision = dict(
        depth=args.vision_depth, embed_dim=args.vision_dim, hidden_size=args.text_hidden,
        num_heads=args.vision_heads, mlp_ratio=args.vision_mlp_ratio, hidden_act="quick_gelu",
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3, initializer_range=0.02,
    )
    cfg = tf.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    cfg.vision_token_id = ids["<|vision_pad|>"]
    return cfg


def _without_video(cls):
    """``cls`` accepting ``video_processor=None`` (the video processor needs torchvision)."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None:
            return None
        return cls.check_argument_for_proper_class(self, argument_name, argument)

    return type(cls.__name__, (cls,), {"check_argument_for_proper_class": check_argument_for_proper_class})


def make_processor(folder: Path):
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pp = json.loads((folder / "preprocessor_config.json").read_text())
    kwargs = {k: v for k, v in pp.items() if k not in ("image_processor_type", "processor_class", "size")}
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return _without_video(Qwen2VLProcessor)(image_processor=Qwen2VLImageProcessorPil(**kwargs), tokenizer=tokenizer,
                                            video_processor=None, chat_template=template)


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# ----------------------------------------------------------------------------- data


class Packer:
    """Rows of one image and several of its questions, sharing the image prefix.

    A single-turn example is ``prefix + segment``: the prefix is
    ``<|im_start|>user\n<|vision_start|><|image_pad|>*n<|vision_end|>`` (the same for every
    question about an image), the segment is ``question<|im_end|>\n<|im_start|>assistant\n``
    followed by the answer and ``<|im_end|>``. A packed row holds the prefix once and then
    each segment; the attention mask lets a segment see the prefix and itself only, and its
    M-RoPE positions start where a single-turn example's would. So each segment computes
    exactly what the single-turn example computes (checked by ``check_equivalence``), while
    the vision tower and the prefix run once per image instead of once per question.
    """

    def __init__(self, processor, model_config):
        self.processor = processor
        self.tok = processor.tokenizer
        self.cfg = model_config
        self.image_id = model_config.image_token_id
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tok.pad_token_id
        marker = "<|vision_end|>"
        text = prompt_text(processor, "Q")
        self.prefix_text = text[:text.index(marker) + len(marker)]
        self._prefix_ids = self._ids(self.prefix_text)
        self._segments: dict[tuple[str, str], tuple[list[int], int]] = {}

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def segment(self, question: str, answer: str) -> tuple[list[int], int]:
        """(segment ids, number of answer ids incl. <|im_end|>)."""
        key = (question, answer)
        if key not in self._segments:
            text = prompt_text(self.processor, question)
            assert text.startswith(self.prefix_text)
            answer_ids = self._ids(answer) + [self.im_end]
            self._segments[key] = (self._ids(text[len(self.prefix_text):]) + answer_ids, len(answer_ids))
        return self._segments[key]

    def prefix(self, grid_thw) -> tuple[list[int], "torch.Tensor"]:
        """Prefix ids (image placeholder expanded) and their M-RoPE positions [3, n]; the text
        after it starts at position max + 1."""
        import torch

        t, h, w = (int(v) for v in grid_thw)
        n_image = t * h * w // self.cfg.vision_config.spatial_merge_size ** 2
        ids: list[int] = []
        for i in self._prefix_ids:
            ids.extend([i] * n_image if i == self.image_id else [i])
        ids_t = torch.tensor([ids])
        pos, _ = _rope_index(self.cfg, ids_t, (ids_t == self.image_id).int(), torch.tensor([[t, h, w]]))
        return ids, pos[:, 0]

    def __call__(self, rows: list[tuple[Any, list[tuple[str, str]]]]):
        """rows: (image, [(question, answer), ...]) -> (model inputs, targets [B, L], segment index
        [B, L] of each target: -1 where none)."""
        import torch

        with torch.device("cpu"):  # built on the host, element by element; moved once at the end
            return self._pack(rows)

    def _pack(self, rows):
        import torch

        enc = self.processor.image_processor(images=[im for im, _ in rows], return_tensors="pt")
        built = []
        for (_, qas), grid in zip(rows, enc["image_grid_thw"]):
            p_ids, p_pos = self.prefix(grid)
            built.append((p_ids, p_pos, [self.segment(q, a) for q, a in qas]))
        width = max(len(p) + sum(len(s) for s, _ in segs) for p, _, segs in built)
        B = len(rows)
        ids = torch.full((B, width), self.pad_id, dtype=torch.long)
        pos = torch.zeros((3, B, width), dtype=torch.long)
        mask = torch.zeros((B, 1, width, width), dtype=torch.bool)
        targets = torch.full((B, width), -100, dtype=torch.long)
        seg_of = torch.full((B, width), -1, dtype=torch.long)
        causal = torch.ones((width, width), dtype=torch.bool).tril()
        for b, (p_ids, p_pos, segs) in enumerate(built):
            n = len(p_ids)
            ids[b, :n] = torch.tensor(p_ids)
            pos[:, b, :n] = p_pos
            mask[b, 0, :n, :n] = causal[:n, :n]
            start_pos = int(p_pos.max()) + 1
            at = n
            for k, (s_ids, n_answer) in enumerate(segs):
                m = len(s_ids)
                ids[b, at:at + m] = torch.tensor(s_ids)
                pos[:, b, at:at + m] = torch.arange(start_pos, start_pos + m)
                mask[b, 0, at:at + m, :n] = True
                mask[b, 0, at:at + m, at:at + m] = causal[:m, :m]
                # position t predicts token t + 1: the answer tokens and <|im_end|>
                first = at + m - n_answer
                targets[b, first - 1:at + m - 1] = ids[b, first:at + m]
                seg_of[b, first - 1:at + m - 1] = k
                at += m
            for t in range(at, width):  # padding attends to itself (no empty softmax rows)
                mask[b, 0, t, t] = True
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": pos,
                  "pixel_values": enc["pixel_values"], "image_grid_thw": enc["image_grid_thw"]}
        return on_device(inputs), targets.to(DEVICE), seg_of.to(DEVICE)


def _rope_index(cfg, ids, mm_types, grid_thw):
    """Qwen2VLModel.get_rope_index without a model instance (it only reads the config)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    holder = type("_Holder", (), {"config": cfg, "get_vision_position_ids": Qwen2VLModel.get_vision_position_ids})()
    return Qwen2VLModel.get_rope_index(holder, ids, mm_token_type_ids=mm_types, image_grid_thw=grid_thw)


def check_equivalence(model, processor, packer: "Packer", samples: list[S.Sample]) -> float:
    """Max |logit difference| between packed rows and the single-turn examples (transformers'
    own processor and position ids) at every answer position; raises above 1e-4."""
    import torch

    model.eval()
    worst = 0.0
    with torch.no_grad():
        inputs, targets, seg_of = packer([(s.image, s.qas) for s in samples])
        packed = model(**inputs, use_cache=False).logits
        for b, s in enumerate(samples):
            for k, (q, a) in enumerate(s.qas):
                text = prompt_text(processor, q)
                enc = on_device(processor(text=[text], images=[s.image], return_tensors="pt"))
                ans = packer.tok(a, add_special_tokens=False)["input_ids"] + [packer.im_end]
                n = enc["input_ids"].shape[1]
                full = {**enc, "input_ids": torch.cat([enc["input_ids"], torch.tensor([ans])], 1),
                        "attention_mask": torch.ones((1, n + len(ans)), dtype=torch.long),
                        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"],
                                                        torch.zeros((1, len(ans)), dtype=torch.long)], 1)}
                single = model(**full, use_cache=False).logits[0, n - 1:n + len(ans) - 1]
                rows = (seg_of[b] == k).nonzero()[:, 0]
                if not torch.equal(targets[b, rows].cpu(), torch.tensor(ans, device="cpu")):
                    raise AssertionError(f"packed targets differ for {q!r}")
                worst = max(worst, float((packed[b, rows] - single).abs().max()))
    model.train()
    if worst > 1e-4:
        raise AssertionError(f"packed rows differ from single-turn examples by {worst:.2e}")
    return worst


def flatten(samples: list[S.Sample]) -> list[tuple[Any, str, str, str]]:
    return [(s.image, q, a, k) for s in samples for q, a, k in s.items()]


def loss_and_hits(model, inputs, targets, seg_of, per_question: bool = True):
    """Mean cross-entropy over answer tokens (and <|im_end|>), and per (row, segment) whether
    every one of them is the argmax: teacher-forced exact match, true exactly when greedy
    decoding reproduces the answer and then stops."""
    import torch
    import torch.nn.functional as F

    logits = model(**inputs, use_cache=False).logits.float()
    B, L = targets.shape
    n_seg = int(seg_of.max()) + 1
    token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                 reduction="none").view(B, L)
    valid = (targets != -100)
    index = seg_of.clamp(min=0)
    seg_loss = torch.zeros((B, n_seg)).scatter_add(1, index, token_loss * valid)
    seg_len = torch.zeros((B, n_seg)).scatter_add_(1, index, valid.float())
    present = seg_len > 0
    if per_question:  # every question weighs the same, whatever its answer's length
        loss = (seg_loss[present] / seg_len[present]).mean()
    else:
        loss = seg_loss.sum() / seg_len.sum()
    with torch.no_grad():
        wrong = ((logits.argmax(-1) != targets) & valid).long()
        errors = torch.zeros((B, n_seg), dtype=torch.long).scatter_add_(1, index, wrong)
        hits = errors == 0
    return loss, hits


def teacher_forced_accuracy(model, packer: Packer, samples: list[S.Sample], batch_size: int = 32) -> dict[str, Any]:
    import torch

    model.eval()
    per: dict[str, list[int]] = defaultdict(list)
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            _, hits = loss_and_hits(model, *packer([(s.image, s.qas) for s in chunk]))
            for b, s in enumerate(chunk):
                for k, (_, _, kind) in enumerate(s.items()):
                    per[kind].append(int(hits[b, k]))
    model.train()
    return _summary(per)


def _summary(per: dict[str, list[int]]) -> dict[str, Any]:
    total = sum(len(v) for v in per.values())
    out: dict[str, Any] = {"accuracy": sum(sum(v) for v in per.values()) / max(total, 1), "n": total}
    out["per_kind"] = {k: {"accuracy": sum(per[k]) / len(per[k]), "n": len(per[k])} for k in S.KINDS if per.get(k)}
    return out


# ----------------------------------------------------------------------------- transformers greedy eval


def transformers_accuracy(folder: Path, split: str, n_images: int, batch_size: int = 32,
                          log=print) -> dict[str, Any]:
    """Exact match of greedy decoding with transformers (float32) on a split's first n images."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    processor = make_processor(folder)
    tok = processor.tokenizer
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).to(DEVICE).eval()
    items = flatten(S.split(split, n_images))
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    per: dict[str, list[int]] = defaultdict(list)
    failures = []
    t0 = time.time()
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        tok.padding_side = "left"
        enc = processor(text=[prompt_text(processor, q) for _, q, _, _ in chunk], images=[im for im, *_ in chunk],
                        return_tensors="pt", padding=True)
        enc = on_device(enc)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, eos_token_id=eos, pad_token_id=eos[1])
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for (_, q, a, k), t in zip(chunk, texts):
            ok = S.normalize(t) == S.normalize(a)
            per[k].append(int(ok))
            if not ok and len(failures) < 20:
                failures.append({"question": q, "expected": a, "got": t})
    tok.padding_side = "right"
    res = _summary(per)
    res["seconds"] = round(time.time() - t0, 1)
    res["failures"] = failures
    log(f"transformers {split}: {res['accuracy']:.4f} on {res['n']} questions ({res['seconds']} s)")
    return res


def vlmc_accuracy(folder: Path, split: str, n_images: int, log=print) -> dict[str, Any]:
    import vlmc
    from vlmc.evaluate import evaluate

    with _temp_dir() as tmp:
        artifact = vlmc.compile(str(folder), str(Path(tmp) / "artifact"), dtype="float32")
        res = evaluate(vlmc.load(artifact), split=split, limit=n_images, progress=True)
    log(f"vlmc {split}: {res['accuracy']:.4f} on {res['n']} questions ({res['seconds']} s)")
    return res


class _temp_dir:
    def __enter__(self):
        import tempfile
        self.path = tempfile.mkdtemp(prefix="vlmc-demo-")
        return self.path

    def __exit__(self, *exc):
        shutil.rmtree(self.path, ignore_errors=True)


# ----------------------------------------------------------------------------- training


def train(args: argparse.Namespace) -> None:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    work = out.with_name(out.name + ".training")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_file = open(work / "train.log", "w")

    def log(msg: str) -> None:
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    ids = build_tokenizer(work, args.vocab)
    (work / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    processor = make_processor(work)
    _check_answer_tokenization(processor)
    config = make_config(ids, args)
    model = Qwen2VLForConditionalGeneration(config).to(DEVICE)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_vision = sum(p.numel() for p in model.model.visual.parameters())
    log(f"tokenizer {ids['__size__']} tokens (vocab {config.text_config.vocab_size}); model {n_params / 1e6:.2f}M "
        f"params ({n_vision / 1e6:.2f}M vision)")

    t0 = time.time()
    train_samples = S.split("train", args.train_images)
    val_samples = S.split("validation", args.val_images)
    test_samples = S.split("test", args.test_images)
    pairs = S.check_disjoint({"train": train_samples, "validation": val_samples, "test": test_samples})
    log(f"data: {args.train_images} train images ({pairs['train']} image+question pairs), validation "
        f"{pairs['validation']}, test {pairs['test']}; no image crosses splits ({time.time() - t0:.1f} s)")
    val_monitor = val_samples[:: max(1, len(val_samples) // args.monitor_images)]
    del test_samples

    packer = Packer(processor, config)
    diff = check_equivalence(model, processor, packer, val_samples[:3])
    log(f"packed rows = single-turn examples (max logit difference {diff:.1e})")
    aux = AuxHead(model, args.text_hidden)
    aux.linear.to(DEVICE)
    aux.patch_linear.to(DEVICE)
    word_aux = WordAuxHead(model, processor.tokenizer, args.text_hidden, args.word_aux_layer)
    vision_seconds = pretrain_vision(model, processor, aux, train_samples, args, log) if args.vision_steps else 0.0
    decay, no_decay = list(aux.parameters()) + list(word_aux.parameters()), []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name or "embed" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    rng = random.Random(args.seed)
    order: list[list[int]] = []
    history = []
    t_train = time.time()
    cpu_train = time.process_time()
    run_loss, run_aux, run_word, run_hits, run_n, questions_seen = 0.0, 0.0, 0.0, 0, 0, 0
    for step in range(args.steps):
        if not order:
            order = epoch_batches(train_samples, args.batch_size, rng)
        batch = [train_samples[i] for i in order.pop()]
        rows = [(s.image, s.qas) for s in batch]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        packed = packer(rows)
        loss, hits = loss_and_hits(model, *packed)
        decay_factor = max(0.0, 1 - step / max(1, args.aux_steps))
        aux_loss = aux.loss(batch)
        word_loss = word_aux.loss(batch, packed[0]["input_ids"])
        opt.zero_grad(set_to_none=True)
        (loss + decay_factor * (args.aux_weight * aux_loss + args.word_aux_weight * word_loss)).backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        n_q = sum(len(s.qas) for s in batch)
        questions_seen += n_q
        run_loss += loss.item()
        run_aux += aux_loss.item()
        run_word += word_loss.item()
        run_hits += sum(int(hits[b, :len(s.qas)].sum()) for b, s in enumerate(batch))
        run_n += n_q
        if (step + 1) % args.log_every == 0:
            log(f"step {step + 1}/{args.steps} loss {run_loss / args.log_every:.4f} aux {run_aux / args.log_every:.3f} "
                f"word {run_word / args.log_every:.3f} "
                f"train-acc {run_hits / run_n:.3f} lr {lr_at(step):.2e} "
                f"({(time.time() - t_train) / (step + 1):.2f} s/step, cpu {time.process_time() - cpu_train:.0f} s)")
            log(f"  vision probe: {aux.report()} | word probe: {word_aux.report()}")
            run_loss, run_aux, run_word, run_hits, run_n = 0.0, 0.0, 0.0, 0, 0
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            acc = teacher_forced_accuracy(model, packer, val_monitor)
            history.append({"step": step + 1, "seconds": round(time.time() - t_train, 1), **acc})
            log(f"  validation (teacher-forced, {acc['n']} q): {acc['accuracy']:.4f} "
                + " ".join(f"{k}={v['accuracy']:.3f}" for k, v in acc["per_kind"].items()))
    train_seconds = time.time() - t_train
    train_cpu_seconds = time.process_time() - cpu_train
    model.eval()
    val_tf = teacher_forced_accuracy(model, packer, val_samples)
    log(f"training done in {train_seconds:.0f} s; full validation (teacher-forced): {val_tf['accuracy']:.4f}")

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model.to("cpu").to(dtype).save_pretrained(str(work), safe_serialization=True)
    gen = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False, "max_new_tokens": 32}
    (work / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    total_seconds = time.time() - t_start

    record = {
        "task": "vlmc.demo.shapes",
        "seed": args.seed,
        "data": {"train_images": args.train_images, "train_pairs": pairs["train"],
                 "train_seed_range": [S.SPLIT_SEEDS["train"].start, S.SPLIT_SEEDS["train"].start + args.train_images],
                 "validation_images": args.val_images, "validation_pairs": pairs["validation"],
                 "test_images": args.test_images, "test_pairs": pairs["test"],
                 "splits_disjoint": True, "image_size": S.IMAGE_SIZE},
        "model": {"params": n_params, "vision_params": n_vision, "dtype": args.dtype,
                  "vocab_size": config.text_config.vocab_size, "tokenizer_size": ids["__size__"]},
        "hyperparameters": {k: getattr(args, k) for k in (
            "vision_steps", "vision_lr", "steps", "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "aux_weight", "aux_steps", "word_aux_weight", "word_aux_layer", "vocab", "text_hidden",
            "text_layers", "text_heads", "text_kv_heads", "text_intermediate", "vision_dim", "vision_depth",
            "vision_heads", "vision_mlp_ratio", "threads")},
        "images_seen": args.steps * args.batch_size,
        "questions_seen": questions_seen,
        "epochs": round(args.steps * args.batch_size / len(train_samples), 2),
        "wall_time_seconds": {"vision_pretraining": round(vision_seconds, 1), "training_loop": round(train_seconds, 1),
                              "total_until_saved": round(total_seconds, 1)},
        "cpu_time_seconds": {"training_loop": round(train_cpu_seconds, 1), "total_until_saved": round(time.process_time(), 1)},
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": args.threads},
        "versions": _versions(),
        "validation_history_teacher_forced": history,
        "validation_teacher_forced": val_tf,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    (work / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    log(f"saved to {work}; total {total_seconds:.0f} s")
    log_file.close()

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(work, out, ignore=shutil.ignore_patterns("train.log"))
    shutil.copy(work / "train.log", out.with_name(out.name + ".train.log"))
    shutil.rmtree(work)
    if not args.skip_eval:
        evaluate_folder(out, args)


def pretrain_vision(model, processor, aux: "AuxHead", samples: list[S.Sample], args: argparse.Namespace, log) -> float:
    """Phase 1: the vision tower alone, trained on the auxiliary region labels.

    Learning shapes through the answers alone is slow (the decoder must first learn to read
    features that do not exist yet); a vision-only step is cheap (no decoder, no text), so
    the tower first learns kind, color and place of every region, then phase 2 trains
    everything on the answers."""
    import torch

    params = list(model.model.visual.parameters()) + list(aux.parameters())
    opt = torch.optim.AdamW(params, lr=args.vision_lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    rng = random.Random(args.seed + 1)
    t0 = time.time()
    for step in range(args.vision_steps):
        warm = min(1.0, (step + 1) / args.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * step / args.vision_steps))
        for g in opt.param_groups:
            g["lr"] = args.vision_lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)
        batch = rng.sample(samples, args.batch_size)
        enc = processor.image_processor(images=[s.image for s in batch], return_tensors="pt")
        enc = on_device(enc)
        model.model.visual(enc["pixel_values"], grid_thw=enc["image_grid_thw"])
        loss = aux.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.log_every == 0:
            log(f"vision step {step + 1}/{args.vision_steps} aux {loss.item():.3f} "
                f"({(time.time() - t0) / (step + 1):.2f} s/step): {aux.report()}")
    aux.report()  # start phase 2's statistics afresh
    return time.time() - t0


AUX_CLASSES = (1 + len(S.SHAPES), 1 + len(S.COLORS), S.IMAGE_SIZE // 28)  # kind, color, column of a token


def region_labels(sample: S.Sample) -> np.ndarray:
    """Per merged image token (a 28x28 region, row-major): the kind and color of the shape
    covering most of it (0 = background), the token's column, and the covering shape's
    center x in [-1, 1] (NaN for background). Targets of the auxiliary loss only; the shipped
    model has no trace of them."""
    g = S.IMAGE_SIZE // 28
    kind = np.zeros((g, g), np.int64)
    color = np.zeros((g, g), np.int64)
    center = np.full((g, g), np.nan)
    if sample.shapes:
        cov = np.stack([S.coverage(sh) for sh in sample.shapes]).reshape(len(sample.shapes), g, 28, g, 28).mean((2, 4))
        best, value = cov.argmax(0), cov.max(0)
        kinds = np.array([1 + S.SHAPES.index(sh.kind) for sh in sample.shapes])
        colors = np.array([1 + list(S.COLORS).index(sh.color) for sh in sample.shapes])
        xs = np.array([2 * sh.cx / S.IMAGE_SIZE - 1 for sh in sample.shapes])
        covered = value >= 0.1
        kind[covered] = kinds[best[covered]]
        color[covered] = colors[best[covered]]
        center[covered] = xs[best[covered]]
    column = np.broadcast_to(np.arange(g), (g, g))
    return np.stack([kind.ravel(), color.ravel(), column.ravel(), center.ravel()], axis=1)


def patch_kinds(sample: S.Sample) -> np.ndarray:
    """Per 14x14 patch, in the processor's patch order (2x2 merge groups, row-major), the kind
    of the shape covering at least 30% of it (0 = background)."""
    g = S.IMAGE_SIZE // 14
    kind = np.zeros((g, g), np.int64)
    if sample.shapes:
        cov = np.stack([S.coverage(sh) for sh in sample.shapes]).reshape(len(sample.shapes), g, 14, g, 14).mean((2, 4))
        best, value = cov.argmax(0), cov.max(0)
        kinds = np.array([1 + S.SHAPES.index(sh.kind) for sh in sample.shapes])
        covered = value >= 0.3
        kind[covered] = kinds[best[covered]]
    # (row, col) -> (block row, block col, row in block, col in block), as Qwen2-VL patchifies
    return kind.reshape(g // 2, 2, g // 2, 2).transpose(0, 2, 1, 3).ravel()


class AuxHead:
    """A linear probe on the vision tower's merged tokens (what the decoder receives), trained
    with the model to predict ``region_labels``: dense supervision that teaches the vision
    tower colors, shapes and columns in a few hundred steps instead of thousands. Dropped
    when saving."""

    def __init__(self, model, hidden: int):
        import torch

        self.linear = torch.nn.Linear(hidden, sum(AUX_CLASSES) + 1)
        vision_dim = model.config.vision_config.embed_dim
        self.patch_linear = torch.nn.Linear(vision_dim, 1 + len(S.SHAPES))
        self.features = None
        self.patch_features = None
        self.stats: dict[str, float] = defaultdict(float)
        model.model.visual.merger.register_forward_hook(self._keep)
        model.model.visual.blocks[-1].register_forward_hook(self._keep_patches)
        self._labels: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _keep(self, module, inputs, output):
        self.features = output

    def _keep_patches(self, module, inputs, output):
        self.patch_features = output[0] if isinstance(output, tuple) else output

    def parameters(self):
        return [*self.linear.parameters(), *self.patch_linear.parameters()]

    def loss(self, samples: list[S.Sample]):
        import torch
        import torch.nn.functional as F

        for s in samples:
            if s.seed not in self._labels:
                self._labels[s.seed] = (region_labels(s), patch_kinds(s))
        labels = torch.from_numpy(np.concatenate([self._labels[s.seed][0] for s in samples])).float().to(DEVICE)
        patch_labels = torch.from_numpy(np.concatenate([self._labels[s.seed][1] for s in samples])).to(DEVICE)
        if self.features is None or self.features.shape[0] != labels.shape[0]:
            raise AssertionError("auxiliary labels need 112x112 images (16 merged tokens each)")
        *logits, x = self.linear(self.features).split([*AUX_CLASSES, 1], dim=-1)
        patch_logits = self.patch_linear(self.patch_features)
        self.features = self.patch_features = None
        loss = sum(F.cross_entropy(lg, labels[:, i].long()) for i, lg in enumerate(logits))
        loss = loss + F.cross_entropy(patch_logits, patch_labels)
        covered = ~torch.isnan(labels[:, -1])
        with torch.no_grad():
            for name, i in (("kind", 0), ("color", 1), ("column", 2)):
                self.stats[name] += float((logits[i].argmax(-1) == labels[:, i].long()).float().mean())
            if covered.any():
                self.stats["kind_fg"] += float((logits[0][covered].argmax(-1) == labels[covered, 0].long()).float().mean())
            fg = patch_labels > 0
            self.stats["patch_kind_fg"] += float((patch_logits[fg].argmax(-1) == patch_labels[fg]).float().mean())
        if covered.any():
            x_mse = F.mse_loss(x[covered, 0], labels[covered, -1])
            loss = loss + 4 * x_mse
            self.stats["x_rmse_px"] += float(x_mse.detach().sqrt()) * S.IMAGE_SIZE / 2
        self.stats["n"] += 1
        return loss / (len(AUX_CLASSES) + 2)

    def report(self) -> str:
        n = max(self.stats.pop("n", 0), 1)
        text = " ".join(f"{k}={v / n:.3f}" for k, v in self.stats.items())
        self.stats = defaultdict(float)
        return text


class WordAuxHead:
    """A linear probe on a middle decoder layer at every shape word of the text (" circle" in
    "What color is the circle?"), trained to predict that shape's color and center x: dense
    supervision for the decoder's step from a word to the image tokens it names. Dropped
    when saving."""

    def __init__(self, model, tokenizer, hidden: int, layer: int):
        import torch

        self.linear = torch.nn.Linear(hidden, len(S.COLORS) + 1)
        self.word_ids = {tokenizer.convert_tokens_to_ids("\u0120" + k): k for k in S.SHAPES}
        self.color_ids = {tokenizer.convert_tokens_to_ids("\u0120" + c) for c in S.COLORS}
        for t in [*self.word_ids, *self.color_ids]:
            assert isinstance(t, int) and t >= 0, "shape and color words must be single tokens"
        self.hidden = None
        self.stats: dict[str, float] = defaultdict(float)
        model.model.language_model.layers[layer - 1].register_forward_hook(self._keep)

    def _keep(self, module, inputs, output):
        self.hidden = output[0] if isinstance(output, tuple) else output

    def parameters(self):
        return self.linear.parameters()

    def loss(self, samples: list[S.Sample], ids):
        import torch
        import torch.nn.functional as F

        rows, cols, colors, xs = [], [], [], []
        color_index = {c: i for i, c in enumerate(S.COLORS)}
        for b, s in enumerate(samples):
            by_kind = {sh.kind: sh for sh in s.shapes}
            row = ids[b].tolist()
            for t, tok in enumerate(row):
                kind = self.word_ids.get(tok)
                if kind is not None and kind in by_kind:
                    rows.append(b)
                    cols.append(t)
                    # the color only where the text does not say it ("the red circle")
                    colors.append(-100 if row[t - 1] in self.color_ids else color_index[by_kind[kind].color])
                    xs.append(2 * by_kind[kind].cx / S.IMAGE_SIZE - 1)
        hidden, self.hidden = self.hidden, None
        if not rows:
            return torch.zeros(())
        out = self.linear(hidden[torch.tensor(rows), torch.tensor(cols)])
        colors_t = torch.tensor(colors)
        asked = colors_t >= 0
        color_loss = F.cross_entropy(out[:, :-1], colors_t, ignore_index=-100) if asked.any() else 0.0
        x_mse = F.mse_loss(out[:, -1], torch.tensor(xs).float())
        with torch.no_grad():
            if asked.any():
                self.stats["color"] += float((out[asked, :-1].argmax(-1) == colors_t[asked]).float().mean())
            self.stats["x_rmse_px"] += float(x_mse.sqrt()) * S.IMAGE_SIZE / 2
            self.stats["n"] += 1
        return (color_loss + 4 * x_mse) / 2

    report = AuxHead.report


def epoch_batches(samples: list[S.Sample], batch_size: int, rng: random.Random) -> list[list[int]]:
    """One epoch of batches (popped from the end), each of images with the same number of
    questions, so packed rows have about the same length and padding costs little."""
    buckets: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        buckets[len(s.qas)].append(i)
    batches = []
    for key in sorted(buckets):
        idx = buckets[key]
        rng.shuffle(idx)
        batches += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]
    rng.shuffle(batches)
    return batches


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "numpy": np.__version__}


def _check_answer_tokenization(processor) -> None:
    """Prompt ids + answer ids must equal the ids of the rendered conversation (what
    transformers' chat template produces for a full exchange), so training sees what
    inference sees."""
    tok = processor.tokenizer
    for seed in S.split_seeds("train", 20):
        _, qas = S.make_example(seed)
        for q, a in qas:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                    {"role": "assistant", "content": a}]
            full = tok(processor.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
            parts = tok(prompt_text(processor, q), add_special_tokens=False)["input_ids"] + \
                tok(a, add_special_tokens=False)["input_ids"]
            if full[:len(parts)] != parts:
                raise AssertionError(f"prompt + answer tokenization differs from the conversation's for {q!r} -> {a!r}")


# ----------------------------------------------------------------------------- evaluation + card


def evaluate_folder(out: Path, args: argparse.Namespace) -> None:
    import torch
    torch.set_num_threads(args.threads)
    record = json.loads((out / "training.json").read_text())
    record["transformers_validation"] = transformers_accuracy(out, "validation", args.val_images)
    record["transformers_test"] = transformers_accuracy(out, "test", args.test_images)
    if not args.skip_vlmc:
        record["vlmc_test"] = vlmc_accuracy(out, "test", args.test_images)
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(model_card(out, record))
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"folder {out}: {size / 1e6:.2f} MB")


def _acc_table(record: dict) -> str:
    cols = [("transformers (validation)", record.get("transformers_validation")),
            ("transformers (test)", record.get("transformers_test")),
            ("vlmc float32 (test)", record.get("vlmc_test"))]
    cols = [(n, r) for n, r in cols if r]
    head = "| question kind | " + " | ".join(n for n, _ in cols) + " |\n"
    head += "|---|" + "---:|" * len(cols) + "\n"
    rows = []
    for k in S.KINDS:
        cells = [f"{100 * r['per_kind'][k]['accuracy']:.2f}% ({r['per_kind'][k]['n']})" for _, r in cols]
        rows.append(f"| {k} | " + " | ".join(cells) + " |")
    rows.append("| **all** | " + " | ".join(f"**{100 * r['accuracy']:.2f}%** ({r['n']})" for _, r in cols) + " |")
    return head + "\n".join(rows) + "\n"


def model_card(out: Path, r: dict) -> str:
    cfg = json.loads((out / "config.json").read_text())
    text, vision = cfg.get("text_config", cfg), cfg["vision_config"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.name != "README.md")
    h = r["hyperparameters"]
    d = r["data"]
    return f"""# vlmc demo model: a tiny Qwen2-VL for synthetic shapes

A {r['model']['params'] / 1e6:.2f}M-parameter `Qwen2VLForConditionalGeneration` trained from scratch to answer
five kinds of questions about synthetic images of shapes (`vlmc/demo/shapes.py`). It ships
inside the vlmc package ({size / 1e6:.1f} MB, {r['model']['dtype']} weights) so `vlmc run` can show a real,
checkable answer about an image on a machine with no network:

```bash
vlmc run vlmc/demo/model --image examples/shapes-1.png --prompt "What color is the circle?"
```

It is an ordinary Hugging Face checkpoint: transformers loads it with
`Qwen2VLForConditionalGeneration.from_pretrained` (build the processor from
`Qwen2VLImageProcessor` + the tokenizer; see `benchmarks/train_demo.py`).

## Task

Images are {S.IMAGE_SIZE}x{S.IMAGE_SIZE} RGB with one to three shapes of different kinds (circle, square,
triangle, star), each red, green, blue, yellow, purple or orange (jittered), of {S.MIN_SIZE}-{S.MAX_SIZE} px, not
overlapping, on light solid, gradient or noisy backgrounds. Questions and canonical answers:

| kind | question | answer |
|---|---|---|
| shape | What shape is in the image? (one shape) | `circle` |
| color | What color is the circle? | `red` |
| count | How many shapes are there? | `two` |
| position | Is the red circle left or right of the blue square? | `left` |
| describe | Describe the image. | `A red circle and a blue square.` (order: circle, square, triangle, star) |

Exact match after normalisation (lowercase, final period removed), greedy decoding.

## Accuracy

Test split: seeds {S.SPLIT_SEEDS['test'].start}..{S.SPLIT_SEEDS['test'].start + d['test_images'] - 1} ({d['test_images']} images, every question of each);
validation: seeds {S.SPLIT_SEEDS['validation'].start}..{S.SPLIT_SEEDS['validation'].start + d['validation_images'] - 1}. Cells: exact match (questions).

{_acc_table(r)}
Re-measure with vlmc: `python -c "import vlmc; from vlmc.evaluate import evaluate; print(evaluate(vlmc.load('vlmc/demo/model')))"`.

## Architecture

- Vision: Qwen2-VL ViT, patch 14, temporal patch 2, embed dim {vision['embed_dim']}, depth {vision['depth']},
  {vision['num_heads']} heads, MLP ratio {vision['mlp_ratio']}, 2x2 patch merger to {vision['hidden_size']}. A {S.IMAGE_SIZE}x{S.IMAGE_SIZE} image
  is 8x8 patches = 16 image tokens.
- Text: Qwen2 decoder, hidden {text['hidden_size']}, {text['num_hidden_layers']} layers, {text['num_attention_heads']} heads / {text['num_key_value_heads']} KV heads,
  MLP {text['intermediate_size']}, M-RoPE sections {text.get('rope_parameters', {}).get('mrope_section')}, untied LM head, vocab {text['vocab_size']}.
- Tokenizer: byte-level BPE ({r['model']['tokenizer_size']} tokens) trained on the task's text, with the Qwen-VL special
  tokens; Qwen chat template without a default system message; EOS `<|im_end|>`.
- Processor: `min_pixels = max_pixels = {PIXELS}`, so any image is resized to about {S.IMAGE_SIZE}x{S.IMAGE_SIZE}.

## Training

`{r['command']}` ({_fmt_time(r['wall_time_seconds']['total_until_saved'])} wall time on {r['machine']['cpu_count']} CPU cores,
{r['machine']['torch_threads']} torch threads, torch {r['versions']['torch']}, transformers {r['versions']['transformers']}: vision pretraining
{_fmt_time(r['wall_time_seconds'].get('vision_pretraining', 0))}, training loop {_fmt_time(r['wall_time_seconds']['training_loop'])}, the rest data generation and checks).

- Seed {r['seed']}; {d['train_images']} training images (seeds {d['train_seed_range'][0]}..{d['train_seed_range'][1] - 1}), {d['train_pairs']} (image, question)
  pairs; {h['steps']} AdamW steps of {h['batch_size']} images with all their questions
  ({r['questions_seen']} (image, question) pairs seen, {r['epochs']} epochs), lr {h['lr']}
  (warmup {h['warmup']}, cosine to {h['min_lr_ratio']}x), weight decay {h['weight_decay']}, grad clip 1.0.
- Phase 1, the vision tower alone: {h.get('vision_steps', 0)} AdamW steps of {h['batch_size']} images at lr {h.get('vision_lr')}, on
  auxiliary region labels from the generator (per merged image token: the kind and color of the
  shape covering it, its column, the shape's center x; per patch: the kind). Learning shapes
  through the answers alone was slow (teacher-forced validation stayed under 81% after 1500
  steps without this phase); with it the tower's kind probe reaches 99% first.
- Phase 2, everything: cross-entropy on the answer tokens and `<|im_end|>`, plus the same
  auxiliary loss and a probe on decoder layer {h.get('word_aux_layer')} (the color and x of the shape a shape word
  names), weights {h.get('aux_weight')} and {h.get('word_aux_weight')}, decaying linearly to 0. The probes are training-only:
  they are not part of the checkpoint.
- No image (hence no image+question pair) of one split occurs in another: checked by hashing
  every image of the three splits before training.
- `training.json` holds every number here, the validation curve and the exact versions.

## Limits

- It knows only this synthetic task: these five question templates, these four shapes and six
  colors, one to three shapes on light backgrounds. Photographs, other wordings, other
  shapes or colors, overlapping or duplicated shapes get confident nonsense.
- It never saw a system message, several images or several turns.
- It is a demonstration and a quality benchmark for vlmc's optimizations (quantization, KV
  layouts), not a useful vision model.
"""


def _fmt_time(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--val-images", type=int, default=300)
    p.add_argument("--test-images", type=int, default=S.TEST_IMAGES)
    p.add_argument("--monitor-images", type=int, default=100, help="validation images checked during training")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32, help="images per step (each with all its questions)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--vision-steps", type=int, default=1000, help="phase 1: vision-tower-only steps on the aux labels")
    p.add_argument("--vision-lr", type=float, default=3e-3)
    p.add_argument("--aux-weight", type=float, default=1.0, help="auxiliary vision loss weight at step 0")
    p.add_argument("--aux-steps", type=int, default=None, help="steps over which it decays to 0 (default: all)")
    p.add_argument("--word-aux-weight", type=float, default=2.0, help="decoder shape-word probe loss weight")
    p.add_argument("--word-aux-layer", type=int, default=2, help="decoder layer whose output it probes")
    p.add_argument("--vocab", type=int, default=400, help="BPE vocabulary before special tokens")
    p.add_argument("--text-hidden", type=int, default=192)
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument("--text-heads", type=int, default=4)
    p.add_argument("--text-kv-heads", type=int, default=2)
    p.add_argument("--text-intermediate", type=int, default=512)
    p.add_argument("--vision-dim", type=int, default=128)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-heads", type=int, default=4)
    p.add_argument("--vision-mlp-ratio", type=int, default=4)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="torch device for training (the shipped model: cpu)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--skip-eval", action="store_true", help="stop after saving (no greedy evaluation)")
    p.add_argument("--skip-vlmc", action="store_true", help="evaluate with transformers only")
    p.add_argument("--evaluate-only", action="store_true", help="evaluate --out and rewrite its card")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE != "cpu":
        import torch
        torch.set_default_device(DEVICE)
    if args.aux_steps is None:
        args.aux_steps = args.steps
    if args.evaluate_only:
        evaluate_folder(Path(args.out), args)
    else:
        train(args)


if __name__ == "__main__":
    main()
