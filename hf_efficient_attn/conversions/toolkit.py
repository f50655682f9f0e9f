"""What every conversion, and the evaluation layer above, does the same way: one definition each.

    calibration_forward(model, ids, [(layer.self_attn, hook)])   # eval mode, no grad, logits_to_keep=1
    new = rebuild(model, LlamaMLAConfig, LlamaMLAForCausalLM, fields, state, record)
    record = provenance_record("gqa", model, method="pca")       # -> new.hfa_conversions, config.json, hfa.json
    atomic_write(path, lambda tmp: tmp.write_text("..."))        # complete or absent, never half-written
    DOCUMENT_SEPARATOR, tokenizer_adds_bos(tok)                  # how text becomes one token stream

Calibration and evaluation read text the same way (documents joined by `DOCUMENT_SEPARATOR`, BOS where the
tokenizer adds one), so the activations a conversion fits are those the perplexity protocol scores.
"""

from __future__ import annotations

import inspect
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["CONFIG_RECORD_KEY", "DOCUMENT_SEPARATOR", "accepts_logits_to_keep", "atomic_write", "calibration_forward",
           "config_fields", "conversion_history", "provenance_record", "rebuild", "set_conversion_history",
           "tokenizer_adds_bos", "with_provenance"]


# -- text ---------------------------------------------------------------------------------------------

DOCUMENT_SEPARATOR = "\n\n"   # between documents of one token stream (calibration, training and evaluation)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer(text)`` prepends its BOS token by default (checked, not read from a flag)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos and (not without or without[0] != bos)


# -- calibration --------------------------------------------------------------------------------------

def accepts_logits_to_keep(model) -> bool:
    """Whether `model.forward` takes ``logits_to_keep`` (the LM head then computes only the last positions)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def calibration_forward(model, input_ids: torch.Tensor, hooks: Iterable[tuple[torch.nn.Module, Callable]],
                        batch_size: int = 4, progress: bool = False) -> None:
    """Run `model` over `input_ids` (n, L) in batches of `batch_size`, in eval mode and without gradients, with
    every ``(module, hook)`` of `hooks` attached as a forward hook ``hook(module, args, kwargs, output)`` (kwargs
    included, so a hook reads a layer's inputs as well as its output). The hooks are removed and the training
    mode restored afterwards, also on an error.

    Only what the hooks see matters, so the LM head computes the last position only (``logits_to_keep=1``,
    which every causal LM of transformers 5 takes): full (tokens, vocab) logits are 2 GB a batch for Gemma's
    262k vocabulary."""
    was_training = model.training
    handles = []
    try:
        handles = [module.register_forward_hook(hook, with_kwargs=True) for module, hook in hooks]
        model.eval()
        kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
        device = next(model.parameters()).device
        batches = input_ids.split(batch_size)
        if progress:
            from tqdm.auto import tqdm
            batches = tqdm(batches, desc="calibration", unit="batch")
        for ids in batches:
            model(input_ids=ids.to(device), use_cache=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


# -- the converted model ------------------------------------------------------------------------------

CONFIG_RECORD_KEY = "hfa_conversions"   # the conversion record in config.json: it travels with push_to_hub


def provenance_record(conversion: str, model, **options) -> dict:
    """What the result of `conversion` keeps of how it was made (``hfa_conversions``, saved in ``config.json`` and
    ``hfa.json``): the conversion's name, its options, and the checkpoint `model` was loaded from (``"source"``; None
    if unknown). Add measured facts (energy kept, calibration tokens) with ``record.update``."""
    return {"conversion": conversion, **options, "source": getattr(model, "name_or_path", None) or None}


def conversion_history(model) -> list[dict]:
    """The conversions (and heals) `model` went through, oldest first: ``model.hfa_conversions``, else the record its
    config carries (a model loaded by stock ``from_pretrained`` or ``pipeline(model=path)``), else ``[]``."""
    history = getattr(model, "hfa_conversions", None)
    if history is None:
        history = getattr(getattr(model, "config", None), CONFIG_RECORD_KEY, None)
    return list(history or [])


def set_conversion_history(model, history: list[dict]):
    """Set `model`'s record to `history`, on the model (``hfa_conversions``) and in its config (``config.json``'s
    ``hfa_conversions``, as JSON: what ``save_pretrained`` and ``push_to_hub`` write); returns `model`. An empty
    history leaves the config as it was, so a model never converted saves a stock config."""
    model.hfa_conversions = list(history)
    config = getattr(model, "config", None)
    if config is not None and (history or hasattr(config, CONFIG_RECORD_KEY)):
        setattr(config, CONFIG_RECORD_KEY, json.loads(json.dumps(list(history), default=str)))
    return model


def with_provenance(new, model, record: dict):
    """`new`, its record (`set_conversion_history`) set to `model`'s history followed by `record`; returns `new`."""
    return set_conversion_history(new, [*conversion_history(model), record])


def config_fields(model) -> dict:
    """`model`'s config as keyword arguments for another config class of its family (its ``model_type``,
    ``architectures``, ``transformers_version`` and conversion record left out: the new class has its own)."""
    return {k: v for k, v in model.config.to_dict().items()
            if k not in ("model_type", "architectures", "transformers_version", CONFIG_RECORD_KEY)}


def rebuild(model, config_cls, model_cls, fields: dict, state: dict, record: dict, new_weights: tuple = ()):
    """A new ``model_cls(config_cls(**fields))`` holding `state`, in `model`'s dtype, device, training mode and
    attention implementation, with `model`'s ``name_or_path`` and its provenance plus `record`.

    Every key of `state` must be a weight of the new model, and every weight of the new model must come from
    `state`, except those whose names contain one of `new_weights` (modules the conversion adds and initialises
    itself) and a tied LM head."""
    config = config_cls(**fields, architectures=[model_cls.__name__])
    config._attn_implementation = model.config._attn_implementation
    param = next(model.parameters())
    new = model_cls(config).to(dtype=param.dtype, device=param.device)
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected, f"unexpected weights {unexpected[:5]}"
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    unfilled = [k for k in missing if not (any(n in k for n in new_weights) or (tied and k.startswith("lm_head")))]
    assert not unfilled, f"weights left at their initial values: {unfilled[:5]}"
    new.train(model.training)
    new.name_or_path = getattr(model, "name_or_path", "")
    return with_provenance(new, model, record)


# -- files --------------------------------------------------------------------------------------------

def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink(missing_ok=True)


def atomic_write(path, write: Callable[[Path], object]) -> Path:
    """Put `path` in place complete or not at all; returns it as a `Path`.

    ``write(tmp)`` creates a file or a folder at `tmp`, a fresh name beside `path` (``.<name>.tmp-<pid>-<hex>``,
    in the same folder, so one rename moves it); then a rename puts it at `path`. On any error or interruption
    before that (Ctrl-C included) `tmp` is removed and `path` is as it was. A folder already at `path` is set
    aside as ``.<name>.old-<pid>`` for the swap (a folder cannot be renamed over a non-empty one), then removed, or
    put back if the new one could not take its place. The parent folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    old = None
    try:
        write(tmp)
        if tmp.is_dir() and path.is_dir():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.rename(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not os.path.lexists(path):
            os.rename(old, path)
            old = None
        raise
    finally:
        _remove(tmp)
        if old is not None:
            _remove(old)
    return path
