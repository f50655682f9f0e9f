"""The errors we raise for the user: bad input, a refused action, data that fails a check.

    try:
        hfa.save(model, "out")
    except hfa.errors.HFAError as e:      # or `except ValueError`: every HFAError is one
        print(e)

Each names the problem and the fix in its message, and the ``hfa`` command prints it as one line (exit
status 2). Anything else that escapes (a bug, an error deep inside torch) keeps its traceback. The classes
also derive from the built-in type callers caught before, so ``except ValueError`` / ``except TypeError`` /
``except FileExistsError`` keep working.

No imports beyond the standard library: any layer may import this module.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointWriteError", "ConversionError", "HFAError", "MissingFileError",
           "NonFiniteError", "OptionError", "OverwriteRefusedError", "is_user_error"]


class HFAError(ValueError):
    """Base of our user-facing errors; the message says what is wrong and what to do."""


class OptionError(HFAError, TypeError):
    """An option a function or conversion does not know, has the wrong type, or needs and did not get."""


class MissingFileError(HFAError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class OverwriteRefusedError(HFAError, FileExistsError):
    """Writing would replace or delete something that is not ours to replace."""


class NonFiniteError(HFAError, FloatingPointError):
    """A weight, activation or loss is NaN or infinite where a finite number is needed."""


class ConversionError(HFAError):
    """A conversion cannot be carried out on this model (e.g. a factorization that does not converge)."""


class CheckpointError(HFAError):
    """A checkpoint folder that fails its checks: a file changed, truncated or missing."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, no permission); nothing was left half-written."""


# -- which escaping exceptions are messages for the user ---------------------------------------------------

_DELIBERATE = (ValueError, TypeError, OSError, ImportError, ArithmeticError, RuntimeError)


def _raised_here_on_purpose(exc: BaseException) -> bool:
    """True when `exc` was raised by an explicit ``raise SomeError(...)`` statement in this package's own code.

    Parts of the package written before `HFAError` raise plain ``ValueError("... the fix ...")``; those are
    messages for the user as much as an HFAError is. A bug is not: a wrong call, ``int("x")`` or an index error
    raises from a line that is not a ``raise`` statement (or from inside torch/transformers)."""
    import linecache
    import os

    if not isinstance(exc, _DELIBERATE) or exc.__traceback__ is None:
        return False
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    package = os.path.dirname(os.path.abspath(__file__))
    if not os.path.abspath(filename).startswith(package + os.sep):
        return False
    line = linecache.getline(filename, tb.tb_lineno).strip()
    return line.startswith("raise ") and not line.startswith("raise from")


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` carries a message for the user (print it as one line) rather than a bug (keep the traceback):
    an `HFAError`, or an error raised on purpose by a ``raise ...(message)`` statement of this package."""
    return isinstance(exc, HFAError) or _raised_here_on_purpose(exc)
