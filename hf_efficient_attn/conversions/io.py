"""What goes in and out of a conversion: text (calibration and training data) and checkpoints.

    blocks = token_blocks(tok, texts, seq_len=512, max_tokens=32768)   # (n, 512) int64
    save(model, "out/smollm2-mqa", tokenizer=tok)   # atomic: temp folder next to the target, then rename
    model = load("out/smollm2-mqa")                 # bit-identical logits to the model that was saved

Text: ``data`` is a string, a list of strings (one document each), a path to a UTF-8 text file or a
folder of them, a ``datasets`` dataset with a text column, or anything with a ``.documents`` tuple
(the evaluation layer's ``TextData``). Documents are joined by a blank line into one token stream
(no special tokens) and cut into blocks; if the tokenizer prepends BOS by default (Gemma, Llama 2),
every block starts with BOS, as in the perplexity protocol.

Checkpoints: a converted model is saved with ``save_pretrained`` (safetensors + config) into a
temporary sibling folder that is renamed into place only when complete, so the target either does
not exist, is the old checkpoint, or is the new one. ``hfa.json`` beside it records how the model was
made (the conversions, with their options) and the attention implementation and dtype it ran with;
stock ``from_pretrained`` ignores that file, so a GQA checkpoint is a plain native one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

__all__ = ["RECORD_FILE", "load", "save", "text_documents", "token_blocks", "tokenizer_adds_bos"]

RECORD_FILE = "hfa.json"
DOCUMENT_SEPARATOR = "\n\n"  # the evaluation layer's convention, so calibration and eval streams agree


# -- text ---------------------------------------------------------------------------------------------

def _read_path(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise ValueError(f"the folder {path} has no text files (hidden files are skipped)")
    return [p.read_text(encoding="utf-8") for p in files]


def text_documents(data) -> list[str]:
    """The documents of `data` (see the module docstring) as a list of strings."""
    if data is None:
        raise ValueError("no text given: pass a string, a list of strings, a path to a text file or folder, "
                         "or a datasets dataset with a 'text' column")
    documents = getattr(data, "documents", None)           # the eval layer's TextData
    if isinstance(documents, (list, tuple)):
        docs = list(documents)
    elif isinstance(data, os.PathLike):
        if not Path(data).exists():
            raise FileNotFoundError(f"no text file or folder at {data}")
        docs = _read_path(Path(data))
    elif isinstance(data, str):
        is_path = len(data) < 4096 and "\n" not in data and Path(data).expanduser().exists()
        docs = _read_path(Path(data).expanduser()) if is_path else [data]
    elif isinstance(data, (list, tuple)):
        docs = list(data)
    elif hasattr(data, "column_names"):                       # a datasets.Dataset
        if "text" not in data.column_names:
            raise ValueError(f"the dataset has no 'text' column (columns: {data.column_names}); "
                             "pass ds[column] as a list of strings")
        docs = list(data["text"])
    else:
        raise TypeError(f"cannot read text from a {type(data).__name__}: pass a string, a list of strings, "
                        "a path to a text file or folder, or a datasets dataset with a 'text' column")
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise TypeError(f"document {bad} is a {type(docs[bad]).__name__}, not a string")
    if not any(d.strip() for d in docs):
        raise ValueError("the text is empty (or only whitespace)")
    return docs


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` prepends its BOS token by default (checked, not read from a flag)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos and (not without or without[0] != bos)


def token_blocks(tokenizer, data, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """`data` as one token stream cut into blocks: ``int64 (n, seq_len)``, at most ``max_tokens // seq_len`` of
    them (all whole blocks when None). With a BOS-prepending tokenizer each block is BOS + ``seq_len - 1``
    stream tokens. `data` may also be token ids already, ``(n, length)``: returned as they are (at most
    ``max_tokens // length`` rows), and `tokenizer` and `seq_len` are unused.
    Raises ``ValueError`` if the text does not fill one block."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if torch.is_tensor(data):                               # token ids already, (n, L): kept as they are
        if data.dim() != 2 or data.is_floating_point():
            raise ValueError(f"token ids must be an integer tensor of shape (n, length), got {data.dtype} "
                             f"{tuple(data.shape)}")
        return data.long() if max_tokens is None else data[: max(1, max_tokens // data.shape[1])].long()
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to turn the text into tokens: pass tokenizer=...")
    bos = tokenizer_adds_bos(tokenizer)
    per_block = seq_len - 1 if bos else seq_len
    max_blocks = None if max_tokens is None else max(1, max_tokens // seq_len)
    wanted = None if max_blocks is None else max_blocks * per_block
    docs = text_documents(data)
    stream: list[int] = []
    for i, doc in enumerate(docs):
        text = doc + DOCUMENT_SEPARATOR if i < len(docs) - 1 else doc
        stream += tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        if wanted is not None and len(stream) >= wanted:
            break
    n = len(stream) // per_block if max_blocks is None else min(max_blocks, len(stream) // per_block)
    if n == 0:
        raise ValueError(f"the text gives {len(stream)} tokens, fewer than one block of {per_block}: "
                         "pass more text or a smaller seq_len")
    blocks = torch.tensor(stream[: n * per_block], dtype=torch.long).view(n, per_block)
    if bos:
        blocks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
    assert blocks.shape == (n, seq_len)
    return blocks


# -- checkpoints --------------------------------------------------------------------------------------

def _source_paths(model) -> list[Path]:
    """Local folders `model` was loaded from (its own, and those of the models it was converted from)."""
    names = {getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)}
    for record in getattr(model, "hfa_conversions", []):
        names.add(record.get("source"))
    return [Path(n).expanduser().resolve() for n in names if n and Path(n).expanduser().is_dir()]


def _check_target(model, target: Path, overwrite: bool) -> None:
    for src in _source_paths(model):
        if target == src or src in target.parents or target in src.parents:
            raise ValueError(f"refusing to write to {target}: the model was loaded from {src}, and a conversion "
                             "never writes into its source checkpoint. Choose another folder")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder; choose another path")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it, "
                              "or choose another folder")


def save(model, path, tokenizer=None, *, overwrite: bool = False) -> Path:
    """Save `model` (and `tokenizer`) as a checkpoint folder at `path`, atomically; returns the path.

    The folder is written next to `path` under a temporary name and renamed into place when complete;
    with ``overwrite=True`` an existing folder is replaced only after the new one is complete. Never
    writes into the checkpoint the model (or the model it was converted from) was loaded from.
    """
    if hasattr(model, "peft_config"):
        raise TypeError("this is a PEFT (LoRA) model: merge the adapters first (model.merge_and_unload()), "
                        "or let hfa.distill do it, then save the plain model")
    target = Path(path).expanduser().resolve()
    _check_target(model, target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from .. import __version__
        record = {"hf_efficient_attn": __version__,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "attn_implementation": model.config._attn_implementation,
                  "conversions": getattr(model, "hfa_conversions", [])}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700; give it a normal folder's permissions
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
        os.rename(tmp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(path, *, dtype=None, attn_implementation: str | None = None, device=None):
    """Load a checkpoint written by `save` (or any causal-LM checkpoint) in eval mode.

    By default the model comes back with the dtype and attention implementation it was saved with,
    so its logits are bit-identical to the saved model's. The tokenizer, if saved, loads with
    ``AutoTokenizer.from_pretrained(path)``.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json)")
    record = json.loads((path / RECORD_FILE).read_text()) if (path / RECORD_FILE).exists() else {}
    kwargs = {"dtype": dtype or getattr(torch, record.get("dtype", ""), None) or "auto"}
    impl = attn_implementation or record.get("attn_implementation")
    if impl:
        kwargs["attn_implementation"] = impl
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.hfa_conversions = record.get("conversions", [])
    if device is not None:
        model.to(device)
    return model.eval()
