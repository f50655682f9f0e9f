"""kernels/bench_attention.py runs end to end (tiny shapes, Triton interpreter) so it cannot rot between GPU runs."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("triton")

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "bench_attention.py")


@pytest.mark.triton_interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, kernels/gpu_check.sh runs the real benchmark")
def test_bench_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--dry-run", "--json", str(out)])
    result = json.loads(out.read_text())
    kinds = {r["kind"] for r in result["rows"]}
    assert kinds == {"prefill", "decode"} and result["env"]["dry_run"]
    for r in result["rows"]:
        assert r["sdpa_backend"] == "math"
        assert r["rel_err_vs_sdpa"] < 1.6e-2  # bf16: the kernels computed the same attention as SDPA
        assert (r.get("triton_fwd_ms") or r.get("triton_ms")) > 0
    table = capsys.readouterr().out
    assert "| prefill" in table and "| decode" in table and "DRY RUN" in table
