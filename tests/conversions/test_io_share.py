"""Checkpoints ready to share (issue 19, part 4): the model card `save` writes, the conversion record in
config.json (what push_to_hub sends), `load` of a Hub id (a mocked download, then the same verified load), and
pipeline("text-generation") on every converted model giving generate()'s greedy tokens."""

import json
import shutil
from pathlib import Path
from unittest import mock

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import AutoModelForCausalLM, pipeline

import hf_efficient_attn as hfa
from hf_efficient_attn.conversions.io import HUB_FILES, RECORD_FILE
from hf_efficient_attn.conversions.toolkit import conversion_history
from hf_efficient_attn.errors import CheckpointError, MissingFileError, OptionError
from tests.conversions.conftest import char_tokenizer, random_ids
from tests.tiny_models import TINY_CONVERSIONS, converted, make_model

CONVERSIONS = list(TINY_CONVERSIONS)
TABLE = "| model | ppl | KV bytes/token |\n|---|---:|---:|\n| base | 12.3 | 96 |\n| mla | 13.1 | 40 |\n"


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def as_json(value):
    return json.loads(json.dumps(value, default=str))


def healed_mla():
    """A tiny MLA model healed for one step of real distillation: its record has a conversion and a heal."""
    teacher = make_model("llama")
    new = hfa.convert(teacher, "mla", **TINY_CONVERSIONS["mla"])
    hfa.distill(new, teacher, random_ids(2, 16), stage="logits", max_tokens=16, seq_len=16, batch_size=1,
                progress=False)
    return new


# -- the card and the record in config.json -------------------------------------------------------------------

def test_card_and_config_carry_the_record(tmp_path):
    new = healed_mla()
    new.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"      # as if loaded from the Hub
    new.hfa_conversions[0]["source"] = new.name_or_path
    path = hfa.save(new, tmp_path / "smollm2-mla", tokenizer=char_tokenizer(), eval_table=TABLE)
    history = as_json(new.hfa_conversions)
    assert [r.get("conversion") or r.get("distill") for r in history] == ["mla", "logits"]
    assert json.loads((path / "config.json").read_text())["hfa_conversions"] == history
    assert json.loads((path / RECORD_FILE).read_text())["conversions"] == history

    card = ModelCard.load(path / "README.md")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert {"hf_efficient_attn", "mla", "distillation"} <= set(card.data.tags)
    text = card.text
    assert text.index("import hf_efficient_attn") < text.index('hfa.load("smollm2-mla")')
    assert "**Heal tokens:** 16" in text and "| 1 | mla | method=weights, kv_lora_rank=8, rope_dim=4" in text
    assert "| 2 | heal: distill (logits) | tokens=16" in text
    assert "## Evaluation" in text and "| mla | 13.1 | 40 |" in text

    # the card is documentation: editing it (as people do on the Hub) does not fail the weights' check
    (path / "README.md").write_text(card.content + "\nEdited on the Hub.\n")
    back = hfa.load(path)
    assert torch.equal(logits(back, random_ids(1, 12)), logits(new, random_ids(1, 12)))
    assert back.hfa_conversions == history and back.config.hfa_conversions == history


def test_an_unhealed_native_checkpoint_says_so_and_stays_stock_without_a_record(tmp_path):
    card = (hfa.save(converted("gqa"), tmp_path / "gqa") / "README.md").read_text()
    assert "(not healed: the conversion alone)" in card and "stock transformers loads it too" in card
    assert "base_model" not in card                                       # its source is no Hub id
    plain = make_model("llama")
    path = hfa.save(plain, tmp_path / "plain")
    assert "hfa_conversions" not in json.loads((path / "config.json").read_text())
    assert not hasattr(plain.config, "hfa_conversions")                   # save did not touch the model


@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_the_record_travels_in_config_json_as_push_to_hub_sends_it(tmp_path, conversion):
    """push_to_hub uploads save_pretrained's files only: the record rides in config.json, stock from_pretrained
    reads it back, `load` takes it when there is no hfa.json, and a further conversion keeps the history."""
    new = converted(conversion)
    new.save_pretrained(tmp_path / "pushed")                              # what push_to_hub uploads
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "pushed")
    assert stock.config.hfa_conversions == as_json(new.hfa_conversions)
    assert conversion_history(stock) == as_json(new.hfa_conversions)
    assert hfa.load(tmp_path / "pushed").hfa_conversions == as_json(new.hfa_conversions)
    if conversion == "gqa":                                               # native: convert it once more
        again = hfa.convert(stock, "mla", kv_lora_rank=8, rope_dim=4, method="weights")
        assert [r["conversion"] for r in again.config.hfa_conversions] == ["gqa", "mla"]


def test_eval_table_from_a_file_and_bad_eval_tables(tmp_path):
    report = tmp_path / "report.md"
    report.write_text(TABLE)
    path = hfa.save(converted("linear"), tmp_path / "a", eval_table=report)
    assert "| mla | 13.1 | 40 |" in (path / "README.md").read_text()
    path = hfa.save(converted("linear"), tmp_path / "b", eval_table=str(report))
    assert "| base | 12.3 | 96 |" in (path / "README.md").read_text()
    with pytest.raises(MissingFileError, match=r"eval_table: no file at .*nope\.md\. Pass Markdown text"):
        hfa.save(converted("linear"), tmp_path / "c", eval_table="nope.md")
    with pytest.raises(OptionError, match="eval_table takes Markdown text .* got a dict"):
        hfa.save(converted("linear"), tmp_path / "c", eval_table={"ppl": 1.0})
    (tmp_path / "empty.md").write_text("  \n")
    with pytest.raises(OptionError, match="empty.md is empty"):
        hfa.save(converted("linear"), tmp_path / "c", eval_table=tmp_path / "empty.md")
    assert not (tmp_path / "c").exists()


