"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Anything that is *not* a VlmcError reaching the CLI is a bug in vlmc and keeps its traceback.
"""


class VlmcError(Exception):
    """Base class: a clear, user-facing failure."""


class SourceError(VlmcError):
    """The checkpoint source cannot be found, read or understood (paths, hub ids, files)."""


class UnsupportedModelError(VlmcError):
    """The checkpoint is of a model family vlmc cannot compile."""


class WeightError(VlmcError):
    """A weight file is corrupt or truncated, or a tensor is missing or mis-shaped."""


class InputError(VlmcError):
    """A request input is bad: a broken image, an unreachable URL, an over-long prompt."""


class ArtifactError(VlmcError):
    """A compiled artifact is missing, incomplete or from an incompatible vlmc version."""
