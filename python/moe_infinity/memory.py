"""Memory sizes as users write them: accelerate-style strings, bytes, fractions."""

from __future__ import annotations

import os
import re

from .errors import InvalidArgumentError

__all__ = ["parse_memory", "host_memory_bytes", "format_bytes"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)


def host_memory_bytes() -> int:
    """Physical memory of this machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_memory(value: int | float | str, total: int | None = None, *, name: str = "device_memory") -> int:
    """Converts a memory amount to bytes.

    Accepts an int (bytes), a float in (0, 1] (a fraction of ``total``), or a
    string: ``"24GiB"``, ``"500MB"``, ``"1.5 GB"``, ``"123456"`` (bytes) or
    ``"0.75"`` (a fraction). As in accelerate, ``GB`` is 10**9 bytes and
    ``GiB`` 2**30.
    """
    if isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be a size, not {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise InvalidArgumentError(f"{name} must be positive, got {value}")
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise InvalidArgumentError(
                f"{name}={value!r}: a float is a fraction of the device's memory and must lie in (0, 1]; "
                "write bytes as an int or a string such as '24GiB'"
            )
        if total is None:
            raise InvalidArgumentError(f"{name} as a fraction needs the device's total memory")
        return max(1, int(value * total))
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise InvalidArgumentError(f"{name}={value!r} is not a size (examples: '24GiB', '500MB', 0.75, 1073741824)")
        num, unit = m.group(1), (m.group(2) or "").upper()
        if unit == "" and "." in num:
            return parse_memory(float(num), total, name=name)
        n = int(float(num) * _UNITS[unit])
        if n <= 0:
            raise InvalidArgumentError(f"{name} must be positive, got {value!r}")
        return n
    raise InvalidArgumentError(f"{name} must be an int, float or str, got {type(value).__name__}")


def format_bytes(n: int) -> str:
    """Formats bytes with a binary unit, e.g. ``"1.50 GiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
