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
made (the conversions, with their options), the attention implementation and dtype it ran with, and the
size and sha256 of every file, which `load` checks; stock ``from_pretrained`` ignores that file (and
``hfa_buffers.safetensors``, the buffers save_pretrained leaves out), so a GQA checkpoint is a plain native one.

Safety: `save` refuses NaN/inf weights, overwrites only a folder that is one of our checkpoints (never the
working directory, the home folder or a source checkpoint), cleans up after an interrupted save, and writes
only on the main process of a multi-process run; `load` names the file that changed or is truncated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch

from ..errors import (CheckpointError, CheckpointWriteError, HFAError, MissingFileError, NonFiniteError, OptionError,
                      OverwriteRefusedError)
from .toolkit import DOCUMENT_SEPARATOR, atomic_write, tokenizer_adds_bos

logger = logging.getLogger(__name__)

__all__ = ["BUFFERS_FILE", "RECORD_FILE", "check_finite", "check_target", "first_non_finite", "is_main_process",
           "load", "save", "text_documents", "token_blocks", "tokenizer_adds_bos", "verify_checkpoint"]

RECORD_FILE = "hfa.json"


# -- text ---------------------------------------------------------------------------------------------

def _read_path(path: Path) -> list[str]:
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise HFAError(f"the folder {path} has no text files (hidden files are skipped)")
    return [p.read_text(encoding="utf-8") for p in files]


def text_documents(data) -> list[str]:
    """The documents of `data` (see the module docstring) as a list of strings."""
    if data is None:
        raise HFAError("no text given: pass a string, a list of strings, a path to a text file or folder, "
                       "or a datasets dataset with a 'text' column")
    documents = getattr(data, "documents", None)           # the eval layer's TextData
    if isinstance(documents, (list, tuple)):
        docs = list(documents)
    elif isinstance(data, os.PathLike):
        if not Path(data).exists():
            raise MissingFileError(f"no text file or folder at {data}")
        docs = _read_path(Path(data))
    elif isinstance(data, str):
        is_path = len(data) < 4096 and "\n" not in data and Path(data).expanduser().exists()
        docs = _read_path(Path(data).expanduser()) if is_path else [data]
    elif isinstance(data, (list, tuple)):
        docs = list(data)
    elif hasattr(data, "column_names"):                       # a datasets.Dataset
        if "text" not in data.column_names:
            raise HFAError(f"the dataset has no 'text' column (columns: {data.column_names}); "
                           "pass ds[column] as a list of strings")
        docs = list(data["text"])
    else:
        raise OptionError(f"cannot read text from a {type(data).__name__}: pass a string, a list of strings, "
                          "a path to a text file or folder, or a datasets dataset with a 'text' column")
    bad = next((i for i, d in enumerate(docs) if not isinstance(d, str)), None)
    if bad is not None:
        raise OptionError(f"document {bad} is a {type(docs[bad]).__name__}, not a string")
    if not any(d.strip() for d in docs):
        raise HFAError("the text is empty (or only whitespace)")
    return docs


