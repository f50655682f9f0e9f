"""Softmax -> Linformer self-attention for non-causal encoders (BERT): K and V projected along the sequence to k rows.

    new = convert_linformer(encoder, k=64, share_kv=True)          # exact for inputs of <= k tokens
    blocks = encoder_token_blocks(tok, texts, seq_len=256)          # [CLS] ... [SEP] blocks, int64 (n, 256)
    distill(new, encoder, blocks, stage="encoder", max_tokens=...)  # heal: token + mean-pooled outputs

`convert_linformer` keeps every weight of the encoder and adds per layer the sequence projection E (and F with
``share_kv=False``), initialised to the identity on the first k positions (see ``attention.linformer`` for the
layer, the masking of padding and of empty rows, and why). Inputs of up to k tokens give the original's outputs
exactly; longer ones are an approximation until healed, and inputs past `max_length` are refused.

Healing, stage ``"encoder"`` (`encoder_distill_loss`): the student's ``last_hidden_state`` against the teacher's
(MSE over real tokens) plus ``1 - cosine`` of their mean-pooled embeddings (the sentence embedding of
sentence-transformers models such as all-MiniLM-L6-v2: the mean over real tokens). Tokens equal to the config's
``pad_token_id`` are padding. The stage runs the student with dropout off (as the teacher): a short heal matches
deterministic outputs. Without `trainable`, it trains ``TRAINABLE["linformer"]`` (`LINFORMER_TRAINABLE`: the E/F
projections only, everything else stays as pretrained); ``"linformer_attention"`` also trains the layers'
query/key/value projections (measured better on MiniLM, see conversions/linformer_minilm.py). ``"lora"`` alone
does not fit: peft freezes every non-adapter weight, E/F included, so tokens past k stay unseen. The loss weights
(``hidden_weight``, ``pooled_weight``, ``dropout``) are keyword options of the loss: pass them as distill's
``stage_options={"hidden_weight": 0.5}``, or register a stage with other defaults,
``register_stage(encoder_stage("encoder_pooled", hidden_weight=0.0))``.

Healing trains E's first k columns too (and q/k/v with ``"linformer_attention"``), so afterwards inputs of <= k
tokens are no longer exact: heal on mixed lengths (``encoder_token_blocks(..., min_length=16)``) to keep them in
the objective (measured on MiniLM in conversions/linformer_minilm.py).

Importing this module registers the stage ``"encoder"`` and the selectors ``"linformer"`` and
``"linformer_attention"`` (with their default learning rates) with ``conversions.distill``.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel

from ..attention.linformer import (LINFORMER_PARAMETERS, LinformerBertConfig, LinformerBertModel,
                                   LinformerSelfAttention, validate_linformer_options)
from ..errors import HFAError, OptionError
from .distill import DEFAULT_LR, TRAINABLE, Stage, register_stage
from .io import token_blocks
from .toolkit import config_fields, provenance_record, rebuild

__all__ = ["LINFORMER_ATTENTION_TRAINABLE", "LINFORMER_TRAINABLE", "LinformerTrainable", "check_encoder_student",
           "check_linformer_student", "convert_linformer", "encoder_distill_loss", "encoder_stage",
           "encoder_token_blocks", "is_causal", "linformer_transfer_loss", "mean_pool", "pooled_cosine"]

_ALTERNATIVES = ("hfa.convert(model, 'linear') (linear attention: causal, constant-size state) or a sliding window "
                 "with global tokens, hfa.patch(model, sparse=hfa.sparse.longformer(...)) (or hfa.convert(model, "
                 "'longformer') where available)")


def is_causal(model) -> bool:
    """Whether `model` attends causally: a decoder config, a causal-LM class, or a model that generates."""
    if getattr(getattr(model, "config", None), "is_decoder", False):
        return True
    if type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    can_generate = getattr(model, "can_generate", None)
    return bool(callable(can_generate) and can_generate())


def _check_encoder(model) -> None:
    if is_causal(model):
        raise HFAError(
            f"Linformer does not apply to {type(model).__name__}, a causal model: it projects the keys and values "
            "along the sequence, so every projected key mixes in future tokens and a token would see the tokens "
            f"after it. It is for non-causal encoders (BERT). For a causal model use {_ALTERNATIVES}")
    model_type = getattr(model.config, "model_type", None)
    if model_type == LinformerBertConfig.model_type:
        raise HFAError("this encoder is a Linformer encoder already (model_type 'hfa_linformer_bert'): convert the "
                       "original encoder instead")
    if model_type != "bert":
        raise HFAError(f"the Linformer conversion supports BERT encoders (model_type 'bert', e.g. all-MiniLM-L6-v2 "
                       f"via hfa.load_model('minilm-l6')), got model_type {model_type!r} ({type(model).__name__})")
    if type(model) is not BertModel:
        raise HFAError(f"the Linformer conversion takes the encoder itself, a BertModel; got {type(model).__name__}. "
                       "Pass the encoder inside it (e.g. model.bert) or load it with AutoModel")


def convert_linformer(encoder, k: int = 64, share_kv: bool = True, max_length: int | None = None):
    """A copy of BERT encoder `encoder` whose self-attention projects K and V along the sequence to `k` rows.

    k: the projected length (K' = E K, V' = F V with E, F of shape (k, max_length) per layer). share_kv: True (the
    default) uses one projection per layer for keys and values (E = F, Linformer's "key-value sharing"); False
    gives each layer its own E (keys) and F (values); either way all heads of a layer share them ("headwise"
    sharing; one matrix across layers is not offered). max_length: the longest input the converted encoder
    takes (None: ``config.max_position_embeddings``, 512 for MiniLM); longer inputs raise `HFAError`.

    E/F start as the identity on the first k positions, so inputs of up to k tokens (padding included) give the
    original's outputs; longer inputs ignore their keys past position k until healed with stage "encoder".
    Causal models (decoders, causal LMs) are refused: projecting the sequence mixes future tokens into every key.
    `encoder` is not modified."""
    _check_encoder(encoder)
    max_positions = encoder.config.max_position_embeddings
    if max_length is None:
        max_length = max_positions
    opts = {"k": k, "share_kv": share_kv, "max_length": max_length}
    validate_linformer_options(opts, max_positions)
    record = provenance_record("linformer", encoder, **opts)
    fields = {**config_fields(encoder), "hfa_linformer": {**opts, "pooler": encoder.pooler is not None}}
    return rebuild(encoder, LinformerBertConfig, LinformerBertModel, fields, encoder.state_dict(), record,
                   new_weights=LINFORMER_PARAMETERS)


# -- what heals -------------------------------------------------------------------------------------------

class LinformerTrainable:
    """A selector for `distill`'s ``trainable``: the E/F projections of every Linformer layer (``"linformer"``,
    `LINFORMER_TRAINABLE`), and with ``attention=True`` also those layers' query/key/value projections
    (``"linformer_attention"``, `LINFORMER_ATTENTION_TRAINABLE`). The embeddings, MLPs, norms and pooler stay."""

    def __init__(self, attention: bool = False):
        self.attention = attention
        self.names = LINFORMER_PARAMETERS + (("query", "key", "value") if attention else ())

    def __call__(self, name: str, param) -> bool:
        owner, sep, rest = name.rpartition(".attention.self.")
        return bool(sep) and rest.split(".")[0] in self.names


LINFORMER_TRAINABLE = LinformerTrainable()
LINFORMER_ATTENTION_TRAINABLE = LinformerTrainable(attention=True)


# -- the encoder distillation stage -------------------------------------------------------------------------

def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over real tokens (sentence-transformers' mean pooling): hidden (B, n, C), mask (B, n) -> (B, C)."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def pooled_cosine(model, reference, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  batch_size: int = 16) -> torch.Tensor:
    """Cosine similarity (n,) between `model`'s and `reference`'s mean-pooled embeddings of `input_ids` (n, L)
    (`attention_mask` (n, L), None: every token is real), in batches of `batch_size`, in eval mode (restored)."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    modes = [(m, m.training) for m in (model, reference)]
    try:
        out = []
        for ids, msk in zip(input_ids.split(batch_size), mask.split(batch_size)):
            a, b = (mean_pool(m.eval()(input_ids=ids, attention_mask=msk).last_hidden_state.float(), msk)
                    for m in (model, reference))
            out.append(F.cosine_similarity(a, b, dim=-1))
        return torch.cat(out)
    finally:
        for m, mode in modes:
            m.train(mode)


