"""vlmc: a compiler for vision-language models onto MLX.

    import vlmc
    model = vlmc.load("path/to/checkpoint-or-artifact")   # compiles once, then reuses
    print(model.generate("Describe the image.", images=["cat.png"]).text)
"""
__version__ = "0.1.0"

import os as _os

# numpy's OpenBLAS threads spin for 2^28 cycles after each call before they sleep; on the
# cpu target they then take the cores from vlmc's own kernel threads, as BLAS attention
# and the int8 GEMMs alternate in every vision layer (benchmarks/README.md has the image
# request's time with and without). OpenBLAS reads this when numpy loads it: it applies
# when vlmc is imported before numpy, and a value the user set wins.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .errors import VlmcError  # noqa: E402,F401


def compile(*args, **kwargs):  # noqa: A001 - mirrors the CLI verb
    from .compiler import compile as _compile
    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    from .api import load as _load
    return _load(*args, **kwargs)


def __getattr__(name: str):
    if name == "VideoRef":  # a video and how to sample it: generate(videos=[vlmc.VideoRef(path, fps=1.0)])
        from .runtime.video import VideoRef
        return VideoRef
    raise AttributeError(f"module 'vlmc' has no attribute {name!r}")
