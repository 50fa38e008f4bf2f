"""The image processor kinds and the spec <-> processor dispatch (a spec's ``kind`` names
its processor; a config's kind may differ: "siglip" configs make "clip" specs)."""
from __future__ import annotations

from typing import Any

from PIL import Image

from ...errors import ArtifactError, SourceError
from .clip_processor import ClipImageProcessor
from .gemma4_processor import Gemma4ImageProcessor
from .idefics3_processor import Idefics3ImageProcessor
from .image_processing import COMMON_FIELDS, UNSUPPORTED_SWITCHES, ImageProcessor
from .pixtral_processor import PixtralImageProcessor
from .qwen_vl_processor import Qwen2VLImageProcessor

# spec kind -> processor class, and config kind -> the class that makes its spec
KINDS: dict[str, type[ImageProcessor]] = {"qwen2_vl": Qwen2VLImageProcessor, "clip": ClipImageProcessor,
                                          "idefics3": Idefics3ImageProcessor, "pixtral": PixtralImageProcessor,
                                          "gemma4": Gemma4ImageProcessor}
CONFIG_KINDS: dict[str, type[ImageProcessor]] = {"qwen2_vl": Qwen2VLImageProcessor, "clip": ClipImageProcessor,
                                                 "siglip": ClipImageProcessor, "idefics3": Idefics3ImageProcessor,
                                                 "pixtral": PixtralImageProcessor, "gemma4": Gemma4ImageProcessor}


def spec_from_preprocessor_config(cfg: dict, kind: str, **extra: Any) -> dict:
    """Normalise a HF ``preprocessor_config.json`` dict into an explicit processor spec of a
    registered ``kind`` (``KINDS``/``CONFIG_KINDS``). ``extra`` adds or overrides fields (the
    LLaVA family passes ``tokens_per_image=``). Raises SourceError for a config the
    processor cannot honour."""
    cfg = {k: v for k, v in dict(cfg).items() if v is not None}  # null means "class default"
    cls = CONFIG_KINDS.get(kind)
    if cls is None:
        raise SourceError(f"unknown image processor kind {kind!r}; known: {', '.join(sorted(CONFIG_KINDS))}")
    for switch in UNSUPPORTED_SWITCHES:
        if cfg.get(switch) and switch not in cls.switches:
            raise SourceError(f"preprocessor_config.json sets {switch}=true, which vlmc's {kind} preprocessing does not support")
    spec = cls.spec_from_config(cfg, kind)
    spec.update(extra)
    try:
        validate(spec)
    except ArtifactError as exc:
        raise SourceError(f"preprocessor_config.json: {exc}") from None
    return spec


def validate(spec: dict) -> None:
    """Raise ArtifactError if ``spec`` is not a complete, coherent processor spec."""
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ArtifactError(f"processor spec has unknown kind {kind!r}; expected one of {', '.join(sorted(KINDS))}")
    cls = KINDS[spec["kind"]]
    missing = [key for key in COMMON_FIELDS + cls.fields if key not in spec]
    if missing:
        raise ArtifactError(f"{spec['kind']} processor spec is missing {', '.join(missing)}")
    for key in ("image_mean", "image_std"):
        if len(spec[key]) != 3:
            raise ArtifactError(f"processor spec {key} must have 3 values")
    if any(float(s) == 0.0 for s in spec["image_std"]):
        raise ArtifactError("processor spec image_std contains 0")
    try:
        Image.Resampling(int(spec["resample"]))
    except ValueError:
        raise ArtifactError(f"processor spec resample={spec['resample']!r} is not a PIL filter") from None
    cls.validate_spec(spec)


def make_image_processor(spec: dict) -> ImageProcessor:
    """Build the processor a spec describes. Raises ArtifactError for an invalid spec."""
    validate(spec)
    return KINDS[spec["kind"]](spec)


def make_video_processor(spec: dict) -> Any:
    """The video processor a ``processor.json`` ``video`` spec describes."""
    from .gemma4_video import Gemma4VideoProcessor
    from .qwen_vl_video import Qwen3VideoProcessor, QwenVideoProcessor
    from .smolvlm_video import SmolVLMVideoProcessor
    kinds = {"qwen2_vl": QwenVideoProcessor, "qwen3_vl": Qwen3VideoProcessor, "smolvlm": SmolVLMVideoProcessor,
             "gemma4": Gemma4VideoProcessor}
    if not isinstance(spec, dict) or spec.get("kind") not in kinds:
        kind = spec.get("kind") if isinstance(spec, dict) else spec
        raise ArtifactError(f"video processor spec has unknown kind {kind!r}; expected one of {', '.join(kinds)}")
    return kinds[spec["kind"]](spec)
