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
``config.json`` carries the conversion record too (``hfa_conversions``), so it travels wherever the config goes
(``push_to_hub``, a stock ``from_pretrained``), and ``README.md`` is the model card (see card.py).

Sharing: ``huggingface_hub.upload_folder(repo_id=..., folder_path=path)`` uploads the whole checkpoint (card,
record, buffers); ``hfa.load("user/name")`` downloads it into the Hugging Face cache and loads it as a local
folder, verified the same way.

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
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import (CheckpointError, CheckpointWriteError, HFAError, MissingFileError, NonFiniteError, OptionError,
                      OverwriteRefusedError)
from .card import eval_markdown, model_card
from .toolkit import (CONFIG_RECORD_KEY, DOCUMENT_SEPARATOR, atomic_write, conversion_history, set_conversion_history,
                      tokenizer_adds_bos)

logger = logging.getLogger(__name__)

__all__ = ["BUFFERS_FILE", "CARD_FILE", "HUB_FILES", "RECORD_FILE", "check_finite", "check_target", "download_checkpoint",
           "first_non_finite", "is_main_process", "load", "save", "text_documents", "token_blocks", "tokenizer_adds_bos",
           "verify_checkpoint"]

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
    for record in conversion_history(model):
        names.add(record.get("source") if isinstance(record, dict) else None)
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
    """Size and sha256 of every file in `folder` but the record itself and the model card (documentation, which
    people edit on the Hub: a changed card must not make the weights fail their check)."""
    return {p.relative_to(folder).as_posix(): {"sha256": _sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in (RECORD_FILE, CARD_FILE)}


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


@contextmanager
def _config_record(config, history: list[dict]):
    """For the duration of the ``with``: `config` carries `history` under ``hfa_conversions`` (as JSON), so
    ``save_pretrained`` writes it into config.json; afterwards the config is as it was."""
    had, old = hasattr(config, CONFIG_RECORD_KEY), getattr(config, CONFIG_RECORD_KEY, None)
    if history or had:
        setattr(config, CONFIG_RECORD_KEY, json.loads(json.dumps(history, default=str)))
    try:
        yield
    finally:
        if had:
            setattr(config, CONFIG_RECORD_KEY, old)
        elif hasattr(config, CONFIG_RECORD_KEY):
            delattr(config, CONFIG_RECORD_KEY)


def save(model, path, tokenizer=None, *, eval_table=None, overwrite: bool = False,
         allow_non_finite: bool = False) -> Path:
    """Save `model` (and `tokenizer`) as a checkpoint folder at `path`, atomically; returns the path.

    Beside the weights: ``config.json`` carries the conversion record (``hfa_conversions``: every conversion and
    heal, with its options; it travels with ``push_to_hub``), ``hfa.json`` repeats it with the sha256 of every file,
    and ``README.md`` is a model card (base model, the record, heal tokens, how to load it; see `card.model_card`).
    eval_table: the evaluation to show in the card, as Markdown text (a string of several lines, e.g.
    ``hf_efficient_attn.eval.report.to_markdown(reports)``) or the path of a Markdown file (the ``report.md``
    that ``hfa eval`` writes); None (the default) leaves the card without one. To share the checkpoint, upload
    the folder (``huggingface_hub.upload_folder``): ``model.push_to_hub`` sends the record in config.json but
    neither hfa.json, the buffers file nor this card.

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
    card_eval = eval_markdown(eval_table)
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
    history = conversion_history(model)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        with _config_record(model.config, history):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        buffers = _non_persistent_buffers(model)
        if buffers:
            from safetensors.torch import save_file
            save_file(buffers, tmp / BUFFERS_FILE)
        model_card(model, target.name, card_eval).save(tmp / CARD_FILE)
        from .. import __version__
        record = {"hf_efficient_attn": __version__,
                  "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                  "attn_implementation": model.config._attn_implementation,
                  "conversions": history,
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


# what `load` downloads of a Hub repo: what save_pretrained, tokenizers and `save` write (not .bin, .onnx, .gguf)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja", CARD_FILE]


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id

    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except ValueError:        # HFValidationError
        return False
    return True


def download_checkpoint(repo_id: str, *, revision: str | None = None, token=None) -> Path:
    """The local folder of Hub repo `repo_id` (a snapshot in the Hugging Face cache, downloaded if needed, as
    ``from_pretrained`` does): its checkpoint files (`HUB_FILES`), and any other file its ``hfa.json`` lists.
    Raises `MissingFileError` saying what to do when the repo, its revision or the Hub cannot be reached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    at = f" at revision {revision!r}" if revision else ""
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, token=token, allow_patterns=HUB_FILES))
        listed = [f for f in _read_record(folder).get("files") or {} if not (folder / f).exists()]
        if listed:      # files of ours the patterns do not cover: fetched from the same commit
            folder = Path(snapshot_download(repo_id, revision=folder.name, token=token, allow_patterns=listed))
    except GatedRepoError as e:
        raise MissingFileError(f"{repo_id} on the Hugging Face Hub is gated: accept its terms at "
                               f"https://huggingface.co/{repo_id}, then log in (`hf auth login`) or pass "
                               "token=...") from e
    except RevisionNotFoundError as e:
        raise MissingFileError(f"{repo_id} on the Hugging Face Hub has no revision {revision!r}: pass a branch, "
                               "tag or commit it has (or leave revision out for main)") from e
    except RepositoryNotFoundError as e:
        raise MissingFileError(f"no checkpoint folder {repo_id!r} here, and no model {repo_id!r} on the Hugging "
                               "Face Hub (or it is private: log in with `hf auth login` or pass token=...). "
                               "Check the path or the Hub id ('user/name')") from e
    except LocalEntryNotFoundError as e:
        raise MissingFileError(f"cannot download {repo_id!r}{at}: there is no local folder of that name, the "
                               "Hugging Face Hub cannot be reached (no network, or HF_HUB_OFFLINE=1), and it is not "
                               "in the local Hugging Face cache. Connect and retry (unset HF_HUB_OFFLINE), download "
                               f"it once where the Hub is reachable (`hf download {repo_id}`), or pass the path of a "
                               "local checkpoint folder") from e
    if not any(folder.glob("*.safetensors")):
        raise MissingFileError(f"the Hub repo {repo_id}{at} has no safetensors weights, which hfa.load reads: "
                               "load it with transformers' AutoModelForCausalLM.from_pretrained instead")
    return folder


