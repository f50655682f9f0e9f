"""The MLA example and recipe, run as scripts with small budgets (so they cannot rot)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args, timeout=900):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def test_example_convert_mla_tiny():
    out = _run("examples/convert_mla.py")
    full = float(out.split("max |logits - original| = ")[1].split()[0])
    assert full < 1e-4, out
    assert "with the latent cache == without a cache: True" in out
    assert "bit-identical logits: True" in out and "'hfa_mla_llama'" in out
    line = next(x for x in out.splitlines() if x.startswith("r="))
    measured = float(line.split("KV cache ")[1].split()[0])
    expected = float(line.split("x 4 = ")[1].split(";")[0])
    assert measured == expected, line


@pytest.mark.slow
@pytest.mark.real_model
def test_recipe_mla_smollm2_small_budget(tmp_path):
    out = _run("conversions/mla_smollm2.py", "--ranks", "224:32,160:32,96:16", "--eval-tokens", "512",
               "--calibration-tokens", "1024", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    base, *mla = rows
    assert [r["kv_bytes_per_token"] for r in mla] == [(r + d) * 30 * 4 for r, d in ((224, 32), (160, 32), (96, 16))]
    assert base["kv_bytes_per_token"] == 2 * 3 * 64 * 30 * 4
    assert mla[0]["ppl"] < mla[1]["ppl"] < mla[2]["ppl"], out     # more rank, lower perplexity
    assert "ppl" in out
