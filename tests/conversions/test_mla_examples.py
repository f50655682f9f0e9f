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


@pytest.mark.parametrize("model, model_type", [("tiny", "hfa_mla_llama"), ("tiny-gemma3", "hfa_mla_gemma3")])
def test_example_convert_mla_tiny(model, model_type):
    out = _run("examples/convert_mla.py", "--model", model)
    full = float(out.split("max |logits - original| = ")[1].split()[0])
    assert full < 1e-4, out
    assert "with the latent cache == without a cache: True" in out
    assert "bit-identical logits: True" in out and f"'{model_type}'" in out
    line = next(x for x in out.splitlines() if x.startswith("r="))
    measured = float(line.split("KV cache ")[1].split()[0])
    expected = float(line.split("/ tokens = ")[1].split()[0].rstrip(";"))
    assert abs(measured - expected) < 1, line          # Gemma's cache also holds an int64 window size per layer
    if model == "tiny-gemma3":
        assert "tokens cached per layer [15, 64, 15]" in line


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


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    """A 3-layer Gemma3 (sliding, full, sliding; window 128; 4 query heads, 1 KV head) with Gemma 3's real tokenizer
    and vocabulary, random weights perturbed so the logits depend on the attention."""
    import torch
    import transformers

    from hf_efficient_attn.eval.models import resolve_bundled_checkpoint

    tok = transformers.AutoTokenizer.from_pretrained(resolve_bundled_checkpoint("gemma3-270m"))
    cfg = transformers.Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    path = tmp_path_factory.mktemp("tiny-gemma3")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow
@pytest.mark.real_model
def test_recipe_mla_gemma3_on_a_tiny_gemma3(tiny_gemma3, tmp_path):
    """Every step of the Gemma3 recipe (convert, heal, evaluate past the window, report) with a tiny budget; the
    full-rank point must score the original's perplexity."""
    out = _run("conversions/mla_gemma3.py", "--model", tiny_gemma3, "--ranks", "32:32,8:4", "--eval-tokens", "512",
               "--context", "256", "--calibration-tokens", "512", "--heal", "8:4", "--heal-tokens", "512",
               "--heal-seq-len", "64", "--out", str(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    base, full, low, healed = rows
    assert healed["model"] == "mla r=8 d_r=4 healed" and healed["healed_tokens"] >= 512
    assert base["tokens"] == full["tokens"] == low["tokens"] == healed["tokens"]
    # 256 probe tokens: the full layer caches 256, the sliding ones 127 each; + one int64 window size per sliding layer
    per_token = lambda values: ((256 + 2 * 127) * values * 4 + 2 * 8) / 256
    assert base["kv_bytes_per_token"] == per_token(2 * 32)
    assert [full["kv_bytes_per_token"], low["kv_bytes_per_token"]] == [per_token(64), per_token(12)]
    assert abs(full["ppl"] / base["ppl"] - 1) < 1e-4, (full["ppl"], base["ppl"])      # full rank is lossless
    assert low["ppl"] > full["ppl"] * 1.001, out
    assert "protocol: held-out" in out
