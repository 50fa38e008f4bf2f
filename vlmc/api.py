"""The Python API: ``vlmc.load`` and ``vlmc.compile``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .options import KVOptions
from .errors import InputError
from .runtime.artifact import is_artifact, load_artifact, read_manifest, reject_unfinished
from .runtime.batcher import batch_generate
from .runtime.eagle3 import Eagle3Model
from .runtime.engine import VLM, GenerationResult
from .runtime.sampling import SamplingParams


class Model(VLM):
    """What ``vlmc.load`` returns: generation on one request (``generate``,
    ``stream_generate``) and on many through the continuous-batching loop."""

    def batch_generate(self, requests: Sequence[str | dict[str, Any]], *, max_tokens: int = 256,
                       max_batch: int = 8, stop: Sequence[str] | None = None,
                       sampling: SamplingParams | None = None, draft: Any = None,
                       num_draft_tokens: int | None = None, **sampling_kw: Any) -> list[GenerationResult]:
        """Replies to many requests at once, in request order (``runtime.batcher.batch_generate``)."""
        return batch_generate(self, requests, max_tokens=max_tokens, max_batch=max_batch, stop=stop,
                              sampling=sampling, draft=draft, num_draft_tokens=num_draft_tokens, **sampling_kw)


def load(src: str | os.PathLike, *, dtype: str = "float32", target: str | None = None,
         progress: bool = False, generation_config: str = "auto", draft: Any = None,
         num_draft_tokens: int = 4, **kv: Any) -> Model:
    """Load an artifact folder, or compile a checkpoint folder / hub id first (once: the
    artifact is cached by content, see ``vlmc.compiler.cache_dir``).

    KV-cache options (``vlmc.options.KVOptions``: ``kv_bits``, ``kv_quant_scheme``,
    ``kv_group_size``, ``max_kv_size``, ``kv_memory_budget``, ``kv_context``,
    ``kv_quantize_last``) are compiled into a checkpoint's artifact; for an artifact they
    re-plan its caches, which recompiles its plan and lowering (cached, weights shared).
    ``generation_config="auto"`` samples with the checkpoint's generation_config.json
    defaults where a call leaves a field unset; ``"vlmc"`` ignores them (greedy unless asked).
    ``draft`` switches speculative decoding on for every call that does not say otherwise:
    "prompt-lookup", or a draft model (a loaded model, or a source to load) whose tokenizer
    is the target's, drafting up to ``num_draft_tokens`` per step. An EAGLE-3 drafter makes
    the target load with text entry points that also return the hidden states it reads;
    loading an EAGLE-3 drafter alone gives an ``Eagle3Model`` to pass as ``draft``."""
    options = KVOptions.from_kwargs("load()", **kv)
    if draft is not None and not isinstance(draft, (VLM, Eagle3Model, str)) and not hasattr(draft, "propose"):
        raise TypeError(f"draft must be 'prompt-lookup', a model, a drafter or a source to load, not {type(draft).__name__}")
    if isinstance(draft, (str, os.PathLike)) and str(draft) != "prompt-lookup":
        draft = load(draft, dtype=dtype, target=target, progress=progress)  # a bad draft source fails here, first
    if is_artifact(src):
        path = Path(src)
    else:
        reject_unfinished(src)
        from .compiler import compile as compile_checkpoint  # only needed for checkpoints
        path = compile_checkpoint(src, dtype=dtype, target=target, progress=progress, **options.changed())
        options = KVOptions()  # compiled in
    capture = None
    if isinstance(draft, Eagle3Model):  # the target returns the hidden states the drafter reads
        capture = draft.layers_for(int(read_manifest(path)["meta"]["text"]["num_layers"]))
    if options or capture:
        from .compiler import replan
        path = replan(path, options or None, capture=capture)
    model = _open(path, generation_config)
    if isinstance(model, Eagle3Model):
        if draft is not None:
            raise InputError("an EAGLE-3 drafter drafts for a target; it cannot generate itself")
        return model
    if draft is not None:
        model.speculation = model.speculation_for(draft, num_draft_tokens)
    return model


def _open(path: Path, generation_config: str) -> "Model | Eagle3Model":
    """A loaded artifact: a model that generates, or a drafter artifact (EAGLE-3's has no
    tokenizer of its own) for ``load(target, draft=...)``."""
    artifact = load_artifact(path)
    if (artifact.meta.get("drafter") or {}).get("kind") == "eagle3":
        return Eagle3Model(artifact)
    return Model(artifact, generation_config=generation_config)


__all__ = ["load", "Model", "Path"]
