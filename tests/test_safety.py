"""Nothing lost, nothing silently wrong (issue 12), on tiny models built from configs:

1. overwrite replaces only one of our checkpoints (never the user's files, the working directory or home);
2. NaN never passes through convert, distill or save;
3. save -> load is bit-identical in fp32/bf16/fp16 for every conversion and a cast model, and load names a
   changed or truncated file;
4. our errors are one line, bugs keep their traceback, Ctrl-C exits 130, hints speak the user's language;
5. the CLI checks before it works, and a killed save's leftovers are cleaned by the next one.
Also (issue 11): LoRA targets follow the conversion; only the main process of a multi-process run writes."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.cli import main
from hf_efficient_attn.conversions.distill import attention_linear_names
from hf_efficient_attn.conversions.io import BUFFERS_FILE, RECORD_FILE, is_main_process
from hf_efficient_attn.errors import (CheckpointError, HFAError, NonFiniteError, OptionError, OverwriteRefusedError,
                                      is_user_error)

from .conversions.conftest import random_ids
from .eval.tiny import TEXT, byte_tokenizer, tiny_llama
from .tiny_models import converted, make_model

ROOT = Path(__file__).resolve().parents[1]
GQA = ["--method", "gqa", "--set", "num_kv_heads=1", "--set", "method=mean", "--quiet"]
IDS = random_ids(2, 20)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def llama_dir(tmp_path):
    path = tmp_path / "llama"
    tiny_llama(heads=4, kv_heads=2, head_dim=8).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _error(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    return err[-1]


def _user_files(folder: Path) -> dict:
    (folder / "src").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes")
    (folder / "src" / "main.py").write_text("print('mine')")
    return _tree(folder)


def _tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_loading(monkeypatch):
    monkeypatch.setattr("hf_efficient_attn.eval.models.load_model",
                        lambda *a, **k: pytest.fail("loaded the model before refusing"))


# -- 1. overwrite replaces only one of our checkpoints -----------------------------------------------------

def test_overwrite_never_deletes_the_users_files(tmp_path, llama_dir, capsys, monkeypatch):
    mine = tmp_path / "existing"
    before = _user_files(mine)
    with pytest.raises(OverwriteRefusedError, match=r"refusing to overwrite .*existing: it has no hfa\.json"):
        hfa.save(make_model("llama"), mine, overwrite=True)
    _no_loading(monkeypatch)
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(mine), "--overwrite"])
    assert err.startswith(f"hfa convert: error: refusing to overwrite --out {mine}: it has no hfa.json")
    assert _tree(mine) == before
    # one of our checkpoints with the user's files added is not ours to delete either
    ours = hfa.save(make_model("llama"), tmp_path / "ours")
    (ours / "notes.txt").write_text("added by hand")
    with pytest.raises(OverwriteRefusedError, match="it holds notes.txt, which is not checkpoint files"):
        hfa.save(make_model("llama"), ours, overwrite=True)
    assert (ours / "notes.txt").read_text() == "added by hand"
    (ours / "notes.txt").unlink()
    hfa.save(make_model("llama", seed=1), ours, overwrite=True)          # a pure checkpoint is replaced
    assert torch.equal(_logits(hfa.load(ours)), _logits(make_model("llama", seed=1)))


def test_overwrite_refuses_the_working_directory_home_and_above(tmp_path, llama_dir, capsys, monkeypatch):
    work, home = tmp_path / "work", tmp_path / "home"
    before = _user_files(work)
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    model = make_model("llama")
    for path, rule in ((".", "it is the working directory"), (work, "it is the working directory"),
                       (tmp_path, "a folder above the working directory"), (home, "it is your home folder")):
        with pytest.raises(OverwriteRefusedError, match=rule):
            hfa.save(model, path, overwrite=True)
    _no_loading(monkeypatch)
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", ".", "--overwrite"])
    assert err.startswith("hfa convert: error: refusing to write to --out .: it is the working directory")
    assert _tree(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ["home", "llama", "work"]


# -- 2. NaN never passes ----------------------------------------------------------------------------------

def _poisoned(family="llama"):
    model = make_model(family)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3, 5] = float("nan")
    return model


@pytest.mark.parametrize("conversion, options", [
    ("gqa", {"num_kv_heads": 1, "method": "mean"}),
    ("gqa", {"num_kv_heads": 1, "method": "pca", "calibration": random_ids(4, 16)}),
    ("gqa", {"num_kv_heads": 1, "method": "aligned", "calibration": random_ids(4, 16)}),
    ("mla", {"kv_lora_rank": 8, "rope_dim": 4, "method": "weights"}),
    ("mla", {"kv_lora_rank": 8, "rope_dim": 4, "method": "attention", "calibration": random_ids(4, 16)}),
    ("linear", {"window": 4}),
])
def test_convert_refuses_non_finite_weights(conversion, options):
    with pytest.raises(NonFiniteError, match=r"the model to convert has non-finite weights: parameter "
                                             r"model\.layers\.1\.self_attn\.k_proj\.weight holds 1 NaN/inf value"):
        hfa.convert(_poisoned(), conversion, **options)


def test_distill_stops_at_the_first_non_finite_loss_and_keeps_the_student(monkeypatch):
    teacher = make_model("llama")
    student = hfa.convert(teacher, "gqa", num_kv_heads=1, method="mean")
    clean = {n: p.clone() for n, p in student.state_dict().items()}
    ids = random_ids(16, 16, seed=11)
    bad_teacher = _poisoned()
    with pytest.raises(NonFiniteError, match="the teacher has non-finite weights: parameter model.layers.1"):
        hfa.distill(student, bad_teacher, ids, seq_len=16, batch_size=2, max_tokens=64, progress=False)
    assert all(torch.equal(p, clean[n]) for n, p in student.state_dict().items())
    # a loss that turns NaN mid-run (e.g. an overflow): stopped before it is applied, weights of the last finite step
    distill_mod = sys.modules["hf_efficient_attn.conversions.distill"]    # (the package's `distill` is the function)

    real, calls, seen = distill_mod.logits_loss, [0], {}

    def flaky(s, t, input_ids, **kw):
        calls[0] += 1
        loss, metrics = real(s, t, input_ids, **kw)
        return (loss * float("nan") if calls[0] == 3 else loss), metrics

    monkeypatch.setitem(distill_mod.STAGES, "logits", distill_mod.Stage("logits", flaky, "flaky"))
    on_step = lambda step, m: seen.update({step: {n: p.clone() for n, p in student.state_dict().items()}})
    with pytest.raises(NonFiniteError, match=r"stopped at step 3 of 4: the loss is nan .* the student keeps the "
                                             r"weights of step 2"):
        hfa.distill(student, teacher, ids, seq_len=16, batch_size=2, max_tokens=4 * 32, lr=1e-2, on_step=on_step,
                    progress=False)
    assert sorted(seen) == [1, 2]
    assert all(torch.equal(p, seen[2][n]) for n, p in student.state_dict().items())
    assert any(not torch.equal(p, clean[n]) for n, p in student.state_dict().items())     # it did train 2 steps
    assert hfa.conversions.io.first_non_finite(student) is None


def test_save_refuses_non_finite_weights_unless_told(tmp_path):
    with pytest.raises(NonFiniteError, match="pass allow_non_finite=True"):
        hfa.save(_poisoned(), tmp_path / "nan")
    assert not list(tmp_path.iterdir())
    hfa.save(_poisoned(), tmp_path / "nan", allow_non_finite=True)
    assert (tmp_path / "nan" / RECORD_FILE).exists()


def test_cli_nan_model_is_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "bad"
    model = tiny_llama(heads=4, kv_heads=2, head_dim=8)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0, 0] = float("inf")
    model.save_pretrained(bad)
    byte_tokenizer().save_pretrained(bad)
    err = _error(capsys, ["convert", str(bad), *GQA, "--out", str(tmp_path / "out")])
    assert err.startswith("hfa convert: error: the model to convert has non-finite weights: parameter "
                          "model.layers.0.self_attn.v_proj.weight holds 1 NaN/inf value(s)")
    assert not (tmp_path / "out").exists()


# -- 3. bit-identical round trips, verified checkpoints ------------------------------------------------------

def _converted(conversion):
    return make_model("llama") if conversion == "cast" else converted(conversion)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("conversion", ["cast", "gqa", "mla", "linear"])
def test_save_load_is_bit_identical_in_every_dtype(tmp_path, conversion, dtype):
    model = _converted(conversion).to(dtype)
    back = hfa.load(hfa.save(model, tmp_path / "ck"))
    saved = dict(model.named_buffers())
    assert {n: b.dtype for n, b in back.named_buffers()} == {n: b.dtype for n, b in saved.items()}
    assert all(torch.equal(b, saved[n]) for n, b in back.named_buffers())          # RoPE inv_freq included
    assert torch.equal(_logits(back), _logits(model))


def test_load_names_a_changed_truncated_or_missing_file(tmp_path):
    model = make_model("llama")
    path = hfa.save(model, tmp_path / "ck")
    weights = path / "model.safetensors"
    record = json.loads((path / RECORD_FILE).read_text())["files"]
    assert set(record) == {"config.json", "generation_config.json", "model.safetensors", BUFFERS_FILE}
    data = bytearray(weights.read_bytes())
    data[len(data) // 2: len(data) // 2 + 100] = bytes(100)                       # 100 bytes overwritten
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors changed since it was saved"):
        hfa.load(path)
    assert not torch.equal(_logits(hfa.load(path, verify=False)), _logits(model))   # what the check prevents
    weights.write_bytes(bytes(data[: len(data) // 3]))                              # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or changed: .* the record says"):
        hfa.load(path)
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        hfa.load(path)
    # a checkpoint without our record (plain save_pretrained): the unreadable file is named, not a bare error
    plain = tmp_path / "plain"
    model.save_pretrained(plain)
    (plain / "model.safetensors").write_bytes((plain / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"the checkpoint .*plain is damaged: .*model\.safetensors cannot be read"):
        hfa.load(plain)


# -- 4. errors: ours are one line, bugs keep their traceback, Ctrl-C is quiet ---------------------------------

def test_only_our_errors_are_one_liners(tmp_path, llama_dir, monkeypatch, capsys):
    out = str(tmp_path / "out")

    def bug(model, num_kv_heads=1, method="mean"):
        return {}.missing_method()          # a programming error: AttributeError, not a message for the user

    def typo(model, num_kv_heads=1, method="mean"):
        return sorted(1, 2, 3)              # TypeError from a wrong call

    def interrupted(model, num_kv_heads=1, method="mean"):
        raise KeyboardInterrupt

    def refused(model, num_kv_heads=1, method="mean"):
        raise HFAError("this model cannot be converted: use another one")

    for fn, exc in ((bug, AttributeError), (typo, TypeError)):
        monkeypatch.setitem(hfa.conversions.CONVERSIONS, "gqa", fn)
        with pytest.raises(exc):                              # the traceback reaches the user
            main(["convert", llama_dir, *GQA, "--out", out])
    monkeypatch.setitem(hfa.conversions.CONVERSIONS, "gqa", interrupted)
    assert main(["convert", llama_dir, *GQA, "--out", out]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "hfa convert: interrupted" and "Traceback" not in err
    monkeypatch.setitem(hfa.conversions.CONVERSIONS, "gqa", refused)
    assert _error(capsys, ["convert", llama_dir, *GQA, "--out", out]) == \
        "hfa convert: error: this model cannot be converted: use another one"
    assert not Path(out).exists()
    # errors the package raises on purpose (before HFAError existed) are messages too; a wrong call is not
    with pytest.raises(ValueError) as e:
        hfa.perplexity(make_model("llama"), byte_tokenizer(), TEXT, context_length=1)
    assert is_user_error(e.value)
    with pytest.raises(TypeError) as e:
        hfa.convert(make_model("llama"))
    assert not is_user_error(e.value)


def test_hints_name_what_the_user_can_do(tmp_path):
    model = make_model("llama")                             # 6 query heads, 2 KV heads
    with pytest.raises(ValueError) as e:
        hfa.convert(model, "gqa", num_kv_heads=5, method="mean")
    msg = str(e.value)
    assert "choose one of [1, 2]" in msg and "expand_kv_heads(model, 5)" not in msg and "[6]" in msg
    with pytest.raises(ValueError, match=r"hf_efficient_attn\.conversions\.expand_kv_heads\(model, 6\)"):
        hfa.convert(model, "gqa", num_kv_heads=6, method="mean")
    assert hfa.expand_kv_heads(model, 6).config.num_key_value_heads == 6        # the hint works as written
    with pytest.raises(OptionError, match="convert takes a transformers model .* got a Linear"):
        hfa.convert(torch.nn.Linear(4, 4), "gqa", num_kv_heads=1)
    # a checkpoint stock transformers cannot load says what to do, where a person looks
    mla = hfa.save(_converted("mla"), tmp_path / "mla")
    card = (mla / "README.md").read_text()
    assert "import hf_efficient_attn" in card and "`model_type: hfa_mla_llama`" in card
    assert "does not recognize this architecture" in card
    native = (hfa.save(_converted("gqa"), tmp_path / "gqa") / "README.md").read_text()   # a native checkpoint
    assert "stock transformers loads it too" in native and "does not recognize" not in native


def test_a_failed_factorization_is_a_conversion_error(monkeypatch):
    def no_convergence(*a, **k):
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    with pytest.raises(HFAError, match=r"conversion 'mla' failed in a matrix factorization \(linalg.svd: The "
                                       r"algorithm failed to converge\): .* Convert in float32"):
        hfa.convert(make_model("llama"), "mla", kv_lora_rank=8, rope_dim=4, method="weights")


# -- 5. checks before work; leftovers of a killed save ---------------------------------------------------------

def test_cli_checks_before_loading(tmp_path, llama_dir, monkeypatch, capsys):
    _no_loading(monkeypatch)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    heal = ["--heal-data", str(text), "--out", str(tmp_path / "out")]
    err = _error(capsys, ["convert", llama_dir, *GQA, "--heal-tokens", "10", *heal])
    assert err == ("hfa convert: error: --heal-tokens 10 is less than one step (--seq-len 512 x --batch-size 4 = "
                   "2048 tokens): raise --heal-tokens to at least 2048, or lower --seq-len / --batch-size")
    err = _error(capsys, ["convert", llama_dir, *GQA, "--heal-tokens", "100", "--seq-len", "1", *heal])
    assert err == "hfa convert: error: --seq-len must be at least 2, got 1"
    (tmp_path / "file").write_text("x")
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", str(tmp_path / "file" / "sub")])
    assert err.endswith(f"{tmp_path / 'file'} is a file, not a folder. Choose another path")
    err = _error(capsys, ["convert", llama_dir, *GQA, "--out", "/proc/hfa-no-such-place/out"])
    assert err.startswith("hfa convert: error: --out /proc/hfa-no-such-place/out is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "llama", "t.txt"]


KILLED_SAVE = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import hf_efficient_attn as hfa
    from tests.tiny_models import make_model
    model = make_model("llama")
    real = type(model).save_pretrained
    def slow(self, path, **kw):
        real(self, path, **kw)
        print("written", flush=True)
        time.sleep(120)
    type(model).save_pretrained = slow
    hfa.save(model, {target!r})
""")


