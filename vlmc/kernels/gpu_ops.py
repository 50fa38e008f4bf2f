"""The op library of the ``metal`` and ``cuda`` targets: MLX's own kernels
(``reference``) with the custom kernels of ``vlmc.kernels.gpu`` where vlmc has one."""
from __future__ import annotations

from .reference import *  # noqa: F401,F403  (every op not overridden below)
from .gpu import add_rms_norm, cached_attention  # noqa: F401,E402
