"""The ring-attention check: one sequence split over W processes vs the same model on one process.

:func:`ring_check_rank` runs on every rank of an existing process group (``examples/ring_attention.py`` under
torchrun); :func:`ring_check` starts W local gloo processes itself (``hfa demo``). What it measures, over all
ranks: max |ring logits - single-process logits| (rank 0 runs the unpatched model on the whole sequence and
broadcasts its final hidden states; each rank applies the LM head to its own rows), the sequence's perplexity
both ways (``hfa.ring.lm_loss``), the bytes each rank sent during the ring prefill, its peak resident memory,
and whether greedy decoding over the split cache (``hfa.ring.generate``) equals transformers' ``generate`` on one
process. ``ok``: logits within the patch check's fp32 tolerance (``patch_check.TOLERANCE``: what two exact
implementations of a real model may differ by) and identical greedy tokens.
"""

from __future__ import annotations

import math
import os
import resource
import time

import torch
import torch.distributed as dist

from ..attention import patch, ring, unpatch
from ..kernels.ring import count_comm, run_distributed
from .data import load_text
from .models import load_model
from .patch_check import TOLERANCE
from .perplexity import tokenize_stream

__all__ = ["format_ring_check", "ring_check", "ring_check_rank"]


def _max(x: float) -> float:
    t = torch.tensor([float(x)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


@torch.no_grad()
def ring_check_rank(model_name: str = "smollm2-135m", tokens: int = 8192, gen_prompt: int = 512,
                    new_tokens: int = 16, device=None) -> dict | None:
    """On every rank of the default process group: the check; rank 0 returns the result dict, the others None."""
    world, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device(device) if device is not None else torch.device("cpu")
    model, tok = load_model(model_name)
    model.to(dev)
    ids = tokenize_stream(tok, load_text(None), max_tokens=tokens)[None, :tokens].to(dev)
    if ids.shape[1] < tokens:
        raise ValueError(f"the bundled text gave {ids.shape[1]} tokens, fewer than tokens={tokens}")
    # -- the single-process reference, on rank 0
    hidden = torch.empty(1, ids.shape[1], model.config.hidden_size, device=dev)
    ref_ppl = ref_seconds = None
    if rank == 0:
        t0 = time.perf_counter()
        hidden.copy_(model.model(input_ids=ids).last_hidden_state)
        ref_seconds = time.perf_counter() - t0
        ref_logits = model.lm_head(hidden)
        ref_ppl = math.exp(torch.nn.functional.cross_entropy(ref_logits[0, :-1].float(), ids[0, 1:]).item())
        del ref_logits
    dist.broadcast(hidden, 0)
    # -- ring: this rank's 1/W of the sequence
    patch(model, backend="ring")
    batch = ring.prepare(ids, labels=ids)
    shift = batch.pop("shift_labels")
    dist.barrier()
    t0 = time.perf_counter()
    with count_comm() as cc:
        logits = model(**batch).logits
    seconds = _max(time.perf_counter() - t0)
    loss = ring.lm_loss(logits, shift)
    dist.all_reduce(loss)
    diff = _max((logits - model.lm_head(ring.shard(hidden, dim=1))).abs().max().item())
    del logits
    sent = _max(cc.sent_bytes)
    peak = _max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    # -- greedy decoding over a split cache vs one process
    prompt = ids[:, :gen_prompt]
    got = ring.generate(model, prompt, new_tokens)
    unpatch(model)
    if rank != 0:
        return None
    ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id or 0)
    same = bool(torch.equal(got, ref))
    tol = TOLERANCE[torch.float32]
    return dict(model=model_name, world=world, tokens=ids.shape[1], device=str(dev), max_abs_logit_diff=diff,
                tolerance=tol, ok=diff <= tol and same, reference="one process, " + model.config._attn_implementation,
                ppl_ring=math.exp(loss.item()), ppl_single=ref_ppl, seconds_ring=seconds, seconds_single=ref_seconds,
                bytes_sent_per_rank=sent, peak_rss_bytes_per_rank=peak, generate_equal=same,
                gen_prompt=prompt.shape[1], new_tokens=new_tokens)


def _spawned(rank, world, kwargs):
    return ring_check_rank(**kwargs)


def ring_check(model_name: str = "smollm2-135m", world: int = 2, tokens: int = 512, gen_prompt: int = 64,
               new_tokens: int = 4) -> dict:
    """:func:`ring_check_rank` on ``world`` local CPU processes (gloo), one torch thread each."""
    kwargs = dict(model_name=model_name, tokens=tokens, gen_prompt=gen_prompt, new_tokens=new_tokens)
    threads = max(1, (os.cpu_count() or 1) // world)
    return run_distributed(_spawned, world, args=(kwargs,), threads=threads)[0]


def format_ring_check(res: dict) -> str:
    """The check as a few lines a person reads."""
    return "\n".join([
        f"ring attention, {res['model']}, {res['tokens']} tokens over {res['world']} processes ({res['device']}):",
        f"  max |logits ring - single process ({res['reference']})| = {res['max_abs_logit_diff']:.2e} "
        f"(tolerance {res['tolerance']:.0e}); ppl {res['ppl_ring']:.4f} (ring) vs {res['ppl_single']:.4f} (single)",
        f"  prefill {res['seconds_ring']:.1f} s (single process {res['seconds_single']:.1f} s); sent "
        f"{res['bytes_sent_per_rank'] / 2**20:.1f} MiB per rank; peak RSS {res['peak_rss_bytes_per_rank'] / 2**30:.2f} "
        f"GiB per rank",
        f"  greedy decoding of {res['new_tokens']} tokens after {res['gen_prompt']}: "
        f"{'equal to' if res['generate_equal'] else 'DIFFERENT FROM'} one process"])
