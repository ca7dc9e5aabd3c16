"""The decode benchmark (moe_infinity.bench, also `python -m moe_infinity
bench`), runnable from a source checkout:

    python benchmarks/decode.py --preset mixtral-8x7b --device-memory 24GiB --graph --pipeline

Its presets, model builder and routing generator are re-exported for the
scripts beside it (profile_step.py)."""

import sys
from pathlib import Path

try:
    import moe_infinity.bench  # noqa: F401
except ImportError:  # a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from moe_infinity.bench import *  # noqa: E402,F401,F403
from moe_infinity.bench import ForcedRouting, main  # noqa: E402,F401  (names the scripts and tests use)

if __name__ == "__main__":
    sys.exit(main())
