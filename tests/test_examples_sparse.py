"""examples/sparse_patterns.py, run as a script with a small budget (so it cannot rot): every pattern's density
printed beside its accuracy against dense, and the exact control equal to dense."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}  # this checkout's package
    proc = subprocess.run([sys.executable, "examples/sparse_patterns.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _check(rows):
    names = [r["pattern"] for r in rows]
    assert names[0] == "dense" and len(names) == 9
    for prefix in ("full", "streaming", "longformer", "dilated", "vertical_slash", "top_p", "lsh"):
        assert any(n.startswith(prefix) for n in names), prefix
    by = {r["pattern"].split("_")[0]: r for r in rows}
    assert by["full"]["density"] == 1.0 and by["full"]["max_abs_logit_diff"] <= 1e-3  # the exact control
    assert by["streaming"]["density"] < 1 and by["streaming"]["kind"].startswith("approximate")
    assert all(0 < r["density"] <= 1 and r["ppl"] > 0 for r in rows)


def test_example_sparse_patterns_tiny(tmp_path):
    out = _run("--model", "tiny", "--tokens", "128", "--block", "16", "--json", str(tmp_path / "s.json"))
    assert "top1" in out and "density" in out
    _check(json.loads((tmp_path / "s.json").read_text())["rows"])


@pytest.mark.real_model
@pytest.mark.slow  # about 40 s on 2 cores: SmolLM2 nine times over 256 tokens
def test_example_sparse_patterns_smollm2(tmp_path):
    _run("--tokens", "256", "--block", "16", "--json", str(tmp_path / "s.json"))
    _check(json.loads((tmp_path / "s.json").read_text())["rows"])


@pytest.mark.real_model
@pytest.mark.slow  # about 30 s on 2 cores
def test_example_sparse_long_context_smollm2(tmp_path):
    """The README's long-context table script at a small budget: dense first, each pattern beside it with its
    density, ppl per context, per-layer error and passkey accuracy; the full control equals dense."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "examples/sparse_long_context.py", "--contexts", "128,256", "--max-tokens",
                           "512", "--passkey", "256", "--sparse", "full:block=16", "--sparse",
                           "top_p:gamma=0.9,block=16", "--json", str(tmp_path / "l.json")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| dense (exact) |" in proc.stdout and "top_p_g0.9_b16 (approx.)" in proc.stdout
    dense, full, top = json.loads((tmp_path / "l.json").read_text())["rows"]
    for ctx in ("128", "256"):
        assert abs(full["ppl"][ctx] / dense["ppl"][ctx] - 1) < 1e-4 and full["density"][ctx] == 1.0
        assert top["density"][ctx] < 1 and top["ppl"][ctx] != dense["ppl"][ctx]
    assert full["layer_error"]["256"] < 1e-4 < top["layer_error"]["256"]
    assert set(dense["passkey"]) == {"256"} and dense["passkey"]["256"] >= 0.6