def _checkpoint_folder(path, revision, token) -> tuple[Path, str | None]:
    """(the local folder of checkpoint `path`, its Hub id if it was downloaded)."""
    local = Path(path).expanduser()
    if local.exists() or isinstance(path, os.PathLike) or not isinstance(path, str) or not _is_hub_id(path):
        if revision is not None or token is not None:
            raise OptionError(f"revision= and token= apply to a Hub id ('user/name'); {str(path)!r} is "
                              f"{'a local path' if local.exists() else 'not one'}: leave them out")
        if not local.exists():
            raise MissingFileError(f"no checkpoint folder at {local} (nor is {str(path)!r} a Hub id 'user/name')")
        if not (local / "config.json").exists():
            raise MissingFileError(f"{local} is not a checkpoint folder (no config.json)")
        return local, None
    return download_checkpoint(path, revision=revision, token=token), path


def load(path, *, dtype=None, attn_implementation: str | None = None, device=None, verify: bool = True,
         revision: str | None = None, token=None):
    """Load a checkpoint written by `save` (or any causal-LM checkpoint in safetensors) in eval mode; an encoder's
    (architectures naming no causal LM, e.g. BertModel or a Linformer encoder) loads with AutoModel.

    path: a local checkpoint folder, or a Hugging Face Hub id (``"user/name"``, as ``from_pretrained`` takes;
    a local folder of that name wins), downloaded with `download_checkpoint` into the Hugging Face cache
    (``$HF_HOME``; `revision` and `token` as in ``from_pretrained``) and then loaded like a local folder.
    By default the model comes back with the dtype and attention implementation it was saved with, and
    the buffers it had (restored from ``hfa_buffers.safetensors``), so its logits are bit-identical to the saved
    model's. With `verify` (the default), every file is first checked against the sha256 in the record
    (`verify_checkpoint`). ``model.hfa_conversions`` is the record of ``hfa.json``, else of ``config.json``. The
    tokenizer, if saved, loads with ``AutoTokenizer.from_pretrained(path)`` (a Hub id works there too).
    """
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path, hub_id = _checkpoint_folder(path, revision, token)
    record = _read_record(path)
    if verify:
        verify_checkpoint(path)
    saved_dtype = getattr(torch, record.get("dtype", ""), None)
    kwargs = {"dtype": dtype or saved_dtype or "auto"}
    impl = attn_implementation or record.get("attn_implementation")
    if impl:
        kwargs["attn_implementation"] = impl
    try:
        auto = AutoModelForCausalLM if _is_causal_lm(AutoConfig.from_pretrained(path)) else AutoModel
        model = auto.from_pretrained(path, **kwargs)
    except SafetensorError as e:
        raise CheckpointError(f"the checkpoint {path} is damaged: {_unreadable_weights(path)}. It is truncated or "
                              f"corrupt: copy or save it again ({type(e).__name__}: {e})") from e
    if (path / BUFFERS_FILE).exists() and (dtype is None or _torch_dtype_of(dtype) == saved_dtype):
        _restore_buffers(model, path)
    set_conversion_history(model, record["conversions"] if "conversions" in record else conversion_history(model))
    if hub_id is not None:       # as from_pretrained(hub_id) names it: a conversion's record says where it came from
        model.name_or_path = hub_id
        model.config._name_or_path = hub_id
    if device is not None:
        model.to(device)
    return model.eval()


def _is_causal_lm(config) -> bool:
    """Whether `config` is a causal LM's (AutoModelForCausalLM loads it), else an encoder's (AutoModel): a config
    transformers maps to a causal LM, unless its architectures name none (BertModel: a BERT config maps to
    BertLMHeadModel too)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return False
    return type(config) in MODEL_FOR_CAUSAL_LM_MAPPING


def _torch_dtype_of(dtype):
    return getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