def token_blocks(tokenizer, data, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """`data` as one token stream cut into blocks: ``int64 (n, seq_len)``, at most ``max_tokens // seq_len`` of
    them (all whole blocks when None). With a BOS-prepending tokenizer each block is BOS + ``seq_len - 1``
    stream tokens. `data` may also be token ids already, ``(n, length)``: returned as they are (at most
    ``max_tokens // length`` rows), and `tokenizer` and `seq_len` are unused.
    Raises ``ValueError`` if the text does not fill one block."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise HFAError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    if torch.is_tensor(data):                               # token ids already, (n, L): kept as they are
        if data.dim() != 2 or data.is_floating_point():
            raise HFAError(f"token ids must be an integer tensor of shape (n, length), got {data.dtype} "
                           f"{tuple(data.shape)}")
        return data.long() if max_tokens is None else data[: max(1, max_tokens // data.shape[1])].long()
    if tokenizer is None:
        raise HFAError("a tokenizer is needed to turn the text into tokens: pass tokenizer=...")
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
        raise HFAError(f"the text gives {len(stream)} tokens, fewer than one block of {per_block}: "
                       "pass more text or a smaller seq_len")
    blocks = torch.tensor(stream[: n * per_block], dtype=torch.long).view(n, per_block)
    if bos:
        blocks = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
    assert blocks.shape == (n, seq_len)
    return blocks


# -- checkpoints --------------------------------------------------------------------------------------

BUFFERS_FILE = "hfa_buffers.safetensors"   # buffers save_pretrained leaves out (RoPE inv_freq), in their own dtype
CARD_FILE = "README.md"

# what may sit in a checkpoint folder besides the files its record lists: what save_pretrained and tokenizers
# write, our own files, and the report `hfa convert --eval` writes beside the weights
_CHECKPOINT_FILE = re.compile(
    r"config\.json|generation_config\.json|[\w.-]+\.safetensors|[\w.-]+\.safetensors\.index\.json|tokenizer[\w.-]*"
    r"|special_tokens_map\.json|added_tokens\.json|vocab\.[\w]+|merges\.txt|chat_template\.[\w]+|[\w.-]+\.model"
    r"|README\.md|hfa\.json|report\.json|report\.md|[\w.-]+\.png")


def is_main_process() -> bool:
    """Whether this process may write files: rank 0 of an initialised ``torch.distributed`` process group, else
    the process whose ``RANK`` (or, without it, ``LOCAL_RANK``) is 0, else any process not launched as one of many."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value.lstrip("-").isdigit():
            return int(value) == 0
    return True


def first_non_finite(model) -> tuple[str, int, int] | None:
    """``(name, bad, numel)`` of the first parameter of `model` holding NaN or inf, else None. (Buffers are not
    checked: some models keep -inf masks in them on purpose.)"""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and p.numel() and not bool(torch.isfinite(p).all()):
                return name, int((~torch.isfinite(p)).sum()), p.numel()
    return None


def check_finite(model, role: str = "the model", fix: str = "") -> None:
    """Raise `NonFiniteError` naming the first non-finite parameter of `model` (`role` says whose model it is)."""
    bad = first_non_finite(model)
    if bad is not None:
        name, n, numel = bad
        raise NonFiniteError(f"{role} has non-finite weights: parameter {name} holds {n} NaN/inf value(s) of {numel}"
                             + (f". {fix}" if fix else ""))


def _source_paths(model) -> list[Path]:
    """Local folders `model` was loaded from (its own, and those of the models it was converted from)."""
    names = {getattr(model, "name_or_path", None), getattr(model.config, "_name_or_path", None)}
    for record in getattr(model, "hfa_conversions", []):
        names.add(record.get("source"))
    return [Path(n).expanduser().resolve() for n in names if n and Path(n).expanduser().is_dir()]


def _not_our_checkpoint(folder: Path) -> str | None:
    """Why `folder` is not recognisably a checkpoint this package saved (None when it is)."""
    record_path = folder / RECORD_FILE
    if not record_path.is_file():
        return f"it has no {RECORD_FILE}, so it is not a checkpoint saved by hf_efficient_attn"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or "hf_efficient_attn" not in record:
        return f"its {RECORD_FILE} was not written by hf_efficient_attn"
    listed = set(record.get("files") or {})
    foreign = [p.name + ("/" if p.is_dir() else "") for p in sorted(folder.iterdir())
               if p.name not in listed and not (p.is_file() and _CHECKPOINT_FILE.fullmatch(p.name))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"it holds {shown}, which {'is' if len(foreign) == 1 else 'are'} not checkpoint files"
    return None


def check_target(path, *, overwrite: bool = False, sources=(), label: str | None = None,
                 overwrite_hint: str = "pass overwrite=True") -> Path:
    """Refuse a checkpoint folder `path` that `save` must not write (raises an `HFAError` naming the rule); returns
    it resolved. Never: the working directory, the home folder, a source checkpoint in `sources`, or a folder
    inside or above one of them; an existing file; a non-empty folder unless `overwrite`, and then only one that
    is recognisably a checkpoint this package saved (its record present, nothing but checkpoint files inside).
    `label` names the path in messages (the CLI says ``--out DIR``); `overwrite_hint` says how to allow replacing."""
    target = Path(path).expanduser().resolve()
    label = label or str(target)
    for src in sources:
        src = Path(src).expanduser().resolve()
        if target == src or src in target.parents or target in src.parents:
            raise HFAError(f"refusing to write to {label}: the model was loaded from {src}, and a conversion never "
                           "writes into its source checkpoint (or a folder inside or above it). Choose another folder")
    for what, place in (("the working directory", Path.cwd()), ("your home folder", Path.home())):
        place = place.resolve()
        if target == place or target in place.parents:
            where = what if target == place else f"a folder above {what} ({place})"
            raise OverwriteRefusedError(f"refusing to write to {label}: it is {where}, and saving replaces the whole "
                                        f"folder. Give the checkpoint a folder of its own, e.g. {place / 'checkpoint'}")
    if target.exists() and not target.is_dir():
        raise OverwriteRefusedError(f"{label} exists and is not a folder; choose another path")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise OverwriteRefusedError(f"{label} exists and is not empty; {overwrite_hint} to replace it (only once "
                                        "the new checkpoint is complete), or choose another folder")
        why = _not_our_checkpoint(target)
        if why is not None:
            raise OverwriteRefusedError(
                f"refusing to overwrite {label}: {why}. Overwriting replaces only a checkpoint saved by "
                f"hf_efficient_attn (its {RECORD_FILE} present, nothing but checkpoint files inside); move your files "
                "away or choose another folder")
    return target


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:          # e.g. PermissionError: someone else's live process
        return True
    return True


def _clean_stale(target: Path) -> bool:
    """Remove what an interrupted save to `target` left beside it (its temporary folder; the old checkpoint set
    aside for the swap, put back if the new one never arrived), saying so. Returns True if it restored `target`."""
    restored = False
    if not target.parent.is_dir():
        return restored
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)(?:-\w+)?")
    for p in sorted(target.parent.iterdir()):
        if not p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-")):
            continue
        m = pattern.fullmatch(p.name)
        if m is None:
            logger.warning("hf_efficient_attn: %s looks like a temporary folder of an interrupted save of an older "
                           "version; remove it if no save is running", p)
            continue
        kind, pid = m.group(1), int(m.group(2))
        if pid != os.getpid() and _alive(pid):
            continue         # another save to the same place is running: its folders are not ours to remove
        if kind == "old" and not target.exists():
            os.rename(p, target)
            restored = True
            logger.warning("hf_efficient_attn: restored %s from %s, set aside by a save (process %d) that was "
                           "interrupted before the new checkpoint was in place", target, p.name, pid)
        else:
            shutil.rmtree(p, ignore_errors=True)
            logger.warning("hf_efficient_attn: removed %s, left by an interrupted save (process %d)", p, pid)
    return restored


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_records(folder: Path) -> dict[str, dict]:
    return {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != RECORD_FILE}


def _non_persistent_buffers(model) -> dict[str, torch.Tensor]:
    """Buffers `state_dict` (so save_pretrained) leaves out, e.g. RoPE's inv_freq: a model cast to bf16 holds them
    in bf16, while a fresh load recomputes them in fp32."""
    out = {}
    for mod_name, mod in model.named_modules():
        for name in sorted(mod._non_persistent_buffers_set):
            t = mod._buffers.get(name)
            if t is not None:
                out[f"{mod_name}.{name}" if mod_name else name] = t.detach().cpu().clone().contiguous()
    return out


def _restore_buffers(model, path: Path) -> None:
    from safetensors.torch import load_file

    for full, t in load_file(path / BUFFERS_FILE).items():
        mod_name, _, name = full.rpartition(".")
        try:
            mod = model.get_submodule(mod_name)
        except AttributeError:
            mod = None
        if mod is None or mod._buffers.get(name) is None:
            logger.warning("hf_efficient_attn: %s holds buffer %s, which the loaded model does not have", BUFFERS_FILE,
                           full)
            continue
        mod._buffers[name] = t.to(mod._buffers[name].device)


_CARD = """# A checkpoint that needs hf_efficient_attn

This model ({architecture}, `model_type: {model_type}`) was converted by hf_efficient_attn and uses attention
modules that stock transformers does not have. Load it with the package imported:

```python
import hf_efficient_attn as hfa
model = hfa.load("{name}")          # or AutoModelForCausalLM.from_pretrained(...) after the import
```

Without the import, `AutoModelForCausalLM.from_pretrained` stops with "The checkpoint you are trying to load has
model type `{model_type}` but Transformers does not recognize this architecture ... out of date": upgrading
transformers does not help; `pip install hf_efficient_attn` and `import hf_efficient_attn` do.

`hfa.json` records how the model was made; `hfa.load` checks every file against the sha256 listed there.
"""


def _needs_our_package(model) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return getattr(model.config, "model_type", None) not in CONFIG_MAPPING_NAMES


def save(model, path, tokenizer=None, *, overwrite: bool = False, allow_non_finite: bool = False) -> Path:
    """Save `model` (and `tokenizer`) as a checkpoint folder at `path`, atomically; returns the path.

    The folder is written next to `path` under a temporary name and renamed into place when complete;
    with ``overwrite=True`` an existing folder is replaced only after the new one is complete, and only if it is
    a checkpoint this package saved (see `check_target`: never the working directory, the home folder, the
    checkpoint the model or the model it was converted from was loaded from, or a folder above them). A model
    with a NaN or infinite weight is refused unless ``allow_non_finite=True``. The record (``hfa.json``) lists a
    sha256 per file, which `load` checks; buffers save_pretrained leaves out (RoPE ``inv_freq``) are kept in
    their dtype, so `load` gives bit-identical logits in fp32, bf16 and fp16. What an interrupted save left
    beside `path` is cleaned up first (and logged). Under several processes (torchrun, ``accelerate launch``)
    only the main one (`is_main_process`) writes; the others return the path at once without writing.
    """
    if hasattr(model, "peft_config"):
        raise OptionError("this is a PEFT (LoRA) model: merge the adapters first (model.merge_and_unload()), "
                       "or let hfa.distill do it, then save the plain model")
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise OptionError(f"save takes a transformers model (with .config and .save_pretrained), got a "
                          f"{type(model).__name__}")
    if not allow_non_finite:
        check_finite(model, "the model", "Refusing to save it (a checkpoint of NaN weights only spreads them); "
                                         "pass allow_non_finite=True to save it anyway")
    sources = _source_paths(model)
    target = check_target(path, overwrite=overwrite, sources=sources)
    if not is_main_process():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if _clean_stale(target):
            check_target(target, overwrite=overwrite, sources=sources)
    except OSError as e:
        if isinstance(e, HFAError):
            raise
        raise CheckpointWriteError(f"could not write the checkpoint {target}: {e.strerror or e}") from e
    existed = target.exists()

    def write(tmp: Path) -> None:
        tmp.mkdir()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        buffers = _non_persistent_buffers(model)
        if buffers:
            from safetensors.torch import save_file
            save_file(buffers, tmp / BUFFERS_FILE)
        if _needs_our_package(model) and not (tmp / CARD_FILE).exists():
            (tmp / CARD_FILE).write_text(_CARD.format(architecture=type(model).__name__, name=target.name,
                                                      model_type=model.config.model_type))
        from .. import __version__
        record = {"hf_efficient_attn": __version__,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "attn_implementation": model.config._attn_implementation,
                  "conversions": getattr(model, "hfa_conversions", []),
                  "files": _file_records(tmp)}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")

    try:
        atomic_write(target, write)
    except OSError as e:
        if isinstance(e, HFAError):
            raise
        kept = "; the checkpoint that was there is unchanged" if existed else ""
        raise CheckpointWriteError(f"could not write the checkpoint {target}: {e.strerror or e} (nothing was "
                                   f"written{kept})") from e
    return target


def verify_checkpoint(path) -> None:
    """Check every file listed in the record of checkpoint `path` against its size and sha256; raise
    `CheckpointError` naming the first file that is missing, truncated or changed. A folder without a record
    (not saved by `save`), or with an older record that lists no files, passes unchecked."""
    path = Path(path).expanduser()
    files = _read_record(path).get("files") or {}
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint {path} lists it in its {RECORD_FILE}. Copy the "
                                  "whole folder again, or save the model again")
        size = f.stat().st_size
        if size != want["bytes"]:
            raise CheckpointError(f"{f} is truncated or changed: {size:,} bytes, the record says {want['bytes']:,}. "
                                  "Copy the whole checkpoint folder again, or save the model again "
                                  "(hfa.load(..., verify=False) loads it anyway)")
        if _sha256(f) != want["sha256"]:
            raise CheckpointError(f"{f} changed since it was saved: its sha256 differs from the one in "
                                  f"{path / RECORD_FILE}. Copy the whole checkpoint folder again, or save the model "
                                  "again (hfa.load(..., verify=False) loads it anyway)")


