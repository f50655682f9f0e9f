"""examples/ring_attention.py under torchrun on 2 CPU processes with the bundled SmolLM2: ring logits equal one
process's, the perplexity is the same, and greedy decoding over the split cache equals transformers' generate."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_ring_attention_example_under_torchrun(tmp_path):
    out = tmp_path / "ring.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "examples" / "ring_attention.py"), "--tokens", "512", "--gen-prompt", "64", "--new-tokens", "4",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["tokens"] == 512
    assert res["max_abs_logit_diff"] <= res["tolerance"] and res["ok"] is True
    assert abs(res["ppl_ring"] - res["ppl_single"]) <= 1e-4 * res["ppl_single"]
    assert res["generate_equal"] is True
    assert res["bytes_sent_per_rank"] > 0
    assert "equal to one process" in proc.stdout
