"""kernels/bench_linear.py runs end to end (tiny shapes, Triton interpreter) so it cannot rot between GPU runs."""

import importlib.util
import json
import os

import pytest
import torch

pytest.importorskip("triton")

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "bench_linear.py")


@pytest.mark.triton_interpret
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU, kernels/gpu_check.sh runs the real benchmark")
def test_bench_linear_dry_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_linear", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(["--dry-run", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["env"]["dry_run"]
    assert {(r["kind"], r["gated"]) for r in result["rows"]} == {(k, g) for k in ("prefill", "decode")
                                                                 for g in (False, True)} | {("hybrid", False)}
    for r in result["rows"]:
        err = r.get("rel_err_vs_torch_chunked", r.get("rel_err_vs_torch_recurrent"))
        assert err < 1.6e-2  # bf16: the kernels computed the same attention as the PyTorch forms
        assert (r.get("triton_fwd_ms") or r.get("triton_ms")) > 0
        if r["kind"] == "prefill":
            assert r["triton_bwd_ms"] > 0 and r["torch_chunked_bwd_ms"] > 0 and r["softmax_flash_bwd_ms"] > 0
    table = capsys.readouterr().out
    assert "| prefill" in table and "| decode" in table and "| hybrid" in table and "DRY RUN" in table
