"""Evaluation and calibration text: one loader for every kind of input, and a bundled corpus.

`load_text(data, split=None)` accepts

- ``None`` or ``"python-docs"``: the bundled corpus (below); its splits are ``eval``, ``calibration``, ``train``;
- a string of text, or a list/tuple of strings (each one a document);
- a path to a UTF-8 text file (one document) or a folder of them (every non-hidden file, recursively,
  in sorted order, one document each);
- a ``datasets.Dataset`` (its ``text`` column, or the column named by ``text_column``);
- a Hugging Face datasets name, ``"datasets:NAME[:CONFIG]"`` (e.g.
  ``"datasets:wikitext:wikitext-2-raw-v1"``, or the shorthand ``"wikitext-2-raw-v1"``), where the
  ``datasets`` package is installed and the Hub is reachable;

and returns a `TextData`: a name, the documents, and a content hash for the report.

Splits are by document and deterministic: a document belongs to ``eval`` (10%), ``calibration``
(10%) or ``train`` (80%) by the SHA-256 of its text, so the three never share a document (identical
documents land in the same split) and the assignment does not depend on order or on the machine.
For a ``datasets`` name, ``eval`` reads the dataset's ``test`` split (``validation`` if it has none)
and ``calibration``/``train`` its ``train`` split.

The bundled corpus, ``python-docs``, is the reStructuredText source of the Python 3.11
documentation (sections ``library``, ``tutorial``, ``reference``), PSF License; see
``hf_efficient_attn/data/README.md`` for provenance and how to rebuild it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

# Documents are joined with a blank line into one token stream (the transformers perplexity guide's
# convention for WikiText), as calibration joins them; the content hash covers exactly that joined text.
from ..conversions.toolkit import DOCUMENT_SEPARATOR, atomic_write

__all__ = ["BUNDLED_CORPORA", "DOCUMENT_SEPARATOR", "SPLITS", "TextData", "load_text", "split_of"]

SPLITS = ("eval", "calibration", "train")

BUNDLED_CORPORA = {
    "python-docs": {
        "file": "python-docs-3.11.jsonl.gz",
        "description": "reStructuredText source of the Python 3.11.2 documentation (library, tutorial, "
                       "reference), from Debian's python3.11-doc package",
        "license": "PSF License Agreement (code examples also 0BSD); see hf_efficient_attn/data/README.md",
    },
}
_DEFAULT_CORPUS = "python-docs"

# datasets names with a well-known config, so `--data wikitext-2-raw-v1` works
_DATASET_SHORTHANDS = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1"),
    "wikitext-2-v1": ("wikitext", "wikitext-2-v1"),
    "wikitext-103-v1": ("wikitext", "wikitext-103-v1"),
}


@dataclass(frozen=True)
class TextData:
    """Text ready for evaluation: documents in order, a name for reports, and their content hash."""

    name: str
    documents: tuple[str, ...]
    split: str | None = None
    sha256: str = field(init=False)

    def __post_init__(self):
        h = hashlib.sha256()
        for i, doc in enumerate(self.documents):
            if i:
                h.update(DOCUMENT_SEPARATOR.encode())
            h.update(doc.encode("utf-8"))
        object.__setattr__(self, "sha256", h.hexdigest())  # sha256 of DOCUMENT_SEPARATOR.join(documents)

    @property
    def num_chars(self) -> int:
        return sum(len(d) for d in self.documents) + len(DOCUMENT_SEPARATOR) * max(0, len(self.documents) - 1)

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return (f"TextData(name={self.name!r}, split={self.split!r}, documents={len(self.documents)}, "
                f"chars={self.num_chars}, sha256={self.sha256[:12]}...)")


def split_of(document: str) -> str:
    """The split a document belongs to: ``eval`` (10%), ``calibration`` (10%) or ``train`` (80%), by content hash."""
    bucket = int(hashlib.sha256(document.encode("utf-8")).hexdigest()[:8], 16) % 10
    return "eval" if bucket == 0 else "calibration" if bucket == 1 else "train"


def _check_split(split) -> None:
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)} (or None for all of the data)")


def _apply_split(name: str, documents: list[str], split: str | None) -> TextData:
    if split is None:
        return TextData(name, tuple(documents))
    if len(documents) < 10:
        raise ValueError(
            f"split={split!r} divides data by document (10% eval, 10% calibration, 80% train), but {name} has "
            f"only {len(documents)} document(s). Pass split=None to use all of it, or give a list of documents "
            "or a folder of files"
        )
    picked = [d for d in documents if split_of(d) == split]
    if not picked:
        raise ValueError(f"split={split!r} of {name} is empty ({len(documents)} documents); pass split=None")
    return TextData(f"{name}:{split}", tuple(picked), split)


def _check_not_empty(data: TextData) -> TextData:
    if not any(d.strip() for d in data.documents):
        raise ValueError(f"the text of {data.name} is empty (or only whitespace): there is nothing to evaluate")
    return data


# -- the bundled corpus ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _bundled_documents(corpus: str) -> tuple[tuple[str, str], ...]:
    """(id, text) of every document of a bundled corpus, in the order stored (sorted by id)."""
    fname = BUNDLED_CORPORA[corpus]["file"]
    ref = resources.files("hf_efficient_attn").joinpath("data").joinpath(fname)  # one step at a time: Python 3.10
    try:
        raw = ref.read_bytes()
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"the bundled corpus file hf_efficient_attn/data/{fname} is missing from this installation; "
            "reinstall hf_efficient_attn (pip install --force-reinstall hf_efficient_attn)"
        ) from e
    docs = []
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        rec = json.loads(line)
        docs.append((rec["id"], rec["text"]))
    return tuple(docs)


def _load_bundled(corpus: str, split: str | None) -> TextData:
    docs = [text for _, text in _bundled_documents(corpus)]
    split = "eval" if split is None else split  # the bundled corpus is for evaluation unless told otherwise
    return _apply_split(corpus, docs, split)


# -- files and folders --------------------------------------------------------------------------------

def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # bytes, so the hash equals `sha256sum` of a single file
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8 "
                         "or remove it from the data") from e


def _load_path(path: Path, split: str | None) -> TextData:
    if path.is_file():
        return _apply_split(f"file:{path}", [_read_utf8(path)], split)
    files = sorted(
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise ValueError(f"the folder {path} has no files (hidden files are skipped); put UTF-8 text files in it")
    return _apply_split(f"folder:{path}", [_read_utf8(p) for p in files], split)


# -- datasets -----------------------------------------------------------------------------------------

def _text_column(ds, text_column: str | None) -> str:
    features = getattr(ds, "features", None) or {}
    columns = list(getattr(ds, "column_names", None) or features)
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(f"the dataset has no column {text_column!r}; its columns are {columns}")
        return text_column
    if "text" in columns:
        return "text"
    string_cols = [c for c in columns if getattr(features.get(c), "dtype", None) in ("string", "large_string")]
    if len(string_cols) == 1:
        return string_cols[0]
    raise ValueError(f"cannot tell which column holds the text (columns: {columns}); pass text_column=...")


def _load_dataset_object(ds, split: str | None, text_column: str | None, name: str | None = None) -> TextData:
    if type(ds).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(f"got a DatasetDict with splits {list(ds.keys())}; pass one split, e.g. ds['test']")
    col = _text_column(ds, text_column)
    docs = list(ds[col])
    bad = [i for i, d in enumerate(docs) if not isinstance(d, str)]
    if bad:
        raise TypeError(f"column {col!r} holds non-string values (first at row {bad[0]}); pick a text column")
    if name is None:
        info = getattr(ds, "info", None)
        builder = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) or "dataset"
        config = getattr(info, "config_name", None)
        ds_split = getattr(ds, "split", None)
        name = "datasets:" + ":".join(str(x) for x in (builder, config, ds_split) if x)
    return _apply_split(name, docs, split)


def _load_dataset_name(spec: str, split: str | None, text_column: str | None) -> TextData:
    if spec in _DATASET_SHORTHANDS:
        path, config = _DATASET_SHORTHANDS[spec]
    else:
        parts = spec.removeprefix("datasets:").split(":")
        if len(parts) > 2 or not parts[0]:
            raise ValueError(f"a datasets name is 'datasets:NAME' or 'datasets:NAME:CONFIG', got {spec!r}")
        path, config = parts[0], (parts[1] if len(parts) == 2 else None)
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"loading {spec!r} needs the 'datasets' package and access to the Hugging Face Hub: "
            "pip install datasets. Offline, use the bundled corpus (data=None, i.e. 'python-docs') or a "
            "local text file or folder"
        ) from e
    try:
        dd = datasets.load_dataset(path, config)
    except Exception as e:  # the Hub unreachable, a wrong name, ...: say which and what to do
        raise ValueError(
            f"could not load the dataset {path!r} (config {config!r}): {e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Check the name and your connection to the Hub; offline, "
            "use the bundled corpus (data=None) or a local text file or folder"
        ) from e
    if split is None or split == "eval":
        ds_split = "test" if "test" in dd else "validation" if "validation" in dd else None
    else:
        ds_split = "train" if "train" in dd else None
    if ds_split is None:
        raise ValueError(f"dataset {path!r} has splits {list(dd.keys())}; none fits split={split!r}. Load it "
                         "yourself and pass dd[NAME]")
    name = f"datasets:{path}" + (f":{config}" if config else "") + f":{ds_split}"
    td = _load_dataset_object(dd[ds_split], None, text_column, name=name)
    return TextData(td.name, td.documents, split)


# -- the one entry point ------------------------------------------------------------------------------

_PATHLIKE = re.compile(r"^[^\s]+(/|\\|\.(txt|md|rst|text|jsonl?|csv))[^\s]*$")


def load_text(data=None, split: str | None = None, text_column: str | None = None) -> TextData:
    """Load evaluation text from any supported input (see the module docstring) as a `TextData`.

    split: ``None`` (all of the data; for the bundled corpus, its ``eval`` split), ``"eval"``,
    ``"calibration"`` or ``"train"``. A `TextData` passes through (``split`` must then be ``None``).
    """
    _check_split(split)
    if isinstance(data, TextData):
        if split is not None and split != data.split:
            raise ValueError(f"{data.name} is already loaded (split {data.split!r}); cannot take split {split!r} of it")
        return _check_not_empty(data)
    if data is None:
        return _check_not_empty(_load_bundled(_DEFAULT_CORPUS, split))
    if isinstance(data, os.PathLike):
        path = Path(data).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no file or folder at {path}")
        return _check_not_empty(_load_path(path, split))
    if isinstance(data, str):
        if not data.strip():
            return _check_not_empty(TextData("text", (data,)))  # never a path: Path("") is the current folder
        if data in BUNDLED_CORPORA or data == "bundled":
            return _check_not_empty(_load_bundled(_DEFAULT_CORPUS if data == "bundled" else data, split))
        if data.startswith("datasets:") or data in _DATASET_SHORTHANDS:
            return _check_not_empty(_load_dataset_name(data, split, text_column))
        if len(data) < 4096 and "\n" not in data:
            path = Path(data).expanduser()
            try:
                is_path = path.exists()
            except OSError:  # e.g. a name too long to be a file: it is text
                is_path = False
            if is_path:
                return _check_not_empty(_load_path(path, split))
            if _PATHLIKE.match(data):
                raise FileNotFoundError(
                    f"no file or folder at {data!r}. (To evaluate this string itself as text, pass it in a "
                    "list: [text].)"
                )
        return _check_not_empty(_apply_split("text", [data], split))
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("the list of documents is empty: there is nothing to evaluate")
        bad = [i for i, d in enumerate(data) if not isinstance(d, str)]
        if bad:
            raise TypeError(f"a list of documents must hold strings; item {bad[0]} is "
                            f"{type(data[bad[0]]).__name__}")
        return _check_not_empty(_apply_split(f"list[{len(data)}]", list(data), split))
    if type(data).__name__ in ("DatasetDict", "IterableDatasetDict"):
        raise TypeError(f"got a DatasetDict with splits {list(data.keys())}; pass one split, e.g. ds['test']")
    if hasattr(data, "column_names"):  # a datasets.Dataset, without importing datasets
        return _check_not_empty(_load_dataset_object(data, split, text_column))
    raise TypeError(
        f"data of type {type(data).__name__} is not supported; pass a string, a list of strings, a path to a "
        "text file or folder, a datasets.Dataset, a 'datasets:NAME[:CONFIG]' name, or None for the bundled corpus"
    )


# -- rebuilding the bundled corpus (maintainers only; see hf_efficient_attn/data/README.md) ------------

PYTHON_DOCS_SECTIONS = ("library", "tutorial", "reference")


def build_python_docs_corpus(sources: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the bundled corpus from Debian's python3.11-doc reST sources (``.../html/_sources``).

    One JSON line per document, ``{"id": "library/os.rst", "text": ...}``, sorted by id, gzip
    with a zero timestamp so the file is byte-for-byte reproducible. Returns counts per split.
    """
    sources = Path(sources)
    files = sorted(p for s in PYTHON_DOCS_SECTIONS for p in (sources / s).rglob("*.rst.txt"))
    if not files:
        raise FileNotFoundError(f"no .rst.txt files under {sources}/{{{','.join(PYTHON_DOCS_SECTIONS)}}}; "
                                "install them with: apt-get install python3.11-doc")
    lines, counts = [], {s: [0, 0] for s in SPLITS}
    for p in files:
        doc_id = p.relative_to(sources).as_posix().removesuffix(".txt")
        text = _read_utf8(p)
        lines.append(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False))
        counts[split_of(text)][0] += 1
        counts[split_of(text)][1] += len(text)
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9,
                                                   mtime=0) as gz:
            gz.write(payload)

    atomic_write(out, write)
    return {s: {"documents": n, "chars": c} for s, (n, c) in counts.items()}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="rebuild hf_efficient_attn/data/python-docs-3.11.jsonl.gz")
    ap.add_argument("sources", nargs="?", default="/usr/share/doc/python3.11/html/_sources")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / BUNDLED_CORPORA["python-docs"]["file"]))
    a = ap.parse_args()
    print(json.dumps(build_python_docs_corpus(a.sources, a.out), indent=2))
