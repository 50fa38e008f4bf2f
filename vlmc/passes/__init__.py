"""Program -> Program transforms, one file each; ``manager`` has the registry, presets and runner."""
from .manager import PASSES, PLAN_PASSES, PRESETS, register, run_passes  # noqa: F401
from . import capture, cleanup, dtype, fuse, kv_layout, lower, pad_hidden, quantize  # noqa: E402,F401  (the built-in passes register)
