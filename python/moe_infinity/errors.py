"""The exception family of moe_infinity.

Every error the engine reports becomes exactly one of these, carrying the
engine's message. Each also derives from the closest built-in exception so
that ``except ValueError`` / ``except FileNotFoundError`` keep working.
"""

from __future__ import annotations

__all__ = [
    "MoEInfinityError",
    "InvalidArgumentError",
    "NotFoundError",
    "EngineIOError",
    "CheckpointFormatError",
    "BudgetError",
    "ClosedError",
    "StateError",
    "UnsupportedError",
    "InternalError",
    "CheckpointChangedError",
    "LibraryLoadError",
    "MissingDependencyError",
    "OverloadedError",
    "error_for_status",
]


class MoEInfinityError(Exception):
    """Base class of every moe_infinity error.

    Attributes:
        status: the engine's status code (0 when raised by Python code).
    """

    status: int = 0

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class InvalidArgumentError(MoEInfinityError, ValueError):
    """A bad argument or malformed configuration (status 1)."""

    status = 1


class NotFoundError(MoEInfinityError, FileNotFoundError):
    """A file or directory does not exist (status 2)."""

    status = 2

    def __str__(self) -> str:  # FileNotFoundError would format errno/filename
        return str(self.args[0]) if self.args else ""


class EngineIOError(MoEInfinityError, OSError):
    """Reading or writing a file failed (status 3)."""

    status = 3

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class CheckpointFormatError(MoEInfinityError, ValueError):
    """A checkpoint, index or trace file is malformed (status 4)."""

    status = 4


class BudgetError(MoEInfinityError, ValueError):
    """The memory budget is too small for what was asked (status 5)."""

    status = 5


class ClosedError(MoEInfinityError, RuntimeError):
    """The engine or model was closed (status 6)."""

    status = 6


class StateError(MoEInfinityError, RuntimeError):
    """A call was made in the wrong order (status 7)."""

    status = 7


class UnsupportedError(MoEInfinityError, NotImplementedError):
    """The feature is not available in this build or for this model (status 8)."""

    status = 8


class InternalError(MoEInfinityError, RuntimeError):
    """A bug inside the engine was caught before it could crash the process (status 9)."""

    status = 9


class CheckpointChangedError(MoEInfinityError, RuntimeError):
    """A checkpoint file changed on disk after the model was loaded
    (truncated or rewritten in place); the message names the file and what
    changed. The model cannot be used any more: load it again (status 12)."""

    status = 12


class LibraryLoadError(MoEInfinityError, ImportError):
    """The engine library could not be found or loaded."""


class MissingDependencyError(MoEInfinityError, ImportError):
    """An optional package that a feature needs is not installed (for
    example matplotlib for ``moe_infinity.plotting``); the message names
    the ``pip install`` that fixes it."""


class OverloadedError(MoEInfinityError, RuntimeError):
    """A server's request queue is full: try again later (HTTP 429)."""


_BY_STATUS: dict[int, type[MoEInfinityError]] = {
    cls.status: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        EngineIOError,
        CheckpointFormatError,
        BudgetError,
        ClosedError,
        StateError,
        UnsupportedError,
        InternalError,
        CheckpointChangedError,
    )
}
# MOE_ERR_BUFFER (10) is handled inside _native; MOE_ERR_HANDLE (11) means
# the engine is gone, which users see as a closed engine.
_BY_STATUS[11] = ClosedError


def error_for_status(status: int, message: str) -> MoEInfinityError:
    """Returns the exception for an engine status code and message."""
    cls = _BY_STATUS.get(status, MoEInfinityError)
    return cls(message, status)
