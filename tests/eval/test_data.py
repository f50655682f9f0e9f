"""load_text: every input type, the bundled corpus and its disjoint splits, and clear errors."""

import hashlib
import importlib
import sys

import pytest

from hf_efficient_attn.eval import SPLITS, TextData, load_text, split_of

data_mod = importlib.import_module("hf_efficient_attn.eval.data")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_string():
    d = load_text("Hello there, general Kenobi.")
    assert d.documents == ("Hello there, general Kenobi.",) and d.name == "text" and d.split is None
    assert d.sha256 == sha("Hello there, general Kenobi.") and d.num_chars == 28 and len(d) == 1


def test_list_of_strings_hash_covers_the_joined_text():
    d = load_text(["one", "two", "three"])
    assert d.documents == ("one", "two", "three") and d.name == "list[3]"
    assert d.sha256 == sha("one\n\ntwo\n\nthree") and d.num_chars == len("one\n\ntwo\n\nthree")
    assert load_text(("one", "two", "three")).sha256 == d.sha256
    assert load_text(["one", "two", "thre", "e"]).sha256 != d.sha256


def test_text_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes("caf\u00e9\r\nline two\n".encode())
    for arg in (p, str(p)):
        d = load_text(arg)
        assert d.documents == ("caf\u00e9\r\nline two\n",)  # bytes as they are: no newline translation
        assert d.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()  # equals `sha256sum a.txt`
        assert d.name == f"file:{p}"


def test_folder_of_text_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.md").write_text("second")
    (tmp_path / "1.txt").write_text("first")
    (tmp_path / "c.rst").write_text("third")
    (tmp_path / ".hidden").write_text("never")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x").write_text("never")
    d = load_text(tmp_path)
    assert d.documents == ("first", "second", "third")  # sorted by path: 1.txt, b/2.md, c.rst
    assert d.name == f"folder:{tmp_path}"


def test_datasets_dataset_duck_typed():
    class FakeDataset:
        column_names = ["id", "text"]
        features = {}

        def __getitem__(self, col):
            return {"id": [1, 2], "text": ["alpha", "beta"]}[col]

    d = load_text(FakeDataset())
    assert d.documents == ("alpha", "beta") and d.name.startswith("datasets:")


def test_real_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a b c", "", "d e"], "id": [1, 2, 3]})
    d = load_text(ds)
    assert d.documents == ("a b c", "", "d e")  # kept as is: WikiText rows joined like the HF guide
    ds2 = datasets.Dataset.from_dict({"body": ["x y", "z"], "n": [1, 2]})
    assert load_text(ds2).documents == ("x y", "z")  # the one string column
    assert load_text(ds2, text_column="body").documents == ("x y", "z")
    with pytest.raises(ValueError, match="no column 'txt'"):
        load_text(ds2, text_column="txt")
    two = datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]})
    with pytest.raises(ValueError, match="cannot tell which column holds the text"):
        load_text(two)
    with pytest.raises(TypeError, match=r"DatasetDict.*ds\['test'\]"):
        load_text(datasets.DatasetDict({"test": ds}))


def test_datasets_name_needs_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        load_text("datasets:wikitext:wikitext-2-raw-v1")
    with pytest.raises(ImportError, match="bundled corpus"):
        load_text("wikitext-2-raw-v1")


def test_datasets_name_hub_unreachable(monkeypatch):
    datasets = pytest.importorskip("datasets")
    seen = {}

    def offline(path, name=None, **kw):
        seen["args"] = (path, name)
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load the dataset 'wikitext'.*connection to the Hub"):
        load_text("wikitext-2-raw-v1")
    assert seen["args"] == ("wikitext", "wikitext-2-raw-v1")


def test_datasets_name_picks_test_split_for_eval(monkeypatch):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["train doc"]}),
        "test": datasets.Dataset.from_dict({"text": ["test doc"]}),
    })
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, **kw: dd)
    d = load_text("datasets:someone/corpus:cfg")
    assert d.documents == ("test doc",) and d.name == "datasets:someone/corpus:cfg:test"
    assert load_text("datasets:someone/corpus", split="calibration").documents == ("train doc",)


