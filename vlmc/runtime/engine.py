"""Generation over a loaded artifact: prompt building, vision, prefill, decode, streaming.

The loop is written for a batch of sequences from the start: prompts are left-padded,
each sequence keeps its own positions, M-RoPE delta and start offset (arrays the mask
reads), so continuous batching can reuse it. A single request is a batch of one.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .. import kvplan
from ..errors import ContextLengthError, InputError
from ..kernels.reference import merge_features
from .artifact import Artifact
from .chat import normalize_messages, render_chat
from .detokenizer import StopStringMatcher, StreamingDetokenizer
from .images import load_image
from .kv_cache import attention_mask, make_caches
from .positions import mrope_positions
from .preprocess import ProcessedImages, make_image_processor
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer, find_chat_template
from .vision_plan import plan_qwen_vision


@dataclass
class Prompt:
    """One request, ready for the model: expanded token ids and its preprocessed images."""

    ids: list[int]
    images: ProcessedImages | None = None
    text: str = ""


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str            # "stop" (EOS or stop string) | "length"
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    peak_memory_gb: float


@dataclass
class StreamChunk:
    text: str
    token: int | None
    finish_reason: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


class VLM:
    """A compiled vision-language model, ready to generate."""

    def __init__(self, artifact: Artifact, kv: dict[str, Any] | None = None):
        """``kv``: KV-plan options (``vlmc.kvplan.plan``: kv_bits, kv_quant_scheme,
        kv_group_size, max_kv_size, kv_memory_budget, context, quantize_last) that re-plan
        the artifact's caches; without them the compiled plan is used."""
        self.artifact = artifact
        self.model = artifact.model
        self.meta = artifact.meta
        self.tokenizer = Tokenizer.from_dir(artifact.path)
        self.chat_template = find_chat_template(artifact.path)
        self.processor = make_image_processor(artifact.processor_spec)
        self.eos_ids = set(artifact.generation.get("eos_token_ids") or []) | set(self.tokenizer.eos_token_ids)
        self.max_context = int(self.meta["text"]["max_position_embeddings"])
        self.image_token_id = self.meta.get("image_token_id")
        self.kv_layers, self.kv_plan = self._kv_plan(kv)

    def materialize(self) -> None:
        """Read every weight now. MLX ties an unevaluated array to the thread that made it,
        so a model that another thread (a server's generation loop) runs must be loaded here."""
        arrays = []
        for value in self.model.params.values():
            if isinstance(value, mx.array):
                arrays.append(value)
            else:  # QuantWeight
                arrays.extend(a for a in (value.weight, value.scales, value.biases) if a is not None)
        mx.eval(arrays)

    def _kv_plan(self, kv: dict[str, Any] | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        text = self.meta["text"]
        layers = (self.artifact.manifest.get("kv_plan") or {}).get("text_layer") or \
            [{"index": i, "kv": "dense"} for i in range(text["num_layers"])]
        if not kv:
            return layers, self.meta.get("kv_plan", {})
        specs, summary, _ = kvplan.plan(layers, kv_heads=text["num_kv_heads"], head_dim=text["head_dim"],
                                        compute=self.meta.get("compute_dtype", "float32"),
                                        max_context=self.max_context, **kv)
        return [{**layer, "kv": spec} for layer, spec in zip(layers, specs)], summary

    # ------------------------------------------------------------------ prompt building
    def build_prompt(self, prompt: str | None = None, *, images: Sequence[Any] | None = None,
                     messages: list[dict[str, Any]] | None = None, system: str | None = None,
                     image_limits: dict[str, Any] | None = None,
                     template_vars: dict[str, Any] | None = None, loaded_images: Sequence[Any] | None = None) -> Prompt:
        """Render the chat template and expand each image placeholder to its token count.

        Either ``prompt`` (+ ``images``, placed before the text, + ``system``) or full
        OpenAI-style ``messages``; images in messages are used in order of appearance, and
        ``images`` fill image parts that carry no reference. Nothing given is ignored.
        ``template_vars`` (tools, enable_thinking, ...) reach the chat template.
        ``loaded_images``: when given, the already-decoded PIL images for the references
        (a server loads them itself, under its own media policy), in the same order.
        """
        images = list(images or [])
        if messages is None:
            if prompt is None:
                raise InputError("give a prompt or messages")
            content: list[dict[str, Any]] = [{"type": "image"} for _ in images]
            content.append({"type": "text", "text": prompt})
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": content}]
            refs: list[Any] = list(images)
            tmpl_messages, _ = normalize_messages(messages, require_image_refs=False)
        else:
            if prompt is not None or system is not None:
                raise InputError("give either messages or prompt/system, not both")
            tmpl_messages, refs = normalize_messages(messages, require_image_refs=False)
            extra = iter(images)
            refs = [r if r is not None else next(extra, None) for r in refs]
            if any(r is None for r in refs):
                raise InputError("an image part in the messages has no image and no images were left to fill it")
            leftover = list(extra)
            if leftover:
                raise InputError(f"{len(leftover)} image(s) given that no image part in the messages uses")
        if refs and self.image_token_id is None:
            raise InputError("this model takes no images")
        if self.chat_template is None:
            raise InputError("this model ships no chat template; pass a raw prompt with generate_ids()")
        text = render_chat(self.chat_template, tmpl_messages, add_generation_prompt=True,
                           bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
                           **(template_vars or {}))
        ids = self.tokenizer.encode(text)
        processed = None
        if loaded_images is not None and len(loaded_images) != len(refs):
            raise ValueError(f"{len(loaded_images)} loaded image(s) for {len(refs)} reference(s)")
        if refs:
            pil = list(loaded_images) if loaded_images is not None else \
                [load_image(r, **(image_limits or {})) for r in refs]
            processed = self.processor.process(pil)
        return Prompt(self._expand(ids, processed), processed, text)

    def _expand(self, ids: list[int], processed: ProcessedImages | None) -> list[int]:
        tok = self.image_token_id
        n_slots = sum(1 for i in ids if i == tok) if tok is not None else 0
        n_images = 0 if processed is None else len(processed.num_tokens)
        if n_slots != n_images:
            raise InputError(f"the prompt has {n_slots} image placeholder(s) but {n_images} image(s) were given")
        if not n_images:
            return ids
        out: list[int] = []
        k = 0
        for i in ids:
            if i == tok:
                out.extend([tok] * processed.num_tokens[k])
                k += 1
            else:
                out.append(i)
        return out

    # ------------------------------------------------------------------ model stages
    def encode_images(self, processed: ProcessedImages) -> mx.array:
        """Vision tower + projector: one feature row per image token, all images in order."""
        vision = self.meta["vision"]
        pixels = mx.array(processed.pixel_values)
        if vision["plan"] == "fixed":
            return self.model.vision_encode(pixels=pixels)
        plan = plan_qwen_vision(processed.grid_thw, vision)
        return self.model.vision_encode(patches=pixels, **plan)

    def prompt_inputs(self, p: Prompt, features: mx.array | None = None) -> tuple[mx.array, np.ndarray, int]:
        """(embeddings [1, L, D] with image features merged in, positions [3, L] or [1, L],
        M-RoPE delta) for one prompt; ``features`` are the images' encodings when the caller
        already has them (the vision feature cache)."""
        ids_row = mx.array([p.ids], dtype=mx.int32)
        emb = self.model.embed(ids=ids_row)
        if p.images is not None:
            if features is None:
                features = self.encode_images(p.images)
            emb = merge_features(emb, ids_row, features, self.image_token_id)
        pos, delta = self._positions(p)
        return emb, pos, delta

    def _positions(self, prompt: Prompt) -> tuple[np.ndarray, int]:
        if self.meta["positions"] == "mrope":
            grids = [] if prompt.images is None else [tuple(g) for g in prompt.images.grid_thw.tolist()]
            return mrope_positions(prompt.ids, self.image_token_id, grids, self.meta["vision"]["merge_size"])
        return np.arange(len(prompt.ids))[None], 0

    def check_length(self, prompts: Sequence[Prompt]) -> None:
        for p in prompts:
            if not p.ids:
                raise InputError("the prompt is empty")
            if len(p.ids) >= self.max_context:
                raise ContextLengthError(f"the prompt is {len(p.ids)} tokens; the model's context is {self.max_context} "
                                 f"tokens (room is needed for at least one new token)")

    def generate_steps(self, prompts: Sequence[Prompt], sampler: Sampler, max_tokens: int,
                       stats: dict[str, Any] | None = None) -> Iterator[tuple[mx.array, mx.array]]:
        """Prefill a batch, then decode: yields (tokens [B], logits [B, V]) per step.
        The caller decides when to stop (it owns EOS/stop-string logic)."""
        self.check_length(prompts)
        t0 = time.perf_counter()
        B = len(prompts)
        lengths = [len(p.ids) for p in prompts]
        width = max(lengths)
        starts = mx.array([width - n for n in lengths], dtype=mx.int32)
        padded = min(lengths) < width
        rows, pos_rows, deltas = [], [], []
        for p in prompts:
            emb, pos, delta = self.prompt_inputs(p)
            pad = width - len(p.ids)
            if pad:
                emb = mx.concatenate([mx.zeros((1, pad, emb.shape[-1]), emb.dtype), emb], axis=1)
            rows.append(emb)
            pos_rows.append(np.pad(pos, [(0, 0), (pad, 0)]))
            deltas.append(delta)
        embeds = mx.concatenate(rows, axis=0)
        mrope = self.meta["positions"] == "mrope"
        positions = np.stack(pos_rows, axis=1 if mrope else 0)
        if not mrope:
            positions = positions[:, 0]
        text = self.meta["text"]
        caches = make_caches(self.kv_layers, B, text["num_kv_heads"], text["head_dim"], embeds.dtype)
        mask = attention_mask(starts, 0, width, padded)
        logits = self.model.prefill(embeds=embeds, positions=mx.array(positions, dtype=mx.int32), mask=mask,
                                    caches=caches)[:, -1]
        history = [list(p.ids) for p in prompts]
        tokens = sampler(logits, history if sampler.params.repetition_penalty != 1.0 else None)
        mx.eval(tokens, logits)
        if stats is not None:
            stats["prompt_time"] = time.perf_counter() - t0
            stats["prompt_tokens"] = sum(lengths)
        steps = 0
        budget = min(max_tokens, self.max_context - width)
        next_pos = np.array([n + d for n, d in zip(lengths, deltas)])
        t1 = time.perf_counter()
        while True:
            yield tokens, logits
            steps += 1
            if stats is not None:
                stats["decode_time"] = time.perf_counter() - t1
                stats["generation_tokens"] = steps
            if steps >= budget:
                return
            tok_list = tokens.tolist()
            for h, t in zip(history, tok_list):
                h.append(t)
            pos = next_pos + (steps - 1)
            pos_arr = np.broadcast_to(pos[None, :, None], (3, B, 1)) if mrope else pos[:, None]
            mask = attention_mask(starts, caches[0].offset, 1, padded)
            logits = self.model.decode(ids=tokens[:, None], positions=mx.array(pos_arr, dtype=mx.int32),
                                       mask=mask, caches=caches)[:, -1]
            tokens = sampler(logits, history if sampler.params.repetition_penalty != 1.0 else None)
            mx.eval(tokens, logits)

    # ------------------------------------------------------------------ user API
    def stream_generate(self, prompt: str | None = None, *, images: Sequence[Any] | None = None,
                        messages: list[dict[str, Any]] | None = None, system: str | None = None,
                        max_tokens: int = 256, stop: Sequence[str] | None = None,
                        sampling: SamplingParams | None = None, **sampling_kw: Any) -> Iterator[StreamChunk]:
        """Yield one chunk per generated token with the text that became final (never a split
        multi-byte character; empty while text is held back), then a last chunk with no token
        that carries the remaining text, finish_reason and the stats (tokens, tok/s, memory)."""
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        params = sampling or SamplingParams(**sampling_kw)
        p = self.build_prompt(prompt, images=images, messages=messages, system=system)
        detok = StreamingDetokenizer(self.tokenizer, skip_special_tokens=True)
        stops = StopStringMatcher(stop)
        stats: dict[str, Any] = {}
        mx.reset_peak_memory()
        finish = "length"
        tokens_out: list[int] = []
        for tokens, _ in self.generate_steps([p], Sampler(params), max_tokens, stats):
            tok = int(tokens[0].item())
            if tok in self.eos_ids:
                finish = "stop"
                break
            tokens_out.append(tok)
            piece = stops.feed(detok.add(tok))
            yield StreamChunk(piece.text, tok)  # one chunk per token; text may be empty (held back)
            if piece.stopped:
                finish = "stop"
                break
        tail = "" if stops.stopped else stops.feed(detok.flush()).text + stops.flush()
        yield StreamChunk(tail, None, finish, self._stats(stats, len(tokens_out)))

    def generate(self, prompt: str | None = None, **kw: Any) -> GenerationResult:
        text, ids, last = [], [], None
        for chunk in self.stream_generate(prompt, **kw):
            text.append(chunk.text)
            if chunk.token is not None:
                ids.append(chunk.token)
            last = chunk
        s = last.stats
        return GenerationResult("".join(text), ids, last.finish_reason, s["prompt_tokens"], s["generation_tokens"],
                                s["prompt_tps"], s["generation_tps"], s["peak_memory_gb"])

    def batch_generate(self, requests: Sequence[str | dict[str, Any]], *, max_tokens: int = 256,
                       max_batch: int = 8, stop: Sequence[str] | None = None,
                       sampling: SamplingParams | None = None, **sampling_kw: Any) -> list[GenerationResult]:
        """Generate replies to many requests at once through the continuous-batching loop
        (the server's): each request is a prompt string or a dict of ``build_prompt``
        arguments (``prompt``, ``images``, ``messages``, ``system``) plus optional
        ``max_tokens`` and ``stop``. Results come back in request order; tok/s are over
        the whole batch's time. Batched matmuls round differently from single ones, so a
        greedy reply can differ from ``generate``'s where two tokens are nearly tied."""
        from .batcher import Batcher, FinishEvent, Job  # the batcher builds on this module
        params = sampling or SamplingParams(**sampling_kw)
        jobs, texts, tokens, finishes = [], [], [], []
        done = threading.Event()
        left = [len(requests)]
        for i, req in enumerate(requests):
            req = {"prompt": req} if isinstance(req, str) else dict(req)
            limit = int(req.pop("max_tokens", max_tokens))
            stops = list(req.pop("stop", stop) or [])
            if limit < 1:
                raise InputError(f"request {i}: max_tokens must be >= 1, got {limit}")
            prompt = self.build_prompt(**req)
            texts.append([])
            tokens.append([])
            finishes.append(None)

            def emit(ev, i=i):
                if isinstance(ev, FinishEvent):
                    texts[i].append(ev.text)
                    finishes[i] = ev
                    left[0] -= 1
                    if not left[0]:
                        done.set()
                else:
                    texts[i].append(ev.text)
                    tokens[i].append(ev.token)
            jobs.append(Job(prompt, emit, params, limit, stops))
        if not jobs:
            return []
        batcher = Batcher(self, max_batch=max_batch, max_queue=len(jobs))
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        try:
            for job in jobs:
                batcher.submit(job)
            done.wait()
        finally:
            batcher.shutdown()
        seconds = time.perf_counter() - t0
        peak = mx.get_peak_memory() / 1e9
        out = []
        for i, f in enumerate(finishes):
            if f.reason == "error":
                raise RuntimeError(f"request {i} failed: {f.error}")
            out.append(GenerationResult("".join(texts[i]), tokens[i], f.reason, f.prompt_tokens, f.completion_tokens,
                                        f.prompt_tokens / seconds, f.completion_tokens / seconds, peak))
        return out

    @staticmethod
    def _stats(stats: dict[str, Any], n_tokens: int) -> dict[str, Any]:
        pt, dt = stats.get("prompt_time", 0.0), stats.get("decode_time", 0.0)
        decode_steps = max(stats.get("generation_tokens", 1) - 1, 0)
        return {"prompt_tokens": stats.get("prompt_tokens", 0), "generation_tokens": n_tokens,
                "prompt_tps": stats.get("prompt_tokens", 0) / pt if pt else 0.0,
                "generation_tps": decode_steps / dt if dt else 0.0,
                "peak_memory_gb": mx.get_peak_memory() / 1e9}