# -- hfa.load of a Hub id ------------------------------------------------------------------------------------

class FakeHub:
    """huggingface_hub.snapshot_download over local "repos": copies the files a call's patterns select from
    repos[repo_id] into a snapshot folder named by the commit, as the real one does in the HF cache."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, cache: Path, repos: dict[str, Path]):
        self.cache, self.repos, self.calls = cache, repos, []

    def __call__(self, repo_id, *, revision=None, token=None, allow_patterns=None, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append({"repo_id": repo_id, "revision": revision, "token": token, "allow_patterns": allow_patterns})
        if repo_id not in self.repos:
            raise RepositoryNotFoundError("404 Client Error: Repository Not Found", response=mock.MagicMock())
        if revision not in (None, "main", self.COMMIT):
            raise RevisionNotFoundError("404 Client Error: Revision Not Found", response=mock.MagicMock())
        remote = self.repos[repo_id]
        snapshot = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / self.COMMIT
        snapshot.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in remote.iterdir() if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            shutil.copy2(remote / name, snapshot / name)
        return str(snapshot)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hf-cache", {})
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


def test_load_takes_a_hub_id(tmp_path, hub):
    new = converted("mla")
    remote = hfa.save(new, tmp_path / "remote", tokenizer=char_tokenizer())
    (remote / "model.onnx").write_bytes(b"not wanted")                   # a file hfa.load never downloads
    hub.repos["someone/tiny-mla"] = remote
    back = hfa.load("someone/tiny-mla", revision="main", token="hf_x")
    ids = random_ids(2, 14)
    assert torch.equal(logits(back, ids), logits(new, ids))
    assert back.name_or_path == "someone/tiny-mla" and back.hfa_conversions == as_json(new.hfa_conversions)
    assert hub.calls == [{"repo_id": "someone/tiny-mla", "revision": "main", "token": "hf_x",
                          "allow_patterns": HUB_FILES}]
    snapshot = hub.cache / "models--someone--tiny-mla" / "snapshots" / FakeHub.COMMIT
    assert not (snapshot / "model.onnx").exists() and (snapshot / "README.md").exists()
    # a file of ours that the patterns miss is fetched from the same commit; a changed one fails the check
    extra = remote / "vocab.bpe"
    extra.write_text("a b\n")
    record = json.loads((remote / RECORD_FILE).read_text())
    record["files"]["vocab.bpe"] = {"sha256": "0" * 64, "bytes": extra.stat().st_size}
    (remote / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=r"vocab\.bpe changed since it was saved"):
        hfa.load("someone/tiny-mla")
    assert hub.calls[-1]["allow_patterns"] == ["vocab.bpe"] and hub.calls[-1]["revision"] == FakeHub.COMMIT


def test_a_hub_id_that_cannot_load_says_why_and_what_to_do(tmp_path, hub, monkeypatch):
    with pytest.raises(MissingFileError, match=r"no model 'someone/missing' on the Hugging Face Hub .*hf auth login"):
        hfa.load("someone/missing")
    hub.repos["someone/tiny"] = hfa.save(converted("gqa"), tmp_path / "remote")
    with pytest.raises(MissingFileError, match=r"has no revision 'v9': pass a branch, tag or commit"):
        hfa.load("someone/tiny", revision="v9")

    def gated(*a, **k):
        raise GatedRepoError("403 Client Error: gated", response=mock.MagicMock())

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(MissingFileError, match=r"is gated: accept its terms at https://huggingface.co/someone/tiny"):
        hfa.load("someone/tiny")
    for bad in ("./nowhere", "a/b/c", tmp_path / "nowhere"):
        with pytest.raises(MissingFileError, match="no checkpoint folder at"):
            hfa.load(bad)
    with pytest.raises(OptionError, match="revision= and token= apply to a Hub id"):
        hfa.load(hub.repos["someone/tiny"], revision="main")


def test_offline_and_not_cached_names_the_fix(tmp_path, monkeypatch):
    """The real snapshot_download, offline, with an empty cache."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(MissingFileError, match=r"cannot download 'someone/tiny': there is no local folder of that "
                                               r"name, the Hugging Face Hub cannot be reached .*"
                                               r"\(`hf download someone/tiny`\)"):
        hfa.load("someone/tiny")


# -- pipeline("text-generation") ----------------------------------------------------------------------------

@pytest.mark.parametrize("conversion", CONVERSIONS)
def test_text_generation_pipeline_on_every_converted_checkpoint(tmp_path, conversion):
    tok = char_tokenizer()
    new = converted(conversion)
    path = hfa.save(new, tmp_path / conversion, tokenizer=tok)
    assert json.loads((path / "config.json").read_text())["hfa_conversions"] == as_json(new.hfa_conversions)
    assert conversion in ModelCard.load(path / "README.md").data.tags
    model = hfa.load(path)
    prompt, greedy = "the quick brown", {"do_sample": False, "max_new_tokens": 8, "min_new_tokens": 8}
    expected = model.generate(**tok(prompt, return_tensors="pt"), **greedy)[0].tolist()
    for generator in (pipeline("text-generation", model=model, tokenizer=tok),
                      pipeline("text-generation", model=str(path))):     # as a Hub id would be given
        out = generator(prompt, return_tensors=True, **greedy)
        assert out[0]["generated_token_ids"] == expected, generator.model.config.model_type
    assert len(expected) == len(tok(prompt)["input_ids"]) + 8
