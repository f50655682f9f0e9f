"""Ring attention on a Hugging Face model: ``hfa.patch(model, backend="ring")`` and the ``hfa.ring`` helpers.

Under ``torchrun --nproc-per-node W`` (or ``accelerate launch``) with a process group, every rank holds the same
model and ``1/W`` of each sequence; each softmax attention layer then computes exact attention over the whole
sequence with :func:`hf_efficient_attn.kernels.ring.ring_attention` (K/V blocks travel between ranks). Everything
else in the model (embeddings, MLPs, norms, RoPE) is per token, so it runs on the local tokens unchanged.

* :func:`prepare` splits a batch: ``input_ids``/``attention_mask`` (and shifted ``labels``) sharded in the zigzag
  order, ``position_ids`` following (real tokens count ``0, 1, ...`` as transformers' left padding does), and a
  length the split cannot divide left-padded and masked. :func:`shard` / :func:`gather` split and re-join any
  tensor along a sequence dim.
* The layer checks what it receives: ``position_ids`` that do not match the layout (a model called on sharded ids
  without the sharded positions, which would silently rotate keys by the wrong positions) raise a ValueError
  naming :func:`prepare`.
* Decoding: after a ring prefill each rank keeps its slice of the prompt's KV cache; a new token is attended on
  every rank over its slice and the partial results merge with one all-gather of (out, lse) per layer. New
  tokens are appended to the cache of every rank (transformers' cache appends on each) but each is counted on one
  rank only (token ``t`` of the continuation on rank ``t % W``); the prompt, the bulk of a long cache, stays
  split. :func:`generate` runs greedy decoding this way and returns the same tokens on every rank.
* :func:`lm_loss`: the causal-LM loss of the whole sequence from each rank's logits (sum over local tokens /
  tokens of the whole batch), so summing parameter gradients over ranks gives the single-process gradient.

What the ring layer computes exactly: causal or bidirectional attention, sliding windows, key padding, GQA. It
refuses (ValueError, naming the feature) explicit 4-D masks, softcap, attention sinks, dropout and packed
sequences rather than computing something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..kernels.ring import (LAYOUTS, MODES, group_info, ring_attention, ring_decode_attention, shard_positions,
                            shard_tensor, unshard_tensor)
from ..kernels.ring.layout import check_length
from .backends import log_once
from .model_io import cache_kwarg, output_cache

__all__ = ["RingSettings", "attached", "gather", "generate", "lm_loss", "prepare", "settings", "shard"]

_SETTINGS_ATTR = "_hfa_ring_settings"
_PROMPT_ATTR = "_hfa_ring_prompt"


@dataclass(frozen=True)
class RingSettings:
    """What ``hfa.patch(model, backend="ring", group=..., ring_mode=..., ring_layout=...)`` chose."""
    group: object = None
    mode: str = "auto"
    layout: str = "zigzag"


@dataclass
class _Prompt:
    """What a layer's ring prefill leaves for its decode steps."""
    seq_len: int          # global prompt length (incl. the padding prepare added)
    local_len: int        # this rank's prompt tokens in the cache
    real: torch.Tensor    # [B] real prompt tokens per row (the position of the first new token)


