"""Cases run inside spawned ranks by test_ring.py (module level so torch.multiprocessing can import them)."""

import torch

from hf_efficient_attn.kernels.ring import count_comm, ring_attention, shard_tensor
from hf_efficient_attn.kernels.softmax import softmax_attention_reference


def _full_inputs(c, world):
    g = torch.Generator().manual_seed(c["seed"])
    S = c["chunk"] * (2 * world if c["layout"] == "zigzag" else world)
    B, Hq, Hkv, D = c.get("B", 2), c["Hq"], c["Hkv"], c.get("D", 16)
    q = torch.randn(B, Hq, S, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, c.get("Dv", D), generator=g)
    dout = torch.randn(B, Hq, S, c.get("Dv", D), generator=g)
    dlse = torch.randn(B, Hq, S, generator=g)
    kpm = None
    if c.get("pad"):
        kpm = torch.ones(B, S, dtype=torch.bool)
        kpm[0, : S // 3] = False  # left padding on row 0 (its first queries see no key under causal)
        kpm[1, S // 2: S // 2 + 3] = False  # a few holes on row 1
    return q, k, v, dout, dlse, kpm


def run_cases(rank, world, cases):
    """Every case: ring output, lse and gradients vs the fp64 reference on the whole sequence."""
    results = []
    for c in cases:
        q, k, v, dout, dlse, kpm = _full_inputs(c, world)
        dtype = c.get("dtype", torch.float32)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        causal, window, layout = c["causal"], c.get("window"), c["layout"]
        # -- the spec: fp64 dense attention on the whole sequence (the same on every rank)
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
        ref, ref_lse = softmax_attention_reference(qd, kd, vd, causal=causal, window=window, key_padding_mask=kpm)
        seen = torch.isfinite(ref_lse)
        loss = (ref * dout.double()).sum()
        if c.get("lse_grad"):
            loss = loss + (torch.where(seen, ref_lse, 0) * dlse.double()).sum()
        loss.backward()
        # -- this rank's share
        sh = lambda t, d=2: shard_tensor(t, d, world, rank, layout)  # noqa: E731
        ql, kl, vl = (sh(t).requires_grad_() for t in (q, k, v))
        with count_comm() as cc:
            out, lse = ring_attention(ql, kl, vl, causal=causal, window=window,
                                      key_padding_mask=None if kpm is None else sh(kpm, 1), layout=layout,
                                      mode=c["mode"], local=c.get("local", "torch"))
            loss = (out.double() * sh(dout).double()).sum()
            if c.get("lse_grad"):
                loss = loss + (torch.where(sh(seen), lse, 0).double() * sh(dlse).double()).sum()
            loss.backward()

        def rel(a, b):
            a, b = a.double(), b.double()
            return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()

        errs = dict(out=rel(out, sh(ref)), dq=rel(ql.grad, sh(qd.grad)), dk=rel(kl.grad, sh(kd.grad)),
                    dv=rel(vl.grad, sh(vd.grad)),
                    lse=rel(torch.where(sh(seen), lse, 0), torch.where(sh(seen), sh(ref_lse), 0)),
                    same_empty=bool(torch.equal(torch.isfinite(lse), sh(seen))),
                    finite=bool(torch.isfinite(out).all() and torch.isfinite(ql.grad).all()),
                    dtype_ok=out.dtype == dtype and ql.grad.dtype == dtype,
                    sent=cc.sent_bytes, kv_bytes=(kl.numel() * kl.element_size() + vl.numel() * vl.element_size()),
                    pad_bytes=ql.shape[0] * ql.shape[2], acc_bytes=4 * (kl.numel() + vl.numel()))
        results.append((c["name"], errs))
    return results

