"""GQA on the real SmolLM2-135M (3 -> 1 KV heads): the methods rank as they should, training-free, on a small budget."""

import pytest

from hf_efficient_attn.conversions import convert
from hf_efficient_attn.eval import kv_cache_bytes, load_model, load_text, perplexity

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_smollm2_3_to_1_pca_beats_aligned_beats_mean_training_free():
    model, tok = load_model("smollm2-135m")
    calibration = load_text(None, split="calibration")
    ppl = {"original": perplexity(model, tok, None, context_length=512, max_tokens=512, progress=False).ppl}
    for method in ("mean", "aligned", "pca"):
        new = convert(model, "gqa", num_kv_heads=1, method=method, calibration=calibration, tokenizer=tok,
                      calibration_tokens=512)
        ppl[method] = perplexity(new, tok, None, context_length=512, max_tokens=512, progress=False).ppl
        assert kv_cache_bytes(new, tokens=64) * 3 == kv_cache_bytes(model, tokens=64)
        lost = new.hfa_conversions[-1].get("energy_lost")
        if lost:
            assert lost[f"keys_{method}"] < lost["keys_mean"] and lost[f"values_{method}"] < lost["values_mean"]
    # measured on 2048 tokens: original 16.4, mean ~3e4, aligned ~1e3, pca ~180 (3 -> 1 is drastic untrained)
    assert ppl["original"] < ppl["pca"] < ppl["aligned"] / 2 < ppl["mean"] / 4, ppl
