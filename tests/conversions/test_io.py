"""Saving and loading converted checkpoints; reading calibration and training text."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_efficient_attn.conversions import convert, load, save, text_documents, token_blocks
from hf_efficient_attn.conversions.io import RECORD_FILE
from tests.conversions.conftest import char_tokenizer, random_ids
from tests.tiny_models import make_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture
def converted():
    model = make_model("qwen2", attn="sdpa")            # q/k/v biases, a sliding-window layer
    return model, convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=random_ids(8, 32))


def test_save_load_round_trip_is_bit_identical(tmp_path, converted):
    _, new = converted
    ids = random_ids(2, 16)
    path = save(new, tmp_path / "mqa", tokenizer=char_tokenizer())
    back = load(path)
    assert back.config.num_key_value_heads == 1 and back.config._attn_implementation == "sdpa"
    assert torch.equal(logits(back, ids), logits(new, ids))
    record = json.loads((path / RECORD_FILE).read_text())
    assert record["conversions"][-1]["method"] == "aligned" and record["dtype"] == "float32"
    assert back.hfa_conversions == record["conversions"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_stock_transformers_loads_the_gqa_checkpoint_without_our_package(tmp_path, converted):
    _, new = converted
    ids = random_ids(2, 16)
    path = save(new, tmp_path / "mqa")
    torch.save({"ids": ids, "logits": logits(new, ids)}, tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(path)!r}, attn_implementation="sdpa", dtype=torch.float32)
        assert "hf_efficient_attn" not in sys.modules
        assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_key_value_heads == 1
        exp = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            got = model(input_ids=exp["ids"]).logits
        assert torch.equal(got, exp["logits"]), (got - exp["logits"]).abs().max()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_refuses_to_write_into_the_source_checkpoint(tmp_path):
    src = tmp_path / "source"
    make_model("llama").save_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src)
    new = convert(model, "gqa", num_kv_heads=1, method="mean")
    for target in (src, src / "sub"):
        for m in (model, new):
            with pytest.raises(ValueError, match="never writes into its source checkpoint"):
                save(m, target, overwrite=True)
    assert sorted(p.name for p in src.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_existing_target_needs_overwrite_and_is_replaced_whole(tmp_path, converted):
    model, new = converted
    target = tmp_path / "out"
    save(model, target)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(new, target)
    assert load(target).config.num_key_value_heads == 2      # untouched
    save(new, target, overwrite=True)
    assert load(target).config.num_key_value_heads == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_save_leaves_nothing_half_written(tmp_path, converted, monkeypatch):
    model, new = converted
    target = tmp_path / "out"
    save(model, target)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(new), "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save(new, target, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save(new, tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert load(target).config.num_key_value_heads == 2     # the old checkpoint survives


def test_text_inputs(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("first")
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / ".hidden").write_text("skipped")
    assert text_documents("just text") == ["just text"]
    assert text_documents(["a", "b"]) == ["a", "b"]
    assert text_documents(str(tmp_path / "docs")) == ["first", "second"]
    assert text_documents(tmp_path / "docs" / "a.txt") == ["first"]

    class TextData:
        documents = ("x", "y")

    assert text_documents(TextData()) == ["x", "y"]
    with pytest.raises(ValueError, match="empty"):
        text_documents(["", "  "])
    with pytest.raises(TypeError, match="cannot read text from a int"):
        text_documents(3)


def test_token_blocks_follow_the_bos_convention():
    plain, with_bos = char_tokenizer(), char_tokenizer(bos=True)
    docs = ["abcdefgh", "ijklmnop"]
    stream = plain("abcdefgh\n\nijklmnop", add_special_tokens=False)["input_ids"]
    blocks = token_blocks(plain, docs, seq_len=6)
    assert blocks.tolist() == [stream[0:6], stream[6:12], stream[12:18]]
    blocks = token_blocks(with_bos, docs, seq_len=6, max_tokens=12)
    assert blocks.tolist() == [[1, *stream[0:5]], [1, *stream[5:10]]]
    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(plain, "abc", seq_len=6)
    ids = random_ids(4, 8)
    assert torch.equal(token_blocks(None, ids, seq_len=512, max_tokens=16), ids[:2])
