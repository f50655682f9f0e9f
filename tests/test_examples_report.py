"""The examples of the report's ecosystem pieces (compile, downstream tasks, sharing), run with a small budget."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.real_model


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_example_compile_model():
    out = _run("examples/compile_model.py", "--backend", "aot_eager", "--tokens", "24")
    assert "one graph, same logits: OK" in out


@pytest.mark.slow
def test_example_downstream_tasks():
    out = _run("examples/downstream_tasks.py", "--limit", "4", "--eval-tokens", "256", "--calibration-tokens", "256",
               "--tasks", "hfa_lastword,hfa_passkey_256")
    header = next(line for line in out.splitlines() if line.startswith("model "))   # lm-eval prints before it
    assert "hfa_lastword acc" in header and "hfa_passkey_256 exact_match" in header and "bits/byte" in header
    assert "smollm2-135m mla r=160 d_r=32" in out


def test_example_share_checkpoint(tmp_path):
    out = _run("examples/share_checkpoint.py", "--eval-tokens", "128", "--out", str(tmp_path / "shared"))
    assert "carries 1 record(s): gqa" in out and "pipeline('text-generation')" in out
    card = (tmp_path / "shared" / "README.md").read_text()
    assert "| model | ppl | Δppl |" in card and "smollm2-135m gqa kv=1 mean" in card
