"""The command line: `python -m moe_infinity generate|selftest|version|bench`."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import tiny_models as tm


def _run(args, tmp_path, **env):
    e = dict(os.environ, MOE_INFINITY_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "moe_infinity", *args], capture_output=True, text=True, timeout=600, env=e)


def test_generate_with_the_builtin_model_offline(tmp_path):
    out = _run(["generate", "--prompt", "Hello", "--max-new-tokens", "8"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello")
    assert "8 tokens in" in out.stderr and "hit rate" in out.stderr
    assert "builtin_model" in out.stderr, "the packaged trained model is the default"
    assert not (tmp_path / "cache").exists(), "nothing is written or downloaded"
    again = _run(["generate", "--prompt", "Hello", "--max-new-tokens", "8", "--policy", "lru", "--no-prefetch"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.stdout, "greedy decoding is deterministic across policies"


def test_generate_with_a_model_directory(tmp_path):
    path = tm.save(tm.build("qwen3_moe"), tmp_path / "m")
    tm.write_tokenizer(path)
    out = _run(["generate", "--model", str(path), "--prompt", "abc", "--max-new-tokens", "4", "--device-memory", "1MiB"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("abc")


def test_generate_reports_errors_cleanly(tmp_path):
    out = _run(["generate", "--model", str(tmp_path / "missing" / "x"), "--prompt", "a"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().endswith("does not exist")
    assert "moe-infinity: error: model directory" in out.stderr
    assert "Traceback" not in out.stderr


def test_selftest_and_version(tmp_path):
    out = _run(["selftest"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "mismatches 0" in out.stdout
    out = _run(["version"], tmp_path)
    assert out.returncode == 0 and "engine 0.1.0" in out.stdout


def test_bench_runs_the_decode_harness_from_any_install(tmp_path):
    import json

    res = tmp_path / "b.json"
    out = _run(["bench", "--preset", "tiny", "--device", "cpu", "--device-memory", "300KiB", "--prompt-len", "8",
                "--decode", "3", "--no-ablations", "--out", str(res)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = json.loads(res.read_text())
    assert row["system"] == "moe_infinity" and row["preset"] == "tiny" and row["decoded_tokens"] == 3
    assert row["decode_s_per_token"] > 0 and 0 <= row["hit_rate"] <= 1 and row["host"]["cpus"] >= 1
    # The default output is a table: a header, a rule, one line per row.
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[:3] == ["system", "experts", "policy"] and "s/token" in lines[0] and "hit rate" in lines[0]
    assert set(lines[1].replace(" ", "")) == {"-"} and len(lines) == 3
    assert lines[2].startswith("moe_infinity") and f"{row['decode_s_per_token']:.4f}" in lines[2]
    as_json = _run(["bench", "--preset", "tiny", "--device", "cpu", "--device-memory", "300KiB", "--prompt-len", "8",
                    "--decode", "2", "--no-ablations", "--json"], tmp_path)
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    (line,) = [ln for ln in as_json.stdout.splitlines() if ln.strip()]
    assert json.loads(line)["decoded_tokens"] == 2
    usage = _run(["bench", "--preset", "no-such-shape"], tmp_path)
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    listed = _run(["--help"], tmp_path)
    assert "bench" in listed.stdout


def test_bench_help_examples_run_from_an_installed_package(tmp_path):
    """Every example in ``bench --help`` is a ``python -m moe_infinity bench``
    command whose options the parser accepts (none needs a checkout)."""
    import shlex

    from moe_infinity.bench import main

    out = _run(["bench", "--help"], tmp_path)
    assert out.returncode == 0
    examples = [ln.split("#")[0].strip() for ln in out.stdout.splitlines() if ln.strip().startswith("python ")]
    assert len(examples) >= 3
    for ex in examples:
        words = shlex.split(ex)
        assert words[:4] == ["python", "-m", "moe_infinity", "bench"], ex
        with pytest.raises(SystemExit) as parsed:  # --help after the example's options: parses them, runs nothing
            main(words[4:] + ["--help"])
        assert parsed.value.code == 0, ex


def test_generate_takes_a_device(tmp_path):
    import torch

    out = _run(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cuda"], tmp_path)
    if torch.cuda.is_available():
        assert out.returncode == 0, out.stderr[-3000:]
        assert "on cuda:0" in out.stderr
    else:
        assert out.returncode != 0 and "no usable GPU" in out.stderr and "Traceback" not in out.stderr
    cpu = _run(["generate", "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"], tmp_path)
    assert cpu.returncode == 0 and "on cpu" in cpu.stderr


def test_serve_is_a_command_and_reports_errors_cleanly(tmp_path):
    listed = _run(["--help"], tmp_path)
    assert "serve" in listed.stdout
    usage = _run(["serve", "--help"], tmp_path)
    assert usage.returncode == 0
    for opt in ("--host", "--port", "--max-batch", "--max-queue", "--shutdown-timeout", "--device-memory", "--policy", "--trace"):
        assert opt in usage.stdout, opt
    out = _run(["serve", "--model", str(tmp_path / "missing" / "x"), "--port", "0"], tmp_path)
    assert out.returncode == 2 and "moe-infinity: error: model directory" in out.stderr
    assert "Traceback" not in out.stderr
