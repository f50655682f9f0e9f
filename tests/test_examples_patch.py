"""The README's patch claims, run as scripts with a small budget (so they cannot rot)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.real_model
def test_example_patch_model():
    out = _run("examples/patch_model.py", "--new-tokens", "8")
    assert "identical greedy continuation: True" in out


@pytest.mark.real_model
def test_example_patch_speed(tmp_path):
    out = _run("examples/patch_speed.py", "--tokens", "256", "--repeats", "1", "--json", str(tmp_path / "s.json"))
    assert "ratio" in out and (tmp_path / "s.json").exists()


def test_bench_reference_memory_small(tmp_path):
    out = _run("kernels/bench_reference_memory.py", "--seq", "4096", "--heads", "2", "--head-dim", "32",
               "--block-q", "128", "--block-k", "256", "--json", str(tmp_path / "m.json"))
    import json
    res = json.loads((tmp_path / "m.json").read_text())
    assert res["finite"] and res["peak_fraction_of_sxs"] < 0.5, out


def test_cli_patch_check_errors_are_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hf_efficient_attn.cli", "patch-check", "no-such-model-dir/x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hfa patch-check: error:") and "smollm2-135m" in last
    assert "Traceback" not in proc.stderr