@contextmanager
def _dropout_off(model: nn.Module):
    """Every ``nn.Dropout`` of `model` in eval mode for the duration of the ``with`` (the rest keeps its mode, so
    activation checkpointing, which runs only in training mode, stays on)."""
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.training]
    for m in drops:
        m.eval()
    try:
        yield
    finally:
        for m in drops:
            m.train()


def _inner(model):
    return getattr(model, "module", model)     # a DDP-wrapped student (accelerate) holds the model in .module


def encoder_distill_loss(student, teacher, input_ids, attention_mask=None, *, hidden_weight: float = 1.0,
                         pooled_weight: float = 1.0, dropout: bool = False, **_):
    """``hidden_weight`` x MSE(student, teacher last_hidden_state) over real tokens + ``pooled_weight`` x
    (1 - cosine) of their mean-pooled embeddings, averaged over the batch.

    input_ids: (B, n). attention_mask: (B, n), 1 = real token (None: every token but the config's
    ``pad_token_id``). dropout: keep the student's dropout on (default off: the teacher runs in eval mode). Other
    keyword options (distill's ``kl_weight`` etc.) are ignored. Returns ``(loss, {"hidden_mse", "pooled_cosine"})``."""
    if attention_mask is None:
        pad = getattr(_inner(student).config, "pad_token_id", None)
        attention_mask = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(input_ids.device)
    with torch.no_grad():
        want = teacher(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()   # (B, n, C)
    with (nullcontext() if dropout else _dropout_off(student)):
        got = student(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
    assert got.shape == want.shape, f"student {tuple(got.shape)} != teacher {tuple(want.shape)}"
    m = attention_mask.float()[..., None]
    mse = ((got - want).pow(2) * m).sum() / (m.sum() * got.shape[-1]).clamp_min(1.0)
    cosine = F.cosine_similarity(mean_pool(got, attention_mask), mean_pool(want, attention_mask), dim=-1).mean()
    loss = hidden_weight * mse + pooled_weight * (1 - cosine)
    return loss, {"hidden_mse": mse.detach(), "pooled_cosine": cosine.detach()}


def linformer_transfer_loss(student, teacher, input_ids, attention_mask=None, **_):
    """Mean over Linformer layers of ||student layer(x_i) - teacher layer(x_i)||^2 / ||teacher layer(x_i)||^2 over
    real tokens, x_i the TEACHER's input to self-attention layer i on `input_ids` (B, n): each layer's E/F learn
    on their own, from the layer's own error (LoLCATs' attention transfer). Returns ``(loss, {"attention_mse"})``."""
    if attention_mask is None:
        pad = getattr(_inner(student).config, "pad_token_id", None)
        attention_mask = input_ids != pad if pad is not None else torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(input_ids.device).bool()
    students = {m.layer_idx: m for m in _inner(student).modules() if isinstance(m, LinformerSelfAttention)}
    layers = _inner(teacher).encoder.layer
    captured = {}

    def capture(i):
        def hook(module, args, kwargs, output):
            h = kwargs.get("hidden_states", args[0] if args else None)
            captured[i] = (h.detach(), output[0].detach())
        return hook

    handles = [layers[i].attention.self.register_forward_hook(capture(i), with_kwargs=True) for i in students]
    try:
        with torch.no_grad():
            teacher(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    m = attention_mask[..., None].float()
    errors = []
    for i, attn in students.items():
        h, want = captured[i]
        with _dropout_off(attn):
            got, _ = attn(h, linformer_key_mask=attention_mask)
        err = ((got.float() - want.float()).pow(2) * m).sum() / ((want.float().pow(2) * m).sum()).clamp_min(1e-12)
        errors.append(err)
    loss = torch.stack(errors).mean()
    return loss, {"attention_mse": loss.detach()}


def check_encoder_student(student) -> None:
    """Stage "encoder"'s check: the student must be a non-causal encoder (it returns ``last_hidden_state``)."""
    if is_causal(_inner(student)):
        raise HFAError(f"stage 'encoder' distils an encoder's token outputs and mean-pooled embeddings; "
                       f"{type(_inner(student)).__name__} is a causal model: heal it with stage='logits'")


def check_linformer_student(student) -> None:
    """Stage "linformer_transfer"'s check: the student must have Linformer layers (made by `convert_linformer`)."""
    check_encoder_student(student)
    if not any(isinstance(m, LinformerSelfAttention) for m in _inner(student).modules()):
        raise HFAError(f"stage 'linformer_transfer' trains Linformer layers, and {type(_inner(student)).__name__} "
                       "has none: convert it with convert_linformer first (or heal it with stage='encoder')")


def encoder_stage(name: str = "encoder", *, hidden_weight: float = 1.0, pooled_weight: float = 1.0,
                  dropout: bool = False) -> Stage:
    """The encoder distillation stage (`encoder_distill_loss`) with these weights, as a `Stage` named `name`:
    ``register_stage(encoder_stage("encoder_pooled", hidden_weight=0.0))`` adds a pooled-only variant."""
    for opt, value in (("hidden_weight", hidden_weight), ("pooled_weight", pooled_weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise OptionError(f"{opt} must be a number >= 0, got {value!r}")
    if not isinstance(dropout, bool):
        raise OptionError(f"dropout must be True or False, got {dropout!r}")
    loss = functools.partial(encoder_distill_loss, hidden_weight=float(hidden_weight),
                             pooled_weight=float(pooled_weight), dropout=dropout)
    return Stage(name, loss, f"encoder outputs: {hidden_weight:g} x MSE of the token outputs over real tokens + "
                             f"{pooled_weight:g} x (1 - cosine) of the mean-pooled embeddings",
                 check=check_encoder_student, default_trainable="linformer")


def encoder_token_blocks(tokenizer, data, seq_len: int, max_tokens: int | None = None, *,
                         min_length: int | None = None, seed: int = 0) -> torch.Tensor:
    """`data` as encoder inputs: ``int64 (n, seq_len)`` blocks of ``[CLS] + seq_len - 2 stream tokens + [SEP]``
    (the shape a BERT tokenizer gives one long sentence), at most ``max_tokens // seq_len`` of them. Pass them as
    `distill`'s data (with ``seq_len=seq_len``) to heal on inputs shaped as the encoder sees them.

    min_length: give each block a length drawn uniformly from [min_length, seq_len] (seeded by `seed`): [CLS] +
    text + [SEP], then the tokenizer's padding, which stage "encoder" masks (``pad_token_id``). A heal on one
    length moves the outputs at every length (E/F's first columns serve short inputs too): mixed lengths keep
    the short inputs in the objective."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 4:
        raise OptionError(f"seq_len must be an integer >= 4 ([CLS] + at least 2 tokens + [SEP]), got {seq_len!r}")
    if min_length is not None and (isinstance(min_length, bool) or not isinstance(min_length, int)
                                   or not 3 <= min_length <= seq_len):
        raise OptionError(f"min_length must be an integer in [3, seq_len={seq_len}] or None, got {min_length!r}")
    cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
    if cls is None or sep is None:
        raise HFAError(f"the tokenizer has no [CLS]/[SEP] tokens ({type(tokenizer).__name__}): use "
                       "io.token_blocks for plain token blocks")
    n_max = None if max_tokens is None else max(1, max_tokens // seq_len)
    inner = token_blocks(tokenizer, data, seq_len - 2, None if n_max is None else n_max * (seq_len - 2))
    n = len(inner)
    blocks = torch.cat([torch.full((n, 1), cls, dtype=torch.long), inner, torch.full((n, 1), sep, dtype=torch.long)],
                       1)
    if min_length is not None:
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise HFAError("min_length pads the blocks, and the tokenizer has no pad token: leave min_length out")
        lengths = torch.randint(min_length, seq_len + 1, (n, 1), generator=torch.Generator().manual_seed(seed))
        pos = torch.arange(seq_len)[None]
        blocks = torch.where(pos < lengths - 1, blocks, torch.where(pos == lengths - 1, sep, pad))
    return blocks


# -- registration with distill -----------------------------------------------------------------------------

TRAINABLE.setdefault("linformer", LINFORMER_TRAINABLE)
TRAINABLE.setdefault("linformer_attention", LINFORMER_ATTENTION_TRAINABLE)
# MiniLM, k=64, 8 x 256 tokens a step (conversions/linformer_minilm.py): E/F alone move slowly at 1e-3 (pooled cosine
# 0.75 -> 0.77 in 16 steps), get worse at 3e-3 and collapse at 1e-2 (cosine 0.04); with query/key/value, 1e-3 gives
# 0.85 after 96 steps, 3e-4 the same as 1e-3 over 24 steps, 2e-3 worse (0.70)
DEFAULT_LR.setdefault("linformer", 1e-3)
DEFAULT_LR.setdefault("linformer_attention", 1e-3)
register_stage(Stage("linformer_transfer", linformer_transfer_loss, "per-layer attention-output MSE to the teacher's "
                     "layer, each on the teacher's own inputs", check=check_linformer_student,
                     default_trainable="linformer"))
register_stage(Stage("encoder", encoder_distill_loss, encoder_stage().description, check=check_encoder_student,
                     default_trainable="linformer"))
