"""Gemma 4 assistant checkpoints (transformers' Gemma4AssistantForCausalLM) -> IR.

The assistant is a Gemma 4 decoder whose every layer is KV-shared: it computes no keys or
values, and attends over the target's caches (its sliding-window layers over the target's
last sliding-window layer's, its global layers over the target's last global layer's;
``common.gemma4.ASSISTANT_CACHES`` orders them). One ``draft`` step takes
[the target's embedding of the last token | a hidden state of the target's width] (the
target's final hidden state before the first step, the assistant's own projected one
after), at the last token's position, and returns the logits (``lm_head``, tied to the
assistant's embeddings, not soft-capped; with ``use_ordered_embeddings`` only the tokens of
the ``centroid_intermediate_top_k`` best centroids get theirs, ``ordered_logits``) and ``post_projection`` of its final hidden state,
the next step's hidden input. transformers' SinglePositionMultiTokenCandidateGenerator
drafts this way; the runtime's ``SharedKVDrafter`` does the same through ``meta
["drafter"]``.
"""
from __future__ import annotations

from typing import Any

from ...errors import UnsupportedModelError
from ...frontend.weights import Weights
from ...ir.builder import FunctionBuilder
from ...ir.core import COMPUTE, Program
from ..common.gemma4 import ASSISTANT_CACHES, FULL, SLIDING, decoder_blocks, gemma4_text
from ..common.layers import finish, hybrid_stack, linear


def build_program(raw: dict[str, Any], w: Weights, name: str) -> Program:
    text = dict(raw.get("text_config") or {})
    for key in ("hidden_size_per_layer_input", "vocab_size_per_layer_input"):
        if text.get(key):
            raise UnsupportedModelError(f"a Gemma 4 assistant has no per-layer inputs; text_config {key} is "
                                        f"{text[key]}")
    g = gemma4_text({**raw, "text_config": {**text, "hidden_size_per_layer_input": 0}}, nested=True, assistant=True)
    tc = g.tc
    h, v, hb = tc.hidden_size, tc.vocab_size, int(raw.get("backbone_hidden_size") or 1536)
    prog = Program(name=name)
    stack = decoder_blocks(prog, w, g)
    w.add("projector.pre_projection.weight", (h, 2 * hb), role="proj", part="projector")
    w.add("projector.post_projection.weight", (hb, h), role="proj", part="projector")
    w.add("text.embed_tokens.weight", (v, h), role="head", part="text")
    w.add("text.norm.weight", (h,), role="norm", part="text")
    head = "text.embed_tokens.weight" if tc.tie_word_embeddings else "lm_head.weight"
    if not tc.tie_word_embeddings:
        w.add("lm_head.weight", (v, h), role="head", part="text")

    fb = FunctionBuilder("draft", w.types(), doc=(
        "[target embedding of the last token | hidden state] at its position, over the target's caches -> "
        "(logits, the next step's hidden state)"))
    x = fb.input("x", ("B", "L", 2 * hb), COMPUTE)
    pos = fb.input("positions", ("B", "L"), "int32")
    mask = fb.input("mask", ("B", 1, "L", "S"), "bool")
    caches = fb.input("caches", (), "kvcache")
    x = linear(fb, x, "projector.pre_projection", bias=False)
    rope = [t for table, attrs in g.rope.items()
            for t in fb.op("rope_freqs", pos, n_out=2, name=f"rope_{table}", **attrs)]
    x = hybrid_stack(fb, x, rope, mask, caches, stack, tc.num_layers)
    x = fb.op("rms_norm", x, fb.param("text.norm.weight"), eps=tc.rms_norm_eps, name="hidden")
    if raw.get("use_ordered_embeddings"):  # logits of the best centroids' tokens only
        c = int(raw.get("num_centroids") or 2048)
        if v % c:
            raise UnsupportedModelError(f"Gemma 4 assistant: {v} tokens do not split over {c} centroids")
        w.add("projector.masked_embedding.centroids.weight", (c, h), role="proj", part="projector")
        w.add("projector.masked_embedding.token_ordering", (v,), role="proj", part="projector").dtype = "int32"
        fb.param_types.update(w.types())
        logits = fb.op("ordered_logits", x, fb.param("projector.masked_embedding.centroids.weight"),
                       fb.param("projector.masked_embedding.token_ordering"), fb.param(head),
                       top_k=int(raw.get("centroid_intermediate_top_k") or 32), name="logits")
    else:
        logits = fb.op("linear", x, fb.param(head), name="logits")
    prog.functions["draft"] = fb.output(logits, linear(fb, x, "projector.post_projection", bias=False))
    kinds = {lk.kind: lk for lk in g.kinds}
    prog.meta["inputs"] = {"position_streams": 1, "image_token_id": None, "tokens_per_image": 1}
    prog.meta["drafter"] = {
        "kind": "shared_kv", "entry": "draft", "hidden_size": hb, "caches": list(ASSISTANT_CACHES),
        "window": g.window if SLIDING in kinds else None,
        "cache_shapes": {k: [kinds[k].kv_heads, kinds[k].head_dim] for k in (SLIDING, FULL) if k in kinds}}
    return finish(prog, w, tc)
