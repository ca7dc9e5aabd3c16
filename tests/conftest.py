"""Shared pytest setup: makes tests/ importable (tiny_models) and quiets
transformers' load reports."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")


def _versions() -> str:
    import torch
    import transformers

    try:
        from moe_infinity._compat import supported_range

        rng = f"; supported: transformers{supported_range('transformers')}, torch{supported_range('torch')}"
    except Exception:  # the package itself failed to import: say what we can
        rng = ""
    return f"transformers {transformers.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}{rng}"


def pytest_report_header(config):
    return f"moe_infinity tested against {_versions()}"



@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Every failure names the installed transformers and torch, so a failure
    that a new release causes says so in its own report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        report.sections.append(("versions", _versions()))
