"""vlmc: a compiler for vision-language models onto MLX.

    import vlmc
    model = vlmc.load("path/to/checkpoint-or-artifact")   # compiles once, then reuses
    print(model.generate("Describe the image.", images=["cat.png"]).text)
"""
__version__ = "0.1.0"

from .errors import VlmcError  # noqa: E402,F401


def compile(*args, **kwargs):  # noqa: A001 - mirrors the CLI verb
    from .compiler import compile as _compile
    return _compile(*args, **kwargs)


def load(*args, **kwargs):
    from .api import load as _load
    return _load(*args, **kwargs)