def test_bundled_corpus_splits_are_disjoint_and_complete():
    parts = {s: load_text(None, split=s) for s in SPLITS}
    assert load_text(None).documents == parts["eval"].documents  # default: the held-out split
    assert load_text("python-docs", split="eval").sha256 == parts["eval"].sha256
    docs = [set(p.documents) for p in parts.values()]
    assert not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
    every = [t for _, t in data_mod._bundled_documents("python-docs")]
    assert sum(len(p) for p in parts.values()) == len(every) == 345
    assert all(split_of(t) == s for s, p in parts.items() for t in p.documents)
    # pinned: the held-out text must never change silently (README figures depend on it)
    assert parts["eval"].sha256.startswith("0bfef96bc76e") and len(parts["eval"]) == 40
    assert parts["eval"].name == "python-docs:eval" and parts["calibration"].split == "calibration"


def test_split_is_by_content_and_deterministic():
    docs = [f"document number {i}\n" * 3 for i in range(200)]
    a = load_text(docs, split="eval")
    b = load_text(list(reversed(docs)), split="eval")
    assert set(a.documents) == set(b.documents) and 5 < len(a) < 40
    assert split_of("document number 0\n" * 3) == split_of("document number 0\n" * 3)
    assert [split_of(f"d{i}") for i in range(6)] == ["train", "train", "eval", "train", "train", "train"]
    assert load_text(docs, split="train").name == "list[200]:train"


def test_textdata_passes_through():
    d = load_text(["a", "b"])
    assert load_text(d) is d
    e = load_text(None, split="calibration")
    assert load_text(e, split="calibration") is e
    with pytest.raises(ValueError, match="already loaded"):
        load_text(e, split="eval")


# -- errors ------------------------------------------------------------------------------------------

def test_empty_inputs():
    for empty in ("", "  \n\t ", [""], ["", "   "]):
        with pytest.raises(ValueError, match="empty"):
            load_text(empty)
    with pytest.raises(ValueError, match="list of documents is empty"):
        load_text([])


def test_missing_paths_are_not_taken_for_text(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_text(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_text("data/wiki.txt")
    with pytest.raises(FileNotFoundError, match="no file or folder"):
        load_text(tmp_path / "missing")


def test_bad_files_and_types(tmp_path):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="bin.txt is not UTF-8"):
        load_text(tmp_path / "bin.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no files"):
        load_text(tmp_path / "empty")
    with pytest.raises(TypeError, match="item 1 is int"):
        load_text(["a", 3])
    with pytest.raises(TypeError, match="not supported"):
        load_text(42)


def test_bad_splits():
    with pytest.raises(ValueError, match="unknown split 'test'"):
        load_text(None, split="test")
    with pytest.raises(ValueError, match="only 1 document"):
        load_text("one long document " * 100, split="eval")


def test_textdata_repr_and_hash_is_stable():
    d = TextData("x", ("a", "b"))
    assert d.sha256 == sha("a\n\nb") and "documents=2" in repr(d)


def test_build_corpus_is_reproducible(tmp_path):
    """The maintainer's rebuild: sections only, sorted ids, byte-identical output, loadable."""
    import gzip
    import json

    src = tmp_path / "_sources"
    for rel, text in {"library/os.rst.txt": "os docs\n", "tutorial/a.rst.txt": "tutorial\n",
                      "reference/b/c.rst.txt": "nested\n", "whatsnew/3.11.rst.txt": "not included\n"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    counts = data_mod.build_python_docs_corpus(src, tmp_path / "a.jsonl.gz")
    data_mod.build_python_docs_corpus(src, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    rows = [json.loads(x) for x in gzip.decompress((tmp_path / "a.jsonl.gz").read_bytes()).decode().splitlines()]
    assert [r["id"] for r in rows] == ["library/os.rst", "reference/b/c.rst", "tutorial/a.rst"]
    assert sum(c["documents"] for c in counts.values()) == 3
    with pytest.raises(FileNotFoundError, match="apt-get install python3.11-doc"):
        data_mod.build_python_docs_corpus(tmp_path / "nothing", tmp_path / "c.jsonl.gz")
