"""Processes sharing one trace file (Serve replicas, a notebook beside a
server) keep each other's EAMs, and a full disk is a clear EngineIOError
that keeps the previous trace (CPU, built-in model)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import moe_infinity as mi
from moe_infinity.builtin import builtin_model_dir

# One replica: each round it loads the model with the shared trace,
# generates its prompts (one EAM each), says it is ready, waits for the
# round's barrier file and closes (saving the trace). Rounds run in one
# process so that the imports are paid once.
_WORKER = textwrap.dedent(
    """
    import pathlib, sys, time, torch, moe_infinity as mi
    from moe_infinity.builtin import builtin_model_dir
    trace, sync, worker, rounds = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    for r in range(rounds):
        m = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=trace)
        g = torch.Generator().manual_seed(100 * r + worker)
        for n in (3, 5):
            m.generate(torch.randint(1, 200, (1, n), generator=g), max_new_tokens=2, do_sample=False)
        (sync / f"ready-{r}-{worker}").touch()
        deadline = time.monotonic() + 120
        while not (sync / f"go-{r}").exists():
            if time.monotonic() > deadline:
                sys.exit(f"round {r}: the barrier never appeared")
            time.sleep(0.001)
        m.close()
    print("saved")
    """
)
_PROMPTS_PER_WORKER = 2


def _stored_eams(trace: Path) -> int:
    """The number of EAMs a fresh engine loads from the trace file."""
    m = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=trace)
    try:
        return m.moe_stats()["eamc_size"]
    finally:
        m.close()  # nothing new: the file keeps the same EAMs


@pytest.mark.slow
def test_two_processes_closing_together_keep_each_others_eams(tmp_path):
    trace = tmp_path / "shared" / "trace.bin"
    sync = tmp_path / "sync"
    sync.mkdir()
    rounds, workers = 5, 2
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(trace), str(sync), str(w), str(rounds)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in range(workers)
    ]
    try:
        for r in range(rounds):
            readies = [sync / f"ready-{r}-{w}" for w in range(workers)]
            deadline = time.monotonic() + 300
            while not all(p.exists() for p in readies):
                dead = [p for p in procs if p.poll() is not None]
                assert not dead, f"a worker exited early:\n{dead[0].communicate()[0]}"
                assert time.monotonic() < deadline, f"round {r}: workers never got ready"
                time.sleep(0.01)
            (sync / f"go-{r}").touch()  # both close (and save) at about the same moment
        for p in procs:
            out = p.communicate(timeout=120)[0]
            assert p.returncode == 0 and "saved" in out, out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    # Every request of every worker left one EAM (far below the default
    # capacity of 1000); a last-writer-wins save would keep about half.
    assert _stored_eams(trace) == rounds * workers * _PROMPTS_PER_WORKER
    assert sorted(p.name for p in trace.parent.iterdir()) == ["trace.bin", "trace.bin.lock"]  # no temp files


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 64 KiB tmpfs (needs root: skipped where mounting is refused)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def _fill(directory: Path) -> None:
    """Writes a file until the filesystem is full."""
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == 28, e  # ENOSPC


def test_full_disk_is_an_io_error_that_keeps_the_previous_trace(tiny_tmpfs):
    trace = tiny_tmpfs / "trace.bin"
    model = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB", trace_path=trace)
    try:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
        model.save_moe_trace(trace)
        before = trace.read_bytes()
        model.generate(torch.tensor([[9, 8, 7, 6]]), max_new_tokens=2, do_sample=False)
        _fill(tiny_tmpfs)

        with pytest.raises(mi.EngineIOError) as err:
            model.save_moe_trace(trace)
        msg = str(err.value)
        assert "disk full" in msg and str(trace) in msg and "previous trace file was kept" in msg, msg
        assert isinstance(err.value, mi.MoEInfinityError) and isinstance(err.value, OSError)
        assert trace.read_bytes() == before
        assert sorted(p.name for p in tiny_tmpfs.iterdir()) == ["filler", "trace.bin", "trace.bin.lock"]

        # Closing saves the trace too: the same error, the same file.
        with pytest.raises(mi.EngineIOError, match="disk full"):
            model.close()
        assert trace.read_bytes() == before
    finally:
        with contextlib.suppress(mi.EngineIOError):  # keep the first failure visible
            model.close()