def check_settings(group, mode, layout) -> RingSettings:
    if mode not in MODES:
        raise ValueError(f"unknown ring_mode {mode!r}; choose one of {', '.join(MODES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ring_layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    group_info(group)  # outside a process group: the error naming torchrun, at patch time
    return RingSettings(group=group, mode=mode, layout=layout)


def attach(model, ring: RingSettings) -> None:
    for m in model.modules():
        m.__dict__[_SETTINGS_ATTR] = ring
        m.__dict__.pop(_PROMPT_ATTR, None)


def detach(model) -> None:
    for m in model.modules():
        m.__dict__.pop(_SETTINGS_ATTR, None)
        m.__dict__.pop(_PROMPT_ATTR, None)


def attached(model) -> RingSettings | None:
    """The settings :func:`attach` gave the model, or None."""
    return model.__dict__.get(_SETTINGS_ATTR)


def settings(model_or_module) -> RingSettings:
    """The ring settings of a patched model or layer (defaults when loaded with ``attn_implementation='hfa_ring'``)."""
    return model_or_module.__dict__.get(_SETTINGS_ATTR) or RingSettings()


# -------------------------------------------------------------------------------------------------
# splitting sequences
# -------------------------------------------------------------------------------------------------

def shard(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """This rank's part of ``x`` along ``dim`` (the full sequence, the same on every rank) in ``layout``'s order."""
    world, rank = group_info(group)
    return shard_tensor(x, dim, world, rank, layout)


def gather(x: torch.Tensor, dim: int = 1, group=None, layout: str = "zigzag") -> torch.Tensor:
    """The full sequence from every rank's part along ``dim`` (every rank gets it): the inverse of :func:`shard`."""
    world, _ = group_info(group)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return unshard_tensor(parts, dim, layout)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """transformers' positions under padding: real tokens count 0, 1, ... (padding gets 0)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def prepare(input_ids, attention_mask=None, labels=None, *, group=None, layout: str = "zigzag",
            pad_token_id: int = 0) -> dict:
    """Split one batch over the ranks: a dict of this rank's ``input_ids``, ``position_ids``, ``attention_mask`` and, with ``labels``, ``shift_labels`` (label of the NEXT token, -100 where none:
    shift before splitting, since the model's own shift would pair tokens of different chunks).

    input_ids: [B, S], the same full batch on every rank. A length the layout cannot split (zigzag: a multiple of
    2W) is left-padded with ``pad_token_id`` and masked. Use as ``out = model(**{k: v for k, v in b.items() if k !=
    'shift_labels'})`` and :func:`lm_loss`."""
    world, rank = group_info(group)
    B, S = input_ids.shape
    parts = 2 * world if layout == "zigzag" else world
    pad = -S % parts
    mask = torch.ones_like(input_ids, dtype=torch.long) if attention_mask is None else attention_mask.long()
    if labels is not None:
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        shifted[:, :-1][mask[:, 1:] == 0] = -100
        shifted[mask == 0] = -100  # a padding position predicts nothing
    if pad:
        input_ids = torch.cat([input_ids.new_full((B, pad), pad_token_id), input_ids], dim=1)
        mask = torch.cat([mask.new_zeros(B, pad), mask], dim=1)
        if labels is not None:
            shifted = torch.cat([shifted.new_full((B, pad), -100), shifted], dim=1)
    check_length(S + pad, world, layout)
    sh = lambda t: shard_tensor(t, 1, world, rank, layout)  # noqa: E731
    # always a mask: with position_ids and no mask transformers reads the zigzag's jumps as packed sequences
    out = {"input_ids": sh(input_ids), "position_ids": sh(_positions(mask)), "attention_mask": sh(mask)}
    if labels is not None:
        out["shift_labels"] = sh(shifted)
    return out


def lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's share of the mean next-token cross-entropy of the WHOLE batch, from its logits [B, L, V] and
    ``shift_labels`` [B, L] (from :func:`prepare`): its tokens' summed loss / the token count over all ranks. The
    shares sum (over ranks) to the single-process loss, and so do their parameter gradients (all-reduce SUM, or a
    DDP wrapper's mean times W)."""
    count = (shift_labels != -100).sum().to(torch.float64)
    if dist.is_initialized():
        dist.all_reduce(count, group=group)
    total = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device),
                                              ignore_index=-100, reduction="sum")
    return total / count.clamp_min(1).to(total.dtype)


# -------------------------------------------------------------------------------------------------
# the attention layer
# -------------------------------------------------------------------------------------------------

def refuse_reason(opts, kwargs) -> str | None:
    """Why the ring layer cannot compute this call exactly (None when it can)."""
    if opts["attn_mask"] is not None:
        return "an explicit 4-D attention mask (packed sequences, a mask the layer rewrote, static caches)"
    if opts["softcap"] is not None:
        return "logit softcap"
    if opts["sinks"] is not None:
        return "attention sinks"
    if opts["dropout_p"]:
        return "attention dropout (call model.eval(), or set the config's attention_dropout to 0)"
    if kwargs.get("cu_seq_lens_q") is not None:
        return "packed sequences (cu_seq_lens)"
    return None


def _gather_rows(x, group, world):
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def _check_positions(position_ids, expected, real, what):
    """position_ids the model rotated q/k by must be the layout's (at real tokens)."""
    if position_ids is None:
        log_once("hf_efficient_attn: this model does not pass position_ids to its attention layers, so the ring "
                 "backend cannot check that the sharded positions are right; pass hfa.ring.prepare(...)'s "
                 "position_ids to the model")
        return
    pid = position_ids.to(expected.device).expand_as(expected)
    if not torch.equal(torch.where(real, pid, 0), torch.where(real, expected, 0)):
        raise ValueError(
            f"ring attention ({what}): the model ran with position_ids that do not match this rank's tokens in the "
            f"ring layout, so RoPE rotated them by the wrong positions. Split batches with hfa.ring.prepare(ids, "
            f"attention_mask=...) and pass all its outputs to the model (its position_ids above all), or use "
            f"hfa.ring.generate for decoding.")


