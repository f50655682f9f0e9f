"""The bundled real models: perplexity against independent computations, KV bytes, `hfa demo`, the example.

Small token budgets: each test takes seconds to tens of seconds on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_efficient_attn.eval import BUNDLED_MODELS, kv_cache_bytes, load_model, load_text, perplexity
from hf_efficient_attn.eval.perplexity import tokenize_stream

from .test_perplexity import bos_nll, guide_nll

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.real_model]


def _need(name):
    import importlib.util
    if importlib.util.find_spec(BUNDLED_MODELS[name].module) is None:
        pytest.fail(f"the real-model tests need {BUNDLED_MODELS[name].distribution}: {BUNDLED_MODELS[name].install}")


@pytest.fixture(scope="module")
def smollm2():
    _need("smollm2-135m")
    return load_model("smollm2-135m")


def test_smollm2_matches_independent_computation_both_protocols(smollm2):
    """Our perplexity vs the transformers guide's loop on a whole-text tokenization (no shared code
    but the model), disjoint and strided, to 1e-4 relative."""
    model, tok = smollm2
    assert model.name_or_path == "smollm2-135m" and model.config.num_key_value_heads == 3
    text = load_text(None)
    ids = torch.tensor([tok("\n\n".join(text.documents), add_special_tokens=False).input_ids[:512]])
    for stride in (None, 64):
        ref, n = guide_nll(model, ids, 128, 128 if stride is None else stride)
        res = perplexity(model, tok, text, context_length=128, stride=stride, max_tokens=512, progress=False)
        assert res.tokens == n and res.protocol["bos_per_window"] is False
        assert abs(res.nll - ref) <= 1e-4 * ref, (stride, res.nll, ref)
        # pinned baselines (fp32, CPU): a broken GGUF conversion or tokenizer would move these
        expected = {None: 28.568, 64: 22.384}[stride]
        assert res.ppl == pytest.approx(expected, rel=2e-3), (stride, res.ppl)


def test_smollm2_piecewise_tokenization_equals_whole_text(smollm2):
    _, tok = smollm2
    text = load_text(None)
    assert tokenize_stream(tok, text).tolist() == tok("\n\n".join(text.documents), add_special_tokens=False).input_ids


def test_smollm2_kv_cache_bytes(smollm2):
    model, _ = smollm2
    # 30 layers x (K, V) x 3 KV heads x head_dim 64 x 4 bytes
    assert kv_cache_bytes(model, tokens=100) == 30 * 2 * 3 * 64 * 4 * 100


def test_gemma3_bos_protocol_and_sliding_cache():
    _need("gemma3-270m")
    model, tok = load_model("gemma3-270m")
    stream = tokenize_stream(tok, load_text(None), max_tokens=150).tolist()
    ref, n = bos_nll(model, stream, tok.bos_token_id, 64, None)
    res = perplexity(model, tok, None, context_length=64, max_tokens=150, progress=False)
    assert res.protocol["bos_per_window"] is True and res.tokens == n == 150
    assert abs(res.nll - ref) <= 1e-4 * ref
    # 3 full layers hold every token, 15 sliding layers their last 511; 2 x 1 KV head x 256 x 4 bytes each
    per = 2 * 1 * 256 * 4
    total = kv_cache_bytes(model, tokens=600)
    kv = per * (3 * 600 + 15 * 511)
    assert kv <= total <= kv + 15 * 8  # + one 8-byte window-size tensor per sliding layer


def test_minilm_is_an_encoder():
    _need("minilm-l6")
    model, tok = load_model("minilm-l6")
    assert type(model).__name__ == "BertModel" and tok("hello")["input_ids"][0] == tok.cls_token_id
    with pytest.raises(ValueError, match="keeps no KV cache"):
        kv_cache_bytes(model, tokens=8)
    with pytest.raises(TypeError, match="causal language model"):
        perplexity(model, tok, "some text here", progress=False)


def test_hfa_demo_quick_runs_every_method(tmp_path, capsys):
    """`hfa demo --quick` (what CI runs): the patch and ring checks pass and the table has a row for every method of
    DEMO_CONVERSIONS — every conversion, sparse pattern and KV policy — after the base model, with the Pareto plot
    and its points written."""
    from hf_efficient_attn.cli import main
    from hf_efficient_attn.eval import report

    _need("smollm2-135m")
    rc = main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    payload = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert payload["patch_check"]["ok"] is True and payload["ring_check"]["ok"] is True
    names = [m["model"] for m in payload["models"]]
    assert names == ["smollm2-135m"] + [f"smollm2-135m {s.label}" for s in report.demo_conversions()]
    assert all(f"smollm2-135m {s.label}" in out for s in report.demo_conversions())
    base, rows = payload["models"][0], payload["models"][1:]
    assert base["protocol"]["data"] == "python-docs:eval" and base["kv_bytes_per_token"] == 46080
    assert base["kv_long_bytes_per_token"] == 46080 and base["bits_per_byte"] > 0 and base["stream_ppl"] > 1
    assert all(m["delta_ppl"] is not None and m["bits_per_byte"] > 0 for m in rows)
    kv_rows = [m for m in rows if m["family"] == "kv"]
    assert kv_rows and all(m["approximate"] and m["stream_ppl"] > 1 for m in kv_rows)
    assert all(p["repeats"] == 3 for m in payload["models"] for p in m["speed"])   # medians of 3 rounds
    assert {m["family"] for m in rows} >= {"gqa", "mla", "linear", "mamba2", "adaptive_span", "duo", "longformer",
                                           "sparse", "kv"}
    learned = [m for m in rows if m["family"] in ("adaptive_span", "duo", "longformer")]
    assert all(m["kv_long_bytes_per_token"] < base["kv_long_bytes_per_token"] for m in learned)   # the reach only
    enc = payload["encoder_check"]                # the encoder-only conversion, on MiniLM
    assert enc["approximate"] and enc["k"] == 64 and 0 < enc["cosine_after"] <= 1 and enc["heal_tokens"] == 2048
    assert "linformer k=64 (approximate)" in out
    assert [p["label"] for p in payload["pareto"]] == names and payload["pareto_frontier"][0] != names[0]
    assert (tmp_path / "demo" / "ppl_vs_kv_bytes.png").stat().st_size > 10_000
    assert payload["seconds"] < 600


def test_example_evaluate_perplexity(tmp_path):
    _need("smollm2-135m")
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "evaluate_perplexity.py"), "--max-tokens", "128",
                           "--context", "64", "--stride", "32", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["disjoint"]["ppl"] > res["stride 32"]["ppl"] > 1  # more context per token reads lower
    assert res["kv_cache_bytes"] == 46080 * 64
    assert "bytes/token" in proc.stdout
