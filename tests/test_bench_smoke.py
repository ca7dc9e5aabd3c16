"""Smoke test of the decode benchmark harness on a tiny CPU configuration
(the harness runs, the JSON carries every field; no timing asserts)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FIELDS = {
    "system", "preset", "policy", "prefetch", "decode_s_per_token", "ttft_s", "hit_rate", "misses_per_token",
    "bytes_moved_per_token", "stall_s_per_token", "overhead_ms_per_token", "compute_s_per_token", "floor_s_per_token",
    "ratio_to_floor", "slots", "expert_bytes",
}


def test_decode_harness_tiny_cpu(tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--preset", "tiny", "--device", "cpu",
           "--device-memory", "300KiB", "--prompt-len", "12", "--decode", "6", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["prefetch"]) for r in rows] == [("priority", True), ("lru", True), ("lfu", True), ("priority", False)]
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["decoded_tokens"] == 6
        assert 0.0 <= r["hit_rate"] <= 1.0
        assert r["slots"] < 32, "the budget holds fewer experts than the model has"
        assert r["bytes_moved_per_token"] == r["misses_per_token"] * r["expert_bytes"] or r["prefetch"]
