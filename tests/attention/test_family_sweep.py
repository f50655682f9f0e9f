"""The family sweep: every causal-LM family of the installed transformers, eager vs ``hfa.patch`` (auto).

One test per family (tiny random model, fp32 logits on a full and a left-padded row <= 1e-4, greedy cached
generation identical): it fails on a family that is silently different or crashes where eager runs. A
family we cannot build small, or whose code does not dispatch through the registry, passes with its reason
in the table (``python -m hf_efficient_attn.eval.families`` prints it); the last test checks that such
families stay few, so a broken tiny-config builder cannot turn the sweep into a list of skips.
"""

import pytest

from hf_efficient_attn.eval import families as fam

FAMILIES = fam.causal_lm_families()
RESULTS: dict[str, fam.FamilyResult] = {}

# Families whose special cases the sweep must cover (present in both transformers versions CI runs, except
# where noted): plain, windows, softcap, sinks, MLA, a window mask without the kwarg (phimoe), a mask the
# layer rewrites (doge), per-query sinks + position bias (inkling2_text), an unknown kwarg (hy_v4, 5.24).
MUST_BE_EXACT = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt_oss", "phi3", "deepseek_v3",
                 "phimoe", "doge", "inkling2_text", "hy_v4", "bamba", "jamba"]


def _result(model_type):
    if model_type not in RESULTS:
        RESULTS[model_type] = fam.check_family(model_type, FAMILIES[model_type])
    return RESULTS[model_type]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_is_exact_or_refused(model_type):
    r = _result(model_type)
    assert r.status in ("exact", "refused", "not dispatching", "skipped"), f"{model_type}: {r.status}: {r.reason}"
    if r.status != "exact":
        assert r.reason, f"{model_type} is {r.status} without a reason"


@pytest.mark.parametrize("model_type", MUST_BE_EXACT)
def test_special_families_are_exact(model_type):
    if model_type not in FAMILIES:  # only in newer transformers: the registry-level tests cover the mechanism
        assert model_type in ("hy_v4", "inkling2_text", "doge"), f"{model_type} vanished from transformers"
        return
    r = _result(model_type)
    assert r.status == "exact", f"{model_type}: {r.status}: {r.reason}"


def test_few_families_are_skipped():
    results = [_result(m) for m in FAMILIES]
    counts = fam.counts(results)
    built = counts.get("exact", 0) + counts.get("refused", 0)
    assert built >= 0.8 * (built + counts.get("skipped", 0)), fam.format_table(results)
    assert "exact" in fam.format_table(results).splitlines()[-1]


def test_sweep_cli_prints_the_table(capsys, tmp_path):
    out = tmp_path / "sweep.json"
    assert fam.main(["--only", "llama,phimoe", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "phimoe" in text and "2 families: 2 exact" in text
    import json
    assert [r["model_type"] for r in json.loads(out.read_text())] == ["llama", "phimoe"]
    with pytest.raises(ValueError, match="unknown model type"):
        fam.sweep(["no_such_family"])
