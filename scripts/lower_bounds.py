"""Prints `name==version` for the lowest release pyproject.toml admits of
each runtime dependency and of the test tools the oldest-versions job needs
(pytest, accelerate): the ">=" bound of each requirement. Used by
scripts/oldest.sh, so the supported range is stated only in pyproject.toml."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Test tools the parity/API tests need (the rest of the test extra is for other suites).
TEST_TOOLS = ("pytest", "accelerate")


def requirements() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, re.S | re.M)
    test = re.search(r"^test\s*=\s*\[(.*?)\]", text, re.S | re.M)
    if not deps or not test:
        sys.exit("lower_bounds: pyproject.toml has no dependencies or test extra")
    reqs = re.findall(r'"([^"]+)"', deps.group(1))
    reqs += [r for r in re.findall(r'"([^"]+)"', test.group(1)) if re.split(r"[<>=!~ ]", r)[0] in TEST_TOOLS]
    return reqs


def main() -> None:
    pins = []
    for req in requirements():
        m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", req)
        name, spec = m.group(1), m.group(2)
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if not low:
            sys.exit(f"lower_bounds: {req!r} states no lower bound; the oldest-versions job needs one")
        pins.append(f"{name}=={low.group(1)}")
    print(" ".join(pins))


if __name__ == "__main__":
    main()
