"""examples/kv_policies.py, run as a script with a small budget on the bundled model (so it cannot rot): each
policy's streaming-protocol perplexity beside the full cache's, passkey, cache bytes, and streaming past a prompt
with constant cache bytes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.real_model
def test_example_kv_policies_small(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "examples/kv_policies.py", "--contexts", "128", "--fractions", "0.5",
                           "--eval-tokens", "4", "--passkey-depths", "0.5", "--speed-contexts", "256",
                           "--past", "128:32", "--json", str(tmp_path / "kv.json")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "kv.json").read_text())
    names = [r["policy"] for r in res["rows"]]
    assert [n.split("_")[0] for n in names] == ["streaming", "snapkv", "quest"]
    for r in res["rows"]:
        assert r["ppl"] > 0 and r["ppl_full"] > 0 and r["passkey"] in (0.0, 1.0)
    by = {r["policy"].split("_")[0]: r for r in res["rows"]}
    assert by["streaming"]["cache_bytes"] < by["streaming"]["cache_bytes_full"]
    assert by["quest"]["cache_bytes"] >= by["quest"]["cache_bytes_full"]  # Quest bounds reads, not memory
    assert res["past"]["bytes_2k"] == res["past"]["bytes_16k"]
    assert res["past"]["generated"] == 32 and 0 < res["past"]["generate_cache_bytes"] <= res["past"]["bytes_2k"]
    (speed,) = res["speed"]
    assert speed["context"] == 256 and speed["full_tok_s"] > 0
    assert [n.split("_")[0] for n in speed["policies"]] == ["streaming", "snapkv", "quest"]
    assert all(v["tok_s"] > 0 and v["ratio"] > 0 for v in speed["policies"].values())