def test_the_next_save_cleans_up_after_a_killed_one(tmp_path, caplog):
    target = tmp_path / "ck"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_SAVE.format(root=str(ROOT), target=str(target))],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.kill()                                            # SIGKILL mid-save
        proc.wait()
    left = [p.name for p in tmp_path.iterdir()]
    assert not target.exists() and len(left) == 1 and left[0].startswith(".ck.tmp-")
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"):
        hfa.save(make_model("llama"), target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert f"removed {tmp_path / left[0]}, left by an interrupted save (process {proc.pid})" in caplog.text
    # killed between setting the old checkpoint aside and renaming the new one in: the old one comes back
    os.rename(target, tmp_path / f".ck.old-{proc.pid}")
    with caplog.at_level(logging.WARNING, logger="hf_efficient_attn"), \
            pytest.raises(OverwriteRefusedError, match="exists and is not empty; pass overwrite=True"):
        hfa.save(make_model("llama", seed=1), target)
    assert "restored" in caplog.text and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert torch.equal(_logits(hfa.load(target)), _logits(make_model("llama")))


def test_a_write_error_names_the_target_not_the_temporary_folder(tmp_path, monkeypatch):
    model = make_model("llama")

    def denied(self, path, **kw):
        raise PermissionError(13, "Permission denied", str(Path(path) / "model.safetensors"))

    monkeypatch.setattr(type(model), "save_pretrained", denied)
    with pytest.raises(OSError) as e:
        hfa.save(model, tmp_path / "ck")
    assert str(e.value) == f"could not write the checkpoint {tmp_path / 'ck'}: Permission denied (nothing was written)"
    assert not list(tmp_path.iterdir())


# -- issue 11: LoRA targets follow the conversion; only the main process writes ---------------------------------

@pytest.mark.parametrize("conversion, expected", [
    ("gqa", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("mla", {"q_proj", "kv_a_proj", "k_rope_proj", "kv_b_proj", "o_proj"}),
    ("linear", {"q_proj", "k_proj", "v_proj", "o_proj"}),
])
def test_lora_adapts_every_projection_of_the_converted_attention(conversion, expected):
    teacher = make_model("llama")
    student = _converted(conversion)
    names = attention_linear_names(student)
    assert {n.rsplit(".", 1)[-1] for n in names} == expected and all(".self_attn." in n for n in names)
    before = {n: p.clone() for n, p in student.named_parameters()}
    hfa.distill(student, teacher, random_ids(8, 16, seed=5), seq_len=16, batch_size=2, max_tokens=64,
                trainable="lora", lr=1e-2, progress=False)
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {f"{n}.weight" for n in names}              # every one, and nothing else


def test_only_the_main_process_writes(tmp_path, llama_dir, monkeypatch, capsys):
    model = make_model("llama")
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.setenv(var, "1")
        assert not is_main_process()
        assert hfa.save(model, tmp_path / "api") == tmp_path / "api" and not (tmp_path / "api").exists()
        out = tmp_path / "cli"
        assert main(["convert", llama_dir, *GQA, "--eval", "--eval-data", llama_dir + "/tokenizer.json",
                     "--eval-tokens", "64", "--context", "32", "--out", str(out)]) == 0
        assert not out.exists() and "saved" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert is_main_process()
    assert main(["convert", llama_dir, *GQA, "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / RECORD_FILE).exists()


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_write_one_checkpoint(tmp_path, llama_dir):
    """A real 2-process gloo run (about 17 s): both ranks convert and heal, only rank 0 writes, the other waits."""
    (tmp_path / "t.txt").write_text(TEXT * 12)
    out = tmp_path / "out"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "hf_efficient_attn.cli", "convert", llama_dir, *GQA, "--heal-tokens", "256", "--heal-data",
           str(tmp_path / "t.txt"), "--seq-len", "32", "--batch-size", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("hfa convert: saved") == 1 and proc.stdout.count("hfa convert: loaded") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "out", "t.txt"]      # no temp folders
    heal = json.loads((out / RECORD_FILE).read_text())["conversions"][-1]
    assert heal["distill"] == "logits" and heal["processes"] == 2 and heal["tokens"] == 256
    assert hfa.load(out).config.num_key_value_heads == 1