def attend(module, query, key, value, opts, kwargs, local: str):
    """One ring attention call of a patched layer: [B, Hq, Sq, Dv] (see the module docstring)."""
    ring = settings(module)
    world, rank = group_info(ring.group)
    B, Sq, Skv = query.shape[0], query.shape[2], key.shape[2]
    padding = opts["key_padding_mask"]
    local_real = torch.ones(B, Skv, dtype=torch.bool, device=query.device) if padding is None else padding.bool()
    position_ids = kwargs.get("position_ids")
    if Sq == Skv:  # a prefill: this rank's shard of the whole sequence
        S = Sq * world
        check_length(S, world, ring.layout)
        real = unshard_tensor(_gather_rows(local_real, ring.group, world), 1, ring.layout)  # [B, S], every rank's
        expected = shard_tensor(_positions(real), 1, world, rank, ring.layout)
        _check_positions(position_ids, expected, local_real, "prefill")
        out, _ = ring_attention(query, key, value, group=ring.group, scale=opts["scale"], causal=opts["causal"],
                                window=opts["window"], key_padding_mask=padding, layout=ring.layout, mode=ring.mode,
                                local=local)
        module.__dict__[_PROMPT_ATTR] = _Prompt(seq_len=S, local_len=Sq, real=real.sum(-1))
        return out
    prompt = module.__dict__.get(_PROMPT_ATTR)
    if prompt is None:
        raise ValueError("ring attention: a call with a KV cache needs a ring prefill first (the prompt split over "
                         "the ranks, hfa.ring.prepare / hfa.ring.generate); this cache does not continue one")
    if Skv - Sq < prompt.local_len:
        raise ValueError(f"ring attention: {type(module).__name__}'s cache holds {Skv - Sq} past keys but this rank's "
                         f"share of the prompt was {prompt.local_len}: the cache dropped keys (a sliding-window cache "
                         f"layer keeps only this rank's last tokens, which are not the sequence's). Ring decoding needs "
                         f"full caches; run the decode steps of this model unpatched, or a model without sliding layers")
    n_new = Skv - prompt.local_len  # continuation tokens in this rank's cache, the current ones last
    dev = query.device
    steps = torch.arange(n_new, device=dev)
    k_pos = torch.cat([shard_positions(prompt.seq_len, world, rank, ring.layout, device=dev), prompt.seq_len + steps])
    mine = torch.cat([torch.ones(prompt.local_len, dtype=torch.bool, device=dev), steps % world == rank])
    expected = prompt.real.to(dev)[:, None] + steps[-Sq:][None, :]
    _check_positions(position_ids, expected, torch.ones_like(expected, dtype=torch.bool), "decode")
    return ring_decode_attention(query, key, value, k_pos[-Sq:], k_pos, local_real & mine[None, :], group=ring.group,
                                 scale=opts["scale"], causal=opts["causal"], window=opts["window"])


# -------------------------------------------------------------------------------------------------
# generation
# -------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, input_ids, max_new_tokens: int, *, attention_mask=None, eos_token_id=None,
             pad_token_id: int = 0) -> torch.Tensor:
    """Greedy decoding of a model patched with ``backend="ring"``: the prompt split over the ranks (its KV cache
    stays split), then one token at a time. input_ids: [B, S] (the same on every rank; left padding via
    ``attention_mask``). Returns [B, S + max_new_tokens] on every rank: the prompt then the new tokens (after a row
    emits ``eos_token_id``, it gets ``pad_token_id``)."""
    from .registry import IMPL_NAMES  # (the registry imports this module)
    if model.config._attn_implementation != IMPL_NAMES["ring"]:
        raise ValueError("hfa.ring.generate needs a model patched with hfa.patch(model, backend='ring')")
    ring = settings(model)
    world, _ = group_info(ring.group)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dev = next(model.parameters()).device
    input_ids = input_ids.to(dev)
    B = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(dev).long()
    batch = prepare(input_ids, mask, group=ring.group, layout=ring.layout, pad_token_id=pad_token_id)
    local_mask = batch["attention_mask"]
    out = model(**batch, use_cache=True)
    cache, name = output_cache(out), cache_kwarg(model)
    last = gather(out.logits[:, -1:].float(), dim=1, group=ring.group, layout="contiguous")  # every rank's last row
    # the sequence's last token is the last local token of the rank holding the last position
    owner = _owner_of_last(batch["input_ids"].shape[1] * world, world, ring.layout)
    nxt = last[:, owner].argmax(-1)
    real = mask.sum(-1)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    new = []
    for step in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        new.append(nxt)
        if eos_token_id is not None:
            done = done | (nxt == eos_token_id)
        if step + 1 == max_new_tokens or bool(done.all()):
            break
        local_mask = torch.cat([local_mask, local_mask.new_ones(B, 1)], dim=1)
        out = model(input_ids=nxt[:, None], position_ids=(real + step)[:, None], attention_mask=local_mask,
                    use_cache=True, **{name: cache})
        cache = output_cache(out)
        nxt = out.logits[:, -1].argmax(-1)
    gen = torch.stack(new, dim=1)
    if gen.shape[1] < max_new_tokens:
        gen = torch.cat([gen, gen.new_full((B, max_new_tokens - gen.shape[1]), pad_token_id)], dim=1)
    return torch.cat([input_ids, gen], dim=1)


def _owner_of_last(seq_len: int, world: int, layout: str) -> int:
    for r in range(world):
        if int(shard_positions(seq_len, world, r, layout)[-1]) == seq_len - 1:
            return r
    raise AssertionError("no rank holds the last position")  # pragma: no cover - every layout covers 0..S-1
