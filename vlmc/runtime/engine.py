"""Generation over a loaded artifact: prompt building, vision, prefill, decode, streaming.

What is particular to a model family (image preprocessing, placeholder expansion, rotary
positions, the vision tower's inputs, feature merging) comes from the family's ``Inputs``
(``vlmc.models``); stepping the program goes through ``step.Sequences``, as the batching
loop's does. A single request is a batch of one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import mlx.core as mx
import numpy as np

from ..errors import ContextLengthError, InputError
from ..models import family
from ..models.common.image_processing import ProcessedImages
from .artifact import Artifact
from .chat import normalize_messages, render_chat
from .detokenizer import StopStringMatcher, StreamingDetokenizer
from .images import load_image
from .video import Video, VideoLimits, VideoRef, load_video
from .sampling import Sampler, SamplingParams, checkpoint_defaults, resolve_sampling
from .speculative import Drafter, Speculation, decide, make_drafter
from .step import Decoder, PromptInputs, Sequences
from .tokenizer import Tokenizer, find_chat_template


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

    def __init__(self, artifact: Artifact, *, generation_config: str = "auto"):
        """``generation_config``: "auto" takes the checkpoint's generation_config.json
        sampling defaults for every field a call leaves unset; "vlmc" ignores them."""
        self.artifact = artifact
        self.model = artifact.model
        self.meta = artifact.meta
        self.tokenizer = Tokenizer.from_dir(artifact.path)
        self.chat_template = find_chat_template(artifact.path)
        self.inputs = family(self.meta["model_type"]).inputs(self.meta, artifact.processor_spec, self.tokenizer)
        self.eos_ids = set(artifact.generation.get("eos_token_ids") or []) | set(self.tokenizer.eos_token_ids)
        self.speculation: Speculation | None = None   # the default for calls that do not say (vlmc.load(draft=...))
        self.sampling_defaults = checkpoint_defaults(artifact.generation.get("defaults") or {})
        self.generation_config = generation_config
        self.sampling_params()  # a bad mode or checkpoint default is an error at load, not mid-request
        self.max_context = int(self.meta["text"]["max_position_embeddings"])
        self.image_token_id = self.inputs.image_token_id
        self.placeholder_ids = self.inputs.placeholder_ids   # image and video placeholder ids
        self.kv_layers = artifact.kv_layers
        self.kv_plan = self.meta.get("kv_plan", {})
        text = self.meta["text"]
        self.decoder = Decoder(self.model, self.kv_layers, int(text["num_kv_heads"]), int(text["head_dim"]),
                               self.inputs.position_streams)

    def sampling_params(self, *, base: dict[str, Any] | None = None, **given: Any) -> SamplingParams:
        """The sampler settings for a call: what it sets (None = unset), else the
        checkpoint's defaults (unless generation_config="vlmc"), else ``base``, else greedy."""
        return resolve_sampling(given, self.sampling_defaults, base=base, mode=self.generation_config)

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

    # ------------------------------------------------------------------ prompt building
    def build_prompt(self, prompt: str | None = None, *, images: Sequence[Any] | None = None,
                     messages: list[dict[str, Any]] | None = None, system: str | None = None,
                     image_limits: dict[str, Any] | None = None,
                     template_vars: dict[str, Any] | None = None, loaded_images: Sequence[Any] | None = None,
                     videos: Sequence[Any] | None = None, video_limits: VideoLimits | None = None) -> Prompt:
        """Render the chat template and expand each image/video placeholder to its token count.

        Either ``prompt`` (+ ``images`` and ``videos``, placed before the text in that order,
        + ``system``) or full OpenAI-style ``messages``; images and videos in messages are
        used in order of appearance, and ``images`` / ``videos`` fill parts that carry no
        reference. ``images`` may hold ``VideoRef``s too, to interleave the two in order.
        A video is a path, URL, data URI, bytes, a decoded ``Video`` or a ``VideoRef`` (with
        its fps / max_frames / num_frames). Nothing given is ignored.
        ``template_vars`` (tools, enable_thinking, ...) reach the chat template.
        ``loaded_images``: when given, the already-loaded images and decoded videos for the
        references (a server loads them itself, under its own media policy), in the same order.
        """
        images = list(images or []) + [v if isinstance(v, VideoRef) else VideoRef(v) for v in (videos or [])]
        if messages is None:
            if prompt is None:
                raise InputError("give a prompt or messages")
            content: list[dict[str, Any]] = [{"type": "video" if isinstance(r, VideoRef) else "image"}
                                             for r in images]
            content.append({"type": "text", "text": prompt})
            messages = ([{"role": "system", "content": system}] if system else []) + \
                [{"role": "user", "content": content}]
            refs: list[Any] = list(images)
            tmpl_messages, _ = normalize_messages(messages, require_image_refs=False)
        else:
            if prompt is not None or system is not None:
                raise InputError("give either messages or prompt/system, not both")
            tmpl_messages, refs = normalize_messages(messages, require_image_refs=False)
            extra_images = iter([r for r in images if not isinstance(r, VideoRef)])
            extra_videos = iter([r for r in images if isinstance(r, VideoRef)])
            filled = []
            for r in refs:
                if isinstance(r, VideoRef) and r.source is None:
                    given = next(extra_videos, None)
                    r = None if given is None else VideoRef(given.source, r.fps if r.fps is not None else given.fps,
                                                            r.max_frames or given.max_frames,
                                                            r.num_frames or given.num_frames)
                elif r is None:
                    r = next(extra_images, None)
                if r is None:
                    raise InputError("an image or video part in the messages has no source and none was left to "
                                     "fill it")
                filled.append(r)
            refs = filled
            leftover = list(extra_images) + list(extra_videos)
            if leftover:
                raise InputError(f"{len(leftover)} image(s) or video(s) given that no image or video part of the messages uses")
        if refs and self.image_token_id is None:
            raise InputError("this model takes no images")
        if any(isinstance(r, VideoRef) for r in refs) and self.inputs.video_processor is None:
            raise InputError("this model takes no videos")
        text = self.inputs.prompt_text(tmpl_messages, self.tokenizer)  # a family's own format, if it has one
        if text is None:
            if self.chat_template is None:
                raise InputError("this model ships no chat template; send a raw prompt to /v1/completions instead")
            text = render_chat(self.chat_template, tmpl_messages, add_generation_prompt=True,
                               bos_token=self.tokenizer.bos_token, eos_token=self.tokenizer.eos_token,
                               **(template_vars or {}))
        ids = self.encode_prompt(text)
        processed = None
        if loaded_images is not None and len(loaded_images) != len(refs):
            raise ValueError(f"{len(loaded_images)} loaded image(s) for {len(refs)} reference(s)")
        if refs:
            media = list(loaded_images) if loaded_images is not None else \
                [self.load_video(r, video_limits) if isinstance(r, VideoRef) else load_image(r, **(image_limits or {}))
                 for r in refs]
            processed = self.inputs.preprocess_media(media)
        return Prompt(self.inputs.expand(ids, processed), processed, text)

    def load_video(self, ref: VideoRef, limits: VideoLimits | None = None) -> Video:
        """Decode the frames of ``ref`` this model's video processor samples."""
        if isinstance(ref.source, Video):
            return ref.source
        sampler = self.inputs.video_sampler(ref.fps, ref.max_frames, ref.num_frames)
        return load_video(ref.source, sampler, limits)

    def encode_prompt(self, text: str) -> list[int]:
        """A rendered prompt's ids as transformers' processors make them: with what the
        tokenizer's post-processor adds (e.g. a Llama tokenizer's BOS), unless the prompt
        already starts with the BOS text (a template that writes it)."""
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    # ------------------------------------------------------------------ model stages
    def encode_images(self, processed: ProcessedImages) -> mx.array:
        """Vision tower + projector: one feature row per image token, all images in order."""
        return self.model.vision_encode(**self.inputs.vision_inputs(processed))

    def prompt_inputs(self, p: Prompt, features: mx.array | None = None) -> PromptInputs:
        """The prompt's embeddings with image features merged in and its positions;
        ``features`` are the images' encodings when the caller already has them (the vision
        feature cache)."""
        ids_row = mx.array([p.ids], dtype=mx.int32)
        emb = self.model.embed(ids=ids_row)
        if p.images is not None:
            if features is None:
                features = self.encode_images(p.images)
            emb = self.inputs.merge(emb, ids_row, features)
        pos, delta = self.inputs.positions(p.ids, p.images)
        return PromptInputs(emb, pos, delta, self.inputs.attention_spans(p.ids, p.images))

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
        seqs = Sequences.start(self.decoder, [self.prompt_inputs(p) for p in prompts])
        logits = seqs.prefill()
        history = [list(p.ids) for p in prompts]
        penalty = sampler.params.repetition_penalty != 1.0
        tokens = sampler(logits, history if penalty else None)
        mx.eval(tokens, logits)
        if stats is not None:
            stats["prompt_time"] = time.perf_counter() - t0
            stats["prompt_tokens"] = sum(len(p.ids) for p in prompts)
        steps = 0
        budget = min(max_tokens, self.max_context - seqs.prompt_width)
        t1 = time.perf_counter()
        while True:
            yield tokens, logits
            steps += 1
            if stats is not None:
                stats["decode_time"] = time.perf_counter() - t1
                stats["generation_tokens"] = steps
            if steps >= budget:
                return
            if penalty:
                for h, t in zip(history, tokens.tolist()):
                    h.append(t)
            logits = seqs.decode(tokens)
            tokens = sampler(logits, history if penalty else None)
            mx.eval(tokens, logits)

    def speculation_for(self, draft: Any = None, num_draft_tokens: int | None = None) -> Speculation | None:
        """What a call speculates with: ``draft`` is "prompt-lookup", a loaded model (a draft
        model with a compatible tokenizer), a Drafter, False (no speculation) or None (the
        model's default, ``self.speculation``)."""
        if draft is False:
            return None
        if draft is None:
            if self.speculation is None or num_draft_tokens is None:
                return self.speculation
            return Speculation(self.speculation.drafter, num_draft_tokens, self.speculation.adaptive)
        if isinstance(draft, str) and draft != "prompt-lookup":
            raise InputError(f"draft must be 'prompt-lookup' or a loaded draft model, got {draft!r}")
        drafter = draft if isinstance(draft, Drafter) else \
            make_drafter(self, draft=None if isinstance(draft, str) else draft, prompt_lookup=isinstance(draft, str))
        return Speculation(drafter, num_draft_tokens or 4)

    def speculative_steps(self, prompt: Prompt, sampler: Sampler, max_tokens: int, speculation: Speculation,
                          stats: dict[str, Any] | None = None) -> Iterator[tuple[mx.array, mx.array]]:
        """``generate_steps`` for one sequence, speculating: each step verifies a draft in
        one pass and yields the tokens it decided, one (tokens [1], logits [1, V]) at a time,
        the same tokens (greedy) or the same distribution (sampling) as without speculation."""
        self.check_length([prompt])
        t0 = time.perf_counter()
        seqs = Sequences.start(self.decoder, [self.prompt_inputs(prompt)])
        logits = seqs.prefill()
        params = sampler.params
        penalty = params.repetition_penalty != 1.0
        rng = np.random.default_rng(params.seed)
        context = list(prompt.ids)
        drafter, length, cost = speculation.drafter, speculation.length(), speculation.cost()
        state = drafter.start(prompt.ids, prompt, seqs)
        token, _ = decide(sampler.process(logits, [context] if penalty else None)[0], None, None,
                          greedy=params.greedy, rng=rng)
        if stats is not None:
            stats.update(prompt_time=time.perf_counter() - t0, prompt_tokens=len(prompt.ids), draft_proposed=0,
                         draft_accepted=0, verify_steps=0, decode_steps=0)
        budget = min(max_tokens, self.max_context - len(prompt.ids))
        produced = 1
        context.append(token)
        t1 = time.perf_counter()
        yield mx.array([token], dtype=mx.int32), logits
        while produced < budget:
            k = min(length.next(lambda k: cost.ratio(k + 1, 1)), budget - produced - 1,
                    self.max_context - len(context) - 1)
            draft = drafter.propose(state, context, k, sampler, rng) if k > 0 else None
            tokens = draft.tokens[:k] if draft is not None else []
            t_step = time.perf_counter()
            if tokens:
                rows = seqs.verify(mx.array([[context[-1], *tokens]], dtype=mx.int32))[0]
            else:
                rows = seqs.decode(mx.array([context[-1]], dtype=mx.int32))
            mx.eval(rows)
            cost.observe(len(tokens) + 1, time.perf_counter() - t_step)
            accepted = 0
            for i in range(len(tokens) + 1):
                candidate = tokens[i] if i < len(tokens) else None
                q = draft.q[i] if candidate is not None and draft.q is not None else None
                processed = sampler.process(rows[i:i + 1], [context] if penalty else None)[0]
                token, ok = decide(processed, candidate, q, greedy=params.greedy, rng=rng)
                context.append(token)
                produced += 1
                if stats is not None:
                    stats["decode_time"] = time.perf_counter() - t1
                    stats["generation_tokens"] = produced
                yield mx.array([token], dtype=mx.int32), rows[i:i + 1]
                if not ok or produced >= budget:
                    break
                accepted += 1
            if tokens:
                seqs.trim(len(tokens) - accepted)  # the cache keeps the tokens before the last decided one
                length.update(len(tokens), accepted)
            drafter.accepted(state, context[:-1])
            if stats is not None:
                key = "verify_steps" if tokens else "decode_steps"
                stats[key] += 1
                stats["draft_proposed"] += len(tokens)
                stats["draft_accepted"] += accepted

    # ------------------------------------------------------------------ user API
    def stream_generate(self, prompt: str | None = None, *, images: Sequence[Any] | None = None,
                        videos: Sequence[Any] | None = None, messages: list[dict[str, Any]] | None = None, system: str | None = None,
                        max_tokens: int = 256, stop: Sequence[str] | None = None,
                        sampling: SamplingParams | None = None, draft: Any = None,
                        num_draft_tokens: int | None = None, **sampling_kw: Any) -> Iterator[StreamChunk]:
        """Yield one chunk per generated token with the text that became final (never a split
        multi-byte character; empty while text is held back), then a last chunk with no token
        that carries the remaining text, finish_reason and the stats (tokens, tok/s, memory;
        with speculation, drafted and accepted tokens). ``draft``: see ``speculation_for``."""
        if max_tokens < 1:
            raise InputError(f"max_tokens must be >= 1, got {max_tokens}")
        params = sampling or self.sampling_params(**sampling_kw)
        speculation = self.speculation_for(draft, num_draft_tokens)
        p = self.build_prompt(prompt, images=images, videos=videos, messages=messages, system=system)
        detok = StreamingDetokenizer(self.tokenizer, skip_special_tokens=True)
        stops = StopStringMatcher(stop)
        stats: dict[str, Any] = {}
        mx.reset_peak_memory()
        finish = "length"
        tokens_out: list[int] = []
        steps = self.generate_steps([p], Sampler(params), max_tokens, stats) if speculation is None else \
            self.speculative_steps(p, Sampler(params), max_tokens, speculation, stats)
        for tokens, _ in steps:
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

    @staticmethod
    def _stats(stats: dict[str, Any], n_tokens: int) -> dict[str, Any]:
        pt, dt = stats.get("prompt_time", 0.0), stats.get("decode_time", 0.0)
        decode_steps = max(stats.get("generation_tokens", 1) - 1, 0)
        out = {"prompt_tokens": stats.get("prompt_tokens", 0), "generation_tokens": n_tokens,
               "prompt_tps": stats.get("prompt_tokens", 0) / pt if pt else 0.0,
               "generation_tps": decode_steps / dt if dt else 0.0,
               "peak_memory_gb": mx.get_peak_memory() / 1e9}
        if "draft_proposed" in stats:
            steps = stats["verify_steps"] + stats["decode_steps"]
            out.update(draft_proposed=stats["draft_proposed"], draft_accepted=stats["draft_accepted"],
                       acceptance=stats["draft_accepted"] / stats["draft_proposed"] if stats["draft_proposed"] else 0.0,
                       tokens_per_step=decode_steps / steps if steps else 0.0)
        return out
