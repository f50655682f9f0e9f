"""kernels/bench_ring.py runs end to end on tiny shapes (W = 1, 2), so the README's memory table cannot rot."""

import json
import os
import sys

import pytest

KERNELS = os.path.join(os.path.dirname(__file__), "..", "..", "kernels")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark reads /proc (Linux only)")
def test_bench_ring_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.abspath(KERNELS))  # spawned ranks import the module by name
    import bench_ring
    out = tmp_path / "bench.json"
    bench_ring.main(["--dry-run", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["world"], r["mode"]) for r in rows] == [(1, "ring"), (2, "ring"), (2, "allgather")]
    for r in rows:
        assert r["sent"] == r["analytic"]              # what a rank sent is exactly the analytic volume
        assert r["max_abs_diff_vs_w1"] < 1e-5          # the same sequence on 1 or 2 ranks: the same output
        assert r["peak_bytes"] > 0
    assert rows[1]["sent"] > 0 and rows[0]["sent"] == 0
    assert "| 2 | ring |" in capsys.readouterr().out
