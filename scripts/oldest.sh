#!/usr/bin/env bash
# The oldest-versions job: a separate venv with the lowest release of every
# direct dependency that pyproject.toml admits (its ">=" bounds, read by
# scripts/lower_bounds.py, so the range is stated once), running the parity,
# API and compatibility tests, and the serving scheduler's (stacked steps
# lean on transformers' cache and attention), against the engine in build/.
#
#   bash scripts/oldest.sh            (after `make lib`; CI runs it)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${OLDEST_VENV:-build/venv-oldest}
pins=$(python3 scripts/lower_bounds.py)
echo "oldest supported: $pins"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check $pins
"$venv/bin/python" -c 'import torch, transformers; print("oldest venv: torch", torch.__version__, "transformers", transformers.__version__)'
[ -f build/libmoe_infinity.so ] || make lib
PYTHONPATH=$PWD/python MOE_INFINITY_LIB=$PWD/build/libmoe_infinity.so \
    "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    tests/test_compat.py tests/test_api.py tests/test_parity.py tests/test_early_errors.py tests/test_options.py \
    tests/test_scheduler.py
