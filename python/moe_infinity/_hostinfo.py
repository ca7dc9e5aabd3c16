"""Facts about the machine a benchmark ran on, for its JSON: timings of
host-side work (driver calls, thread wake-ups) and of host→device copies
differ between machines of one card name, and these are what to compare
runs by."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _cpu_model() -> str | None:
    text = _read("/proc/cpuinfo") or ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return None


def _mem_total_gib() -> float | None:
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / (1 << 20), 1)
    return None


def host_facts() -> dict[str, Any]:
    """Kernel release, CPU model and count, memory, transparent huge pages,
    clock source and IOMMU groups (None where unreadable)."""
    groups = Path("/sys/kernel/iommu_groups")
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "mem_total_gib": _mem_total_gib(),
        "thp": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "clocksource": _read("/sys/devices/system/clocksource/clocksource0/current_clocksource"),
        "iommu_groups": len(list(groups.iterdir())) if groups.is_dir() else None,
    }
