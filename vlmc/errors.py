"""Errors a user can cause. The CLI prints them as one line and exits non-zero.

Anything that is *not* a VlmcError reaching the CLI is a bug in vlmc and keeps its traceback.
"""


import functools
import sys


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


class ContextLengthError(InputError):
    """The prompt, or the prompt plus the requested reply, does not fit the context."""


class ArtifactError(VlmcError):
    """A compiled artifact is missing, incomplete or from an incompatible vlmc version."""


class PerformanceWarning(UserWarning):
    """A choice that works but runs much slower than another on the chosen target."""


def exit_on_user_error(fn):
    """For CLI commands: a VlmcError prints one ``error:`` line and exits 1; Ctrl-C exits 130."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlmcError as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(1)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            sys.exit(130)
    return wrapper