def _read_record(path: Path) -> dict:
    record_path = path / RECORD_FILE
    if not record_path.exists():
        return {}
    try:
        record = json.loads(record_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{record_path} is not valid JSON ({e}): the checkpoint's record is damaged. Copy "
                              f"the folder again, or delete {RECORD_FILE} to load the weights unchecked") from None
    if not isinstance(record, dict):
        raise CheckpointError(f"{record_path} is not a record written by hf_efficient_attn")
    return record


def _unreadable_weights(path: Path) -> str:
    """The first safetensors file in `path` that does not open, with why (or a generic note)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():
                    h.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure to open names the file
            return f"{f} cannot be read ({e})"
    return "a weights file cannot be read"


def load(path, *, dtype=None, attn_implementation: str | None = None, device=None, verify: bool = True):
    """Load a checkpoint written by `save` (or any causal-LM checkpoint) in eval mode.

    By default the model comes back with the dtype and attention implementation it was saved with, and
    the buffers it had (restored from ``hfa_buffers.safetensors``), so its logits are bit-identical to the saved
    model's. With `verify` (the default), every file is first checked against the sha256 in the record
    (`verify_checkpoint`). The tokenizer, if saved, loads with ``AutoTokenizer.from_pretrained(path)``.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    path = Path(path).expanduser()
    if not (path / "config.json").exists():
        raise MissingFileError(f"{path} is not a checkpoint folder (no config.json)")
    record = _read_record(path)
    if verify:
        verify_checkpoint(path)
    saved_dtype = getattr(torch, record.get("dtype", ""), None)
    kwargs = {"dtype": dtype or saved_dtype or "auto"}
    impl = attn_implementation or record.get("attn_implementation")
    if impl:
        kwargs["attn_implementation"] = impl
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except SafetensorError as e:
        raise CheckpointError(f"the checkpoint {path} is damaged: {_unreadable_weights(path)}. It is truncated or "
                              f"corrupt: copy or save it again ({type(e).__name__}: {e})") from e
    if (path / BUFFERS_FILE).exists() and (dtype is None or _torch_dtype_of(dtype) == saved_dtype):
        _restore_buffers(model, path)
    model.hfa_conversions = record.get("conversions", [])
    if device is not None:
        model.to(device)
    return model.eval()


def _torch_dtype_of(dtype):
    return getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
