"""A checkpoint file changed on disk under a loaded model.

Truncating a shard in place (``cp new.safetensors old.safetensors``,
``rsync --inplace``, a full disk) used to kill the process with SIGBUS (exit
135: no exception, no message; a Jupyter kernel just dies): the experts and,
through safetensors, the dense weights were read straight from the file's
memory mapping. Now the dense weights are copies, every engine read of the
mapping runs under a guard, and each layer checks the shards' identity
(inode, size, mtime), so generating raises CheckpointChangedError naming the
file, and the process, and other models in it, keep working.

Deleting (unlinking) a loaded shard is harmless: the mapping keeps the old
pages alive and generation goes on with the same tokens.

Each scenario runs in a subprocess so that a regression (a SIGBUS) fails one
test instead of killing the test run.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_infinity as mi
from moe_infinity import _native
from moe_infinity.builtin import builtin_model_dir
from moe_infinity.errors import error_for_status

ROOT = Path(__file__).resolve().parent.parent

SCENARIO = r"""
import json, os, shutil, sys, time
from pathlib import Path
import torch
import moe_infinity as mi
from moe_infinity.builtin import builtin_model_dir

mode, work, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
a, b = work / "a", work / "b"
for d in (a, b):
    shutil.copytree(builtin_model_dir(), d)
shard = a / "model.safetensors"
hour_ago = time.time() - 3600
os.utime(shard, (hour_ago, hour_ago))  # any later write changes the mtime, however coarse the clock

prompt = torch.tensor([[1, 40, 50, 60, 70, 80]])
def gen(m):
    return m.generate(input_ids=prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0].tolist()

# A few expert slots: the rest is read from the mapping (on a GPU the
# budget also holds the dense weights and a 256 MiB activation workspace).
mem = "2MiB" if device == "cpu" else "262MiB"
ma = mi.from_pretrained(a, device=device, device_memory=mem)
mb = mi.from_pretrained(b, device=device, device_memory=mem)
out = {"a_before": gen(ma), "b_before": gen(mb)}

if mode == "truncate":
    os.truncate(shard, shard.stat().st_size // 2)
elif mode == "cp_other":
    # cp other shard: the same inode, another file's contents and size.
    shutil.copyfile(a / "tokenizer.json", shard)
elif mode == "rewrite_same_size":
    # rsync --inplace of a file of the same size: no fault ever shows it;
    # only the identity check (mtime) does.
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size - 4096)
        block = bytearray(f.read(64))
        f.seek(-64, 1)
        f.write(bytes(x ^ 0x55 for x in block))
elif mode == "unlink":
    os.unlink(shard)
else:
    raise SystemExit(f"unknown mode {mode}")

for key in ("a_after", "a_again"):
    try:
        out[key] = gen(ma)
    except mi.MoEInfinityError as exc:
        out[key] = {"error": type(exc).__name__, "status": exc.status, "message": str(exc)}
out["b_after"] = gen(mb)
ma.close()
mb.close()
print("RESULT " + json.dumps(out))
"""


def _run(mode: str, tmp_path: Path, device: str = "cpu") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "python"), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TQDM_DISABLE", "1")
    proc = subprocess.run([sys.executable, "-c", SCENARIO, mode, str(tmp_path), device], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode} (-7, or 135 from a shell: SIGBUS)\n{proc.stderr[-3000:]}"
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-2000:]
    return json.loads(line[-1][len("RESULT "):])


@pytest.mark.parametrize(
    "mode, what",
    [
        ("truncate", r"\(size (\d+) -> (\d+) bytes\)"),
        ("cp_other", r"\(size (\d+) -> (\d+) bytes\)"),
        ("rewrite_same_size", r"\(same size, modified \S+ -> \S+\)"),
    ],
)
def test_changed_shard_raises_and_the_process_keeps_working(tmp_path, mode, what):
    _check_changed(_run(mode, tmp_path), tmp_path, what)


def _check_changed(out: dict, tmp_path: Path, what: str) -> None:
    shard = tmp_path / "a" / "model.safetensors"
    for key in ("a_after", "a_again"):  # the model stays unusable, and says so each time
        err = out[key]
        assert isinstance(err, dict), f"{key}: generated {err} from a changed file"
        assert err["error"] == "CheckpointChangedError", err
        assert err["status"] == mi.CheckpointChangedError.status == 12
        assert f"checkpoint file {shard} changed on disk after it was loaded" in err["message"], err
        assert re.search(what, err["message"]), err
        assert "reload the model" in err["message"]
    # Another model in the same process, on an untouched copy, is unaffected.
    assert out["b_after"] == out["b_before"]
    assert out["a_before"] == out["b_before"]


_CUDA = pytest.mark.skipif(not (torch.cuda.is_available() and _native.cuda_usable()), reason="needs a CUDA GPU (runs on the H100 machine through scripts/gpu_check.sh)")


@pytest.mark.gpu
@_CUDA
@pytest.mark.parametrize(
    "mode, what",
    [
        ("truncate", r"\(size (\d+) -> (\d+) bytes\)"),
        ("rewrite_same_size", r"\(same size, modified \S+ -> \S+\)"),
    ],
)
def test_changed_shard_on_cuda_raises_and_the_process_keeps_working(tmp_path, mode, what):
    """On a GPU the experts reach the device from pinned or registered host
    pages, which cannot fault: the per-layer identity check is what catches
    the change, before a kernel reads stale or foreign bytes."""
    _check_changed(_run(mode, tmp_path, "cuda"), tmp_path, what)


@pytest.mark.gpu
@_CUDA
def test_unlinked_shard_on_cuda_keeps_generating_the_same_tokens(tmp_path):
    out = _run("unlink", tmp_path, "cuda")
    assert out["a_after"] == out["a_before"] == out["a_again"]
    assert out["b_after"] == out["b_before"] == out["a_before"]


def test_unlinked_shard_keeps_generating_the_same_tokens(tmp_path):
    """The mapping keeps the deleted file's pages alive: nothing changed."""
    out = _run("unlink", tmp_path)
    assert out["a_after"] == out["a_before"] == out["a_again"]
    assert out["b_after"] == out["b_before"] == out["a_before"]


def test_no_torch_tensor_views_the_checkpoint_file(tmp_path):
    """Torch reading a view of the file's mapping after a truncation dies
    with SIGBUS that nothing can catch: from_pretrained copies the dense
    weights out, so the only mapping of the shard left is the engine's
    (read-only, shared, read under its guard)."""
    m = mi.from_pretrained(builtin_model_dir(), device_memory="2MiB")
    try:
        st = (builtin_model_dir() / "model.safetensors").stat()
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
        maps = [line.split() for line in open("/proc/self/maps")]
        perms = [p[1] for p in maps if len(p) >= 6 and p[3] == dev and p[4] == str(st.st_ino)]
        assert perms == ["r--s"], perms
    finally:
        m.close()


def test_status_code_agrees_with_the_header():
    header = (ROOT / "capi" / "moe_infinity.h").read_text()
    codes = {name: int(v) for name, v in re.findall(r"(?m)^#define (MOE_\w+) (\d+)", header)}
    assert codes["MOE_ERR_CHECKPOINT_CHANGED"] == mi.CheckpointChangedError.status
    exc = error_for_status(codes["MOE_ERR_CHECKPOINT_CHANGED"], "store: checkpoint file x changed on disk")
    assert type(exc) is mi.CheckpointChangedError
    assert isinstance(exc, mi.MoEInfinityError)
    assert "CheckpointChangedError" in mi.__all__
