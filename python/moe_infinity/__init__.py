"""moe_infinity: serve Mixture-of-Experts models whose experts do not fit in
GPU memory.

Routed experts live in host memory (memory-mapped from the checkpoint) and
move into a bounded expert cache on demand or ahead of demand; a Go engine
traces which experts each request activates, prefetches what later layers
will need and evicts by activation-aware priority.
"""

from __future__ import annotations

from pathlib import Path

from .engine import Engine
from .errors import (
    BudgetError,
    CheckpointChangedError,
    CheckpointFormatError,
    ClosedError,
    EngineIOError,
    InternalError,
    InvalidArgumentError,
    LibraryLoadError,
    MissingDependencyError,
    MoEInfinityError,
    NotFoundError,
    OverloadedError,
    StateError,
    UnsupportedError,
)

__version__ = "0.1.0"

__all__ = [
    "Engine",
    "MoEInfinityError",
    "InvalidArgumentError",
    "NotFoundError",
    "EngineIOError",
    "CheckpointFormatError",
    "CheckpointChangedError",
    "BudgetError",
    "ClosedError",
    "StateError",
    "UnsupportedError",
    "InternalError",
    "LibraryLoadError",
    "MissingDependencyError",
    "OverloadedError",
    "engine_version",
    "builtin_model_path",
]


def engine_version() -> str:
    """Version and build variant of the loaded engine library, e.g. ``"0.1.0 (cpu)"``."""
    from . import _native

    return _native.version()


def builtin_model_path() -> Path:
    """Directory of the small built-in model shipped in the package (a
    4-layer × 8-expert Mixtral-architecture model with its tokenizer; the
    model ``python -m moe_infinity generate`` uses without ``--model``).

    Load it like any checkpoint::

        path = moe_infinity.builtin_model_path()
        model = moe_infinity.from_pretrained(path)
        tok = transformers.AutoTokenizer.from_pretrained(path)

    Raises NotFoundError when the package was installed without it."""
    from .builtin import builtin_model_dir

    return builtin_model_dir()

from .families import supported_model_types  # noqa: E402
from .loading import MoE, from_pretrained, offload  # noqa: E402

__all__ += ["from_pretrained", "offload", "MoE", "supported_model_types"]
from .graphs import GraphDecoder  # noqa: E402

__all__ += ["GraphDecoder"]
