"""Program -> Program transforms. See ``manager`` for the registry and presets."""
from .manager import PASSES, PRESETS, register, run_passes  # noqa: F401
