"""Mistakes are reported when they are made: at load, naming the setting,
as a MoEInfinityError — not after generation has run, and never as a
traceback at interpreter exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import moe_infinity as mi
from moe_infinity.builtin import builtin_model_dir


@pytest.fixture()
def a_file(tmp_path):
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    return f


def test_unwritable_trace_path_fails_at_load_naming_the_setting(a_file):
    with pytest.raises(mi.EngineIOError, match=r"^trace_path: cannot write in .*not-a-dir") as err:
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=a_file / "trace.bin")
    assert isinstance(err.value, mi.MoEInfinityError)


def test_trace_path_that_is_a_directory_fails_at_load(tmp_path):
    with pytest.raises(mi.EngineIOError, match=r"trace_path: .* is a directory"):
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=tmp_path)


def test_unwritable_offload_dir_is_a_moe_infinity_error_at_load(a_file):
    with pytest.raises(mi.EngineIOError, match=r"^offload_dir: cannot write in .*not-a-dir/sub") as err:
        mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", offload_dir=a_file / "sub")
    assert isinstance(err.value, mi.MoEInfinityError) and isinstance(err.value, OSError)


def test_offload_checks_its_trace_path_at_load(a_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(builtin_model_dir())
    with pytest.raises(mi.EngineIOError, match="trace_path"):
        mi.offload(model, device_memory="2MiB", trace_path=a_file / "t.bin")


def test_writable_trace_path_in_a_new_directory_is_created_and_written(tmp_path):
    trace = tmp_path / "new" / "deeper" / "trace.bin"
    model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=trace)
    model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    model.close()
    assert trace.is_file() and trace.stat().st_size > 0
    # No probe file left behind; the lock file that serialises savers stays.
    assert sorted(p.name for p in trace.parent.iterdir()) == ["trace.bin", "trace.bin.lock"]


_EXIT_SCRIPT = textwrap.dedent(
    """
    import shutil, sys, tempfile, pathlib, torch, moe_infinity as mi
    from moe_infinity.builtin import builtin_model_dir
    d = pathlib.Path(tempfile.mkdtemp())
    m = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", offload_dir=d / "off")
    m.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    if sys.argv[1] == "remove":
        shutil.rmtree(d)  # the trace can no longer be written at exit
    print("done")
    """
)


@pytest.mark.parametrize("case", ["keep", "remove"])
def test_an_unclosed_model_at_exit_prints_no_traceback(case):
    res = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, case], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "done" in res.stdout
    assert "Exception ignored" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    if case == "remove":
        assert "moe_infinity: closing an unclosed model: saving trace" in res.stderr
