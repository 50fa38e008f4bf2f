"""Typed options: what a compile and a KV-cache plan can be asked for, validated once, here.

The field names are the CLI flags' (``--kv-bits`` is ``kv_bits``, ``--no-fuse`` is
``no_fuse``) and the keyword arguments of ``vlmc.compile`` / ``vlmc.load``, so nothing is
renamed between the CLI, the Python API, the server and the passes. The vocabularies
(schemes, targets, fusions, ...) are defined here and imported by the passes that act on
them. A bad value raises ``VlmcError`` (a user mistake) before any weight is read.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import VlmcError

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
QUANT_PARAM_DTYPES = ("auto", *FLOAT_DTYPES)  # scales and biases of affine codes
TARGETS = ("cpu", "metal", "cuda")
PRESETS = ("default", "none")
AFFINE_SCHEMES = {"q2": 2, "q3": 3, "q4": 4, "q5": 5, "q6": 6, "q8": 8}
MICROSCALING_SCHEMES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}
QUANT_SCHEMES = tuple(AFFINE_SCHEMES) + tuple(MICROSCALING_SCHEMES)
ACTIVATION_SCHEMES = ("mxfp8", "nvfp4")  # the block formats MLX's qqmm takes for both operands
GROUP_SIZES = (32, 64, 128)
RECIPES = ("uniform", "mixed")
FUSIONS = ("qkv", "gate_up", "add_norm", "decode_layer")
OPT_IN_FUSIONS = ("add_norm",)  # off unless asked for with --fuse

KV_SCHEMES = ("uniform", "turboquant")
KV_UNIFORM_BITS = (2, 3, 4, 8)
KV_GROUP_SIZES = (16, 32, 64, 128)


class KVLayoutError(VlmcError, ValueError):
    """A KV option the model cannot honour, or a budget nothing fits."""


# ``--quant-params auto`` rounds affine scales and biases to bfloat16 only for codes of up
# to this many bits: a parameter's rounding (2^-9 relative) moves the largest code of a
# 4-bit group by ~3% of a step, of an 8-bit one by ~50% (+1.3% relative error measured).
AUTO_PARAMS_MAX_BITS = 4


@dataclass(frozen=True)
class KVOptions:
    """How the KV caches are planned (the ``kv_layout`` pass): bits and scheme of their
    codes, a window cap, or a memory budget at a context length. Defaults: dense caches,
    the last full-attention layer spared from quantization."""

    kv_bits: float | None = None
    kv_quant_scheme: str = "uniform"
    kv_group_size: int | None = None
    max_kv_size: int | None = None
    kv_memory_budget: int | None = None
    kv_context: int | None = None
    kv_quantize_last: bool = False

    def __post_init__(self) -> None:
        if self.kv_quant_scheme not in KV_SCHEMES:
            raise KVLayoutError(f"--kv-quant-scheme must be one of {', '.join(KV_SCHEMES)}, "
                                f"got {self.kv_quant_scheme!r}")
        for name, unit in (("max_kv_size", "token"), ("kv_memory_budget", "byte"), ("kv_context", "token"),
                           ("kv_group_size", "value")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise KVLayoutError(f"--{name.replace('_', '-')} must be at least 1 {unit}, got {value!r}")
        if self.kv_memory_budget is not None and self.kv_bits is not None:
            raise KVLayoutError("give either --kv-bits or --kv-memory-budget, not both (the budget picks the bits)")
        if self.kv_group_size is not None and self.kv_group_size not in KV_GROUP_SIZES:
            raise KVLayoutError(f"--kv-group-size must be 16, 32, 64 or 128, got {self.kv_group_size}")
        if self.kv_bits is not None:
            self.requested()  # the bits must make sense for the scheme

    def requested(self) -> dict[str, Any]:
        """The layout asked for by ``kv_bits`` / ``kv_quant_scheme`` (before per-layer rules)."""
        bits = self.kv_bits
        if bits is None:
            return {"layout": "dense"}
        if self.kv_quant_scheme == "uniform":
            if bits != int(bits) or int(bits) not in KV_UNIFORM_BITS:
                hint = (" (fractional bits need --kv-quant-scheme turboquant)" if bits != int(bits) and 2 <= bits <= 4
                        else "")
                raise KVLayoutError(f"uniform KV quantization takes 2, 3, 4 or 8 bits, got {bits:g}{hint}")
            return {"layout": "quantized", "bits": int(bits), "group_size": self.kv_group_size}
        k_bits, v_bits = math.floor(bits), math.ceil(bits)
        if bits * 2 != int(bits * 2) or k_bits < 2 or v_bits > 4:
            raise KVLayoutError(f"TurboQuant KV takes 2 to 4 bits in steps of 0.5 (e.g. 3.5 = 3-bit keys, "
                                f"4-bit values), got {bits:g}")
        return {"layout": "turboquant", "k_bits": k_bits, "v_bits": v_bits}

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the defaults (what cache keys and manifests record)."""
        default = KVOptions()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def __bool__(self) -> bool:
        return bool(self.changed())

    @classmethod
    def from_kwargs(cls, where: str, **given: Any) -> "KVOptions":
        """From keyword arguments (``vlmc.load(..., kv_bits=4)``); unset (None) ones take the
        defaults, unknown names are a TypeError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(given) - known)
        if unknown:
            raise TypeError(f"{where} got unknown option(s) {unknown}; KV options: {', '.join(sorted(known))}")
        return cls(**{k: v for k, v in given.items() if v is not None})


@dataclass(frozen=True)
class CompileOptions:
    """Everything a compile is asked for besides the source; part of the compile cache key."""

    dtype: str = "float32"
    target: str = "cpu"
    preset: str = "default"
    quantize: str | None = None
    group_size: int = 64
    quantize_vision: bool = True
    head: str = "auto"
    recipe: str = "uniform"
    no_fuse: tuple[str, ...] = ()
    fuse: tuple[str, ...] = ()
    quantize_activations: bool = False
    quant_params: str = "auto"
    kv: KVOptions = field(default_factory=KVOptions)

    def __post_init__(self) -> None:
        object.__setattr__(self, "no_fuse", tuple(sorted(set(self.no_fuse))))
        object.__setattr__(self, "fuse", tuple(sorted(set(self.fuse))))

        def one_of(flag: str, value: Any, allowed) -> None:
            if value not in allowed:
                raise VlmcError(f"{flag} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        one_of("--dtype", self.dtype, FLOAT_DTYPES)
        one_of("--target", self.target, TARGETS)
        one_of("--passes", self.preset, PRESETS)
        one_of("--group-size", self.group_size, GROUP_SIZES)
        one_of("--recipe", self.recipe, RECIPES)
        if self.quantize is not None:
            one_of("--quantize", self.quantize, QUANT_SCHEMES)
        one_of("--quant-params", self.quant_params, QUANT_PARAM_DTYPES)
        if self.head not in ("auto", "none") and self.head not in QUANT_SCHEMES:
            raise VlmcError(f"--head must be auto, none or one of {', '.join(QUANT_SCHEMES)}, got {self.head!r}")
        if self.quantize_activations and self.quantize not in ACTIVATION_SCHEMES:
            raise VlmcError(f"--quantize-activations needs --quantize {' or '.join(ACTIVATION_SCHEMES)} "
                            f"(the block formats both operands of a matmul can take), got {self.quantize or 'none'}")
        if self.quantize_activations and self.target != "cuda":
            raise VlmcError("--quantize-activations is for --target cuda, where MLX's qqmm multiplies the two "
                            "quantized operands (an artifact for cuda also runs elsewhere, emulating it)")
        bad = (set(self.no_fuse) | set(self.fuse)) - set(FUSIONS)
        if bad:
            raise VlmcError(f"--fuse/--no-fuse take {', '.join(FUSIONS)}; got {', '.join(sorted(bad))}")
        if not isinstance(self.kv, KVOptions):
            raise TypeError("CompileOptions.kv must be a KVOptions")

    def pass_options(self) -> dict[str, dict[str, Any]]:
        """Each pass's keyword options."""
        from .passes.pad_hidden import options_for as pad_hidden_options
        fusing: dict[str, Any] = {"disable": list(self.no_fuse)} if self.no_fuse else {}
        if self.fuse:
            fusing["enable"] = list(self.fuse)
        quant = {"scheme": self.quantize, "group_size": self.group_size, "vision": self.quantize_vision,
                 "head": self.head, "recipe": self.recipe, "activations": self.quantize_activations}
        params = self.affine_param_dtype()
        if params is not None and self.quant_params == "auto":
            quant["params_max_bits"] = AUTO_PARAMS_MAX_BITS
        if params is not None:
            quant["params"] = params
        return {"fuse": fusing, "storage_dtype": {"dtype": self.dtype},
                "pad_hidden": pad_hidden_options(quant),
                "quantize": quant if self.quantize else {},
                "kv_layout": {"options": self.kv},
                "lower": {"target": self.target, "decode_layer": "decode_layer" not in self.no_fuse}}

    def affine_param_dtype(self) -> str | None:
        """The dtype affine codes' scales and biases are stored in (None: the weights' own).
        ``auto`` on the cpu target: bfloat16 under float32 weights of up to
        AUTO_PARAMS_MAX_BITS bits, since its kernels read bfloat16 parameters natively and
        a decode step reads a tenth fewer bytes of q4 weights (the compile's rel_error and
        a quality check barely move: benchmarks/README.md); elsewhere the weights' dtype."""
        if self.quant_params != "auto":
            return self.quant_params
        return "bfloat16" if self.target == "cpu" and self.dtype == "float32" else None

    def key(self) -> dict[str, Any]:
        """A JSON-ready form for cache keys and manifests (KV options as their changes only)."""
        out = asdict(self)
        out["kv"] = self.kv.changed()
        out["no_fuse"], out["fuse"] = list(self.no_fuse), list(self.fuse)
        return out
