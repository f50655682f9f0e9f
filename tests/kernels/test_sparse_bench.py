"""kernels/bench_sparse.py runs end to end (tiny shapes: CPU gather path, Triton interpreter) so it cannot rot
between GPU runs."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("triton")

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "bench_sparse.py")


@pytest.mark.triton_interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, kernels/gpu_check.sh runs the real benchmark")
def test_bench_sparse_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_sparse", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--dry-run", "--json", str(out)])
    result = json.loads(out.read_text())
    assert {r["kind"] for r in result["rows"]} == {"cpu", "prefill", "decode"} and result["env"]["dry_run"]
    for r in result["rows"]:
        assert 0 < r["density"] < 1
        err = r.get("rel_err_vs_spec", r.get("rel_err_vs_reference"))
        assert err < (1e-5 if r["kind"] == "cpu" else 1.6e-2)  # fp32 on CPU, bf16 kernels
    table = capsys.readouterr().out
    assert "| CPU causal" in table and "| GPU causal" in table and "| GPU decode" in table and "DRY RUN" in table
