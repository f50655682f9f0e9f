"""conversions/toolkit.py: each function, and that every conversion and writer goes through it."""

import os

import pytest
import torch
import transformers

import hf_efficient_attn.conversions.toolkit as toolkit
from hf_efficient_attn.conversions import convert, token_blocks
from hf_efficient_attn.conversions.linear import attention_transfer_loss
from hf_efficient_attn.conversions.toolkit import (DOCUMENT_SEPARATOR, atomic_write, calibration_forward,
                                                   config_fields, provenance_record, rebuild, tokenizer_adds_bos,
                                                   with_provenance)
from tests.tiny_models import make_model

from .conftest import TEXTS, char_tokenizer, random_ids


def _lm_head_positions(model):
    """A hook on the LM head recording how many positions each forward computes logits for."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    return seen, handle


# -- calibration_forward ---------------------------------------------------------------------------------------

def test_calibration_forward_runs_the_hooks_on_every_batch_with_logits_to_keep_1():
    model = make_model("llama").train()
    ids = random_ids(5, 12)
    inputs, outputs = [], []

    def hook(module, args, kwargs, out):
        inputs.append(kwargs.get("hidden_states", args[0] if args else None).shape)
        outputs.append(out[0].shape)

    seen, handle = _lm_head_positions(model)
    calibration_forward(model, ids, [(model.model.layers[1].self_attn, hook)], batch_size=2)
    handle.remove()
    assert inputs == [(2, 12, 48), (2, 12, 48), (1, 12, 48)] and outputs == inputs
    assert seen == [1, 1, 1]                              # the LM head computed the last position only
    assert model.training                                 # restored
    assert not model.model.layers[1].self_attn._forward_hooks   # removed


def test_calibration_forward_removes_its_hooks_and_restores_the_mode_on_an_error():
    model = make_model("llama").train()

    def boom(module, args, kwargs, out):
        assert not module.training and not torch.is_grad_enabled()    # eval mode, no autograd graph
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        calibration_forward(model, random_ids(2, 8), [(model.model.layers[0].self_attn, boom)])
    assert model.training and not model.model.layers[0].self_attn._forward_hooks


@pytest.mark.parametrize("conversion, options", [
    ("gqa", {"num_kv_heads": 1, "method": "pca"}),
    ("mla", {"kv_lora_rank": 8, "rope_dim": 4, "method": "activations"}),
])
def test_every_calibration_computes_one_position_of_logits(conversion, options):
    model = make_model("llama")
    seen, handle = _lm_head_positions(model)
    try:
        convert(model, conversion, calibration=random_ids(4, 16), batch_size=2, **options)
    finally:
        handle.remove()
    assert seen == [1, 1]                                # two calibration batches, one position each


def test_attention_transfer_runs_the_teacher_through_the_calibration_forward():
    teacher = make_model("llama")
    student = convert(teacher, "linear", window=4)
    seen, handle = _lm_head_positions(teacher)
    loss, _ = attention_transfer_loss(student, teacher, random_ids(3, 16))
    handle.remove()
    assert seen == [1] and loss.requires_grad          # one forward of the whole batch, one logit position


# -- provenance and rebuild ------------------------------------------------------------------------------------

def test_provenance_record_and_history():
    model = make_model("llama")
    model.name_or_path = "/ckpt/src"
    model.hfa_conversions = [{"conversion": "earlier"}]
    record = provenance_record("gqa", model, method="pca", num_kv_heads=[2, 1])
    assert record == {"conversion": "gqa", "method": "pca", "num_kv_heads": [2, 1], "source": "/ckpt/src"}
    assert list(record) == ["conversion", "method", "num_kv_heads", "source"]   # the order hfa.json shows
    new = with_provenance(make_model("llama"), model, record)
    assert new.hfa_conversions == [{"conversion": "earlier"}, record]
    assert model.hfa_conversions == [{"conversion": "earlier"}]                  # the source's list is untouched
    model.name_or_path = ""
    assert provenance_record("linear", model)["source"] is None


def test_every_conversion_records_its_provenance():
    model = make_model("llama")
    model.name_or_path = "src"
    for name, options in (("gqa", {"num_kv_heads": 1, "method": "mean"}),
                          ("mla", {"kv_lora_rank": 8, "rope_dim": 4, "method": "weights"}),
                          ("linear", {"window": 4})):
        new = convert(model, name, **options)
        rec = new.hfa_conversions[-1]
        assert rec["conversion"] == name and rec["source"] == "src" and new.name_or_path == "src", name


def test_rebuild_keeps_the_models_settings_and_refuses_lost_weights():
    model = make_model("llama").to(torch.float64).train()
    model.name_or_path = "src"
    model.config._attn_implementation = "sdpa"
    fields = config_fields(model)
    assert "model_type" not in fields and "architectures" not in fields and fields["num_key_value_heads"] == 2
    cfg_cls, lm_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    new = rebuild(model, cfg_cls, lm_cls, fields, model.state_dict(), {"conversion": "copy"})
    assert new.training and next(new.parameters()).dtype == torch.float64 and new.name_or_path == "src"
    assert new.config._attn_implementation == "sdpa" and new.config.architectures == ["LlamaForCausalLM"]
    assert new.hfa_conversions == [{"conversion": "copy"}]
    ids = random_ids(1, 8)
    assert torch.equal(new(input_ids=ids).logits, model(input_ids=ids).logits)
    state = model.state_dict()
    with pytest.raises(AssertionError, match="unexpected weights"):
        rebuild(model, cfg_cls, lm_cls, fields, {**state, "extra.weight": torch.zeros(1)}, {})
    partial = {k: v for k, v in state.items() if "k_proj" not in k}
    with pytest.raises(AssertionError, match="left at their initial values"):
        rebuild(model, cfg_cls, lm_cls, fields, partial, {})
    rebuild(model, cfg_cls, lm_cls, fields, partial, {}, new_weights=("k_proj",))   # declared new: fine


# -- atomic_write ----------------------------------------------------------------------------------------------

def test_atomic_write_writes_a_file_and_replaces_the_old_one(tmp_path):
    path = tmp_path / "sub" / "report.json"
    assert atomic_write(path, lambda tmp: tmp.write_text("one")) == path
    atomic_write(str(path), lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two" and os.listdir(path.parent) == ["report.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()          # a normal file's permissions, not 0600


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_leaves_nothing_behind_on_an_error_and_the_old_file_intact(tmp_path, error):
    path = tmp_path / "state.pt"
    path.write_text("old")

    def half(tmp):
        tmp.write_text("half of the new")
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, half)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["state.pt"]
    with pytest.raises(type(error)):
        atomic_write(tmp_path / "fresh", half)
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_write_swaps_a_folder_and_keeps_the_old_one_on_an_error(tmp_path):
    target = tmp_path / "ckpt"

    def folder(text):
        def write(tmp):
            tmp.mkdir()
            (tmp / "weights").write_text(text)
        return write

    atomic_write(target, folder("v1"))
    atomic_write(target, folder("v2"))                         # an existing folder is set aside, then removed
    assert (target / "weights").read_text() == "v2" and os.listdir(tmp_path) == ["ckpt"]

    def broken(tmp):
        folder("v3")(tmp)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert (target / "weights").read_text() == "v2" and os.listdir(tmp_path) == ["ckpt"]


def test_atomic_write_puts_the_old_folder_back_when_the_swap_fails(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("old")
    real = os.replace

    def failing(src, dst):
        if os.path.basename(str(src)).startswith(".ckpt.tmp-"):
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(toolkit.os, "replace", failing)

    def write(tmp):
        tmp.mkdir()
        (tmp / "weights").write_text("new")

    with pytest.raises(OSError, match="rename failed"):
        atomic_write(target, write)
    assert (target / "weights").read_text() == "old" and os.listdir(tmp_path) == ["ckpt"]


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_every_writer_goes_through_atomic_write(tmp_path, monkeypatch):
    """Checkpoints, bundled-model cache, reports, patch-check and family-sweep JSON, distill state and the bundled
    corpus are all written by the one atomic_write (no writer of its own: no os.replace, no mkstemp)."""
    import importlib

    names = ["conversions.io", "conversions.distill", "eval.data", "eval.families", "eval.models", "eval.patch_check",
             "eval.report"]
    mods = {n: importlib.import_module(f"hf_efficient_attn.{n}") for n in names}
    for name, mod in mods.items():
        source = open(mod.__file__).read()
        assert "atomic_write(" in source and "os.replace(" not in source and "mkstemp" not in source, name
    distill_mod = mods["conversions.distill"]
    distill_mod._save_state(tmp_path / "d" / "distill_state.pt", {"step": 3})
    assert torch.load(tmp_path / "d" / "distill_state.pt")["step"] == 3 and os.listdir(tmp_path / "d") == [
        "distill_state.pt"]


# -- text basics -----------------------------------------------------------------------------------------------

def test_text_basics_are_one_definition():
    import importlib

    io_mod, data, perplexity = (importlib.import_module(f"hf_efficient_attn.{n}")
                                for n in ("conversions.io", "eval.data", "eval.perplexity"))

    assert data.DOCUMENT_SEPARATOR is DOCUMENT_SEPARATOR and io_mod.DOCUMENT_SEPARATOR is DOCUMENT_SEPARATOR
    assert perplexity.tokenizer_adds_bos is tokenizer_adds_bos and io_mod.tokenizer_adds_bos is tokenizer_adds_bos
    assert tokenizer_adds_bos(char_tokenizer(bos=True)) and not tokenizer_adds_bos(char_tokenizer())


@pytest.mark.parametrize("bos", [False, True])
def test_calibration_and_evaluation_read_the_same_token_stream(bos):
    """Calibration blocks are the perplexity protocol's token stream (documents joined by DOCUMENT_SEPARATOR), with
    a BOS in front of each block exactly when the tokenizer adds one."""
    from hf_efficient_attn.eval.data import TextData
    from hf_efficient_attn.eval.perplexity import tokenize_stream

    tok = char_tokenizer(bos=bos)
    blocks = token_blocks(tok, TEXTS, seq_len=32)
    stream = tokenize_stream(tok, TextData("texts", tuple(TEXTS)))
    body = blocks[:, 1:] if bos else blocks
    assert torch.equal(body.flatten(), stream[: body.numel()])
    assert bool((blocks[:, 0] == tok.bos_token_id).all()) == bos
    assert stream[len(tok(TEXTS[0], add_special_tokens=False)["input_ids"]):][:2].tolist() == tok(
        DOCUMENT_SEPARATOR, add_special_tokens=False)["input_ids"]
