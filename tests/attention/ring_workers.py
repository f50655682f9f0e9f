"""Bodies run inside spawned ranks by test_ring_model.py (module level so torch.multiprocessing can import them)."""

import torch
import torch.distributed as dist

import hf_efficient_attn as hfa

from ..tiny_models import make_model


def _batch(S=20, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, :3] = 0  # row 0 is left-padded
    ids[0, :3] = 0
    return ids, mask


def _reference_loss(logits, ids, mask):
    shift = torch.full_like(ids, -100)
    shift[:, :-1] = ids[:, 1:]
    shift[:, :-1][mask[:, 1:] == 0] = -100
    shift[mask == 0] = -100
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), shift.flatten(), ignore_index=-100)


def forward_backward(rank, world, families, S):
    """Per family: ring logits (gathered) and loss / parameter gradients (summed over ranks) vs single-process."""
    out = {}
    for fam in families:
        model = make_model(fam)
        ids, mask = _batch(S)
        ref = model(input_ids=ids, attention_mask=mask)
        ref_loss = _reference_loss(ref.logits, ids, mask)
        ref_loss.backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        hfa.patch(model, backend="ring")
        b = hfa.ring.prepare(ids, mask, labels=ids)
        shift = b.pop("shift_labels")
        res = model(**b)
        loss = hfa.ring.lm_loss(res.logits, shift)
        loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total)  # each rank's loss is its share; the sum is the whole batch's mean
        logits = hfa.ring.gather(res.logits.detach(), dim=1)[:, -S:]  # prepare left-pads to a multiple of 2W
        real = mask.bool()
        diff = (logits - ref.logits.detach())[real].abs().max().item()
        grad_err = 0.0
        for n, p in model.named_parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            r = ref_grads.get(n, torch.zeros_like(p))
            grad_err = max(grad_err, ((g - r).norm() / r.norm().clamp_min(1e-12)).item())
        # the ring layer refuses a forward whose positions are not the layout's (RoPE would be silently wrong)
        refused = None
        if world > 1:
            try:
                model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
            except ValueError as e:
                refused = str(e)
        hfa.unpatch(model)
        out[fam] = dict(logits=diff, loss=abs(total.item() - ref_loss.item()), grads=grad_err, refused=refused,
                        restored=model.config._attn_implementation == "eager")
    return out


def greedy(rank, world, families, new_tokens):
    """Per family: hfa.ring.generate vs transformers' greedy generate on one process (left-padded batch)."""
    out = {}
    for fam in families:
        model = make_model(fam)
        ids, mask = _batch(S=13)
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        hfa.patch(model, backend="ring")
        got = hfa.ring.generate(model, ids, new_tokens, attention_mask=mask)
        out[fam] = dict(same=bool(torch.equal(got, ref)), got=got[:, 13:].tolist(), ref=ref[:, 13:].tolist())
    return out
