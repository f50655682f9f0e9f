"""The blockwise reference vs the naive spec (fp64): every option, awkward shapes, forward and backward, memory."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_efficient_attn.kernels.softmax import softmax_attention_naive, softmax_attention_reference
from tests.tolerances import assert_close_rms

F64 = torch.float64


def _case(B=1, Hq=2, Hkv=1, Sq=37, Skv=53, D=12, Dv=None, kpm=False, bool_mask=False, float_mask=False,
          packed=None, sinks=False, **opts):
    """Inputs (leaves that need grad) and options for one comparison."""
    Dv = Dv or D
    leaves = {"q": torch.randn(B, Hq, Sq, D, dtype=F64), "k": torch.randn(B, Hkv, Skv, D, dtype=F64),
              "v": torch.randn(B, Hkv, Skv, Dv, dtype=F64)}
    if sinks == "per-query":  # Inkling2's shape: one sink logit per query, [B, Hq, Sq, 1]
        leaves["sinks"] = torch.randn(B, Hq, Sq, 1, dtype=F64)
    elif sinks:
        leaves["sinks"] = torch.randn(Hq, dtype=F64)
    if float_mask:
        leaves["attn_mask"] = torch.randn(1, Hq, Sq, Skv, dtype=F64)
    if bool_mask:
        opts["attn_mask"] = torch.rand(B, 1, Sq, Skv) > 0.2
    if kpm:
        m = torch.rand(B, Skv) > 0.3
        m[-1] = False  # one batch row with no real key
        opts["key_padding_mask"] = m
    if packed is not None:
        opts["cu_seqlens_q"], opts["cu_seqlens_k"] = (torch.tensor(c) for c in packed)
    return {n: t.requires_grad_() for n, t in leaves.items()}, opts


CASES = {
    "plain": dict(),
    "causal-gqa3-q-shorter": dict(causal=True, Hq=3, Hkv=1),
    "causal-q-longer-than-k": dict(causal=True, Sq=53, Skv=37),
    "q1-gqa4-dv-differs": dict(Sq=1, Hq=4, Hkv=1, Dv=7, causal=True),
    "window-causal": dict(causal=True, window=9),
    "window-symmetric": dict(window=6, B=2),
    "padding": dict(kpm=True, B=2, causal=True),
    "bool-mask": dict(bool_mask=True, B=2, causal=True, window=20),
    "float-mask-grad": dict(float_mask=True, Hq=2, Hkv=2),
    "softcap": dict(softcap=1.5, causal=True, scale=0.7),
    "sinks": dict(sinks=True, Hq=4, Hkv=2, causal=True),
    "sinks-per-query": dict(sinks="per-query", B=2, Hq=4, Hkv=2, causal=True, kpm=True),
    "packed": dict(packed=([0, 1, 20, 20, 37], [0, 7, 30, 31, 53]), causal=True, window=11, Hq=3, Hkv=1),
    "everything": dict(packed=([0, 17, 37], [0, 20, 53]), causal=True, window=15, softcap=2.0, sinks=True,
                       kpm=True, float_mask=True, Hq=4, Hkv=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_blockwise_matches_naive_forward_and_backward(name):
    leaves, opts = _case(**CASES[name])
    # blocks that divide nothing, so partial and skipped blocks both occur
    out, lse = softmax_attention_reference(**leaves, **opts, block_q=8, block_k=12)
    ref_out, ref_lse = softmax_attention_naive(**leaves, **opts)
    assert out.dtype == F64 and lse.dtype == F64  # fp64 in, fp64 out: the spec loses nothing
    assert_close_rms(out, ref_out, name="out")
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "rows that see nothing differ"
    assert_close_rms(lse, ref_lse, name="lse")
    empty = torch.isneginf(ref_lse)
    assert (out.masked_select(empty.unsqueeze(-1)) == 0).all(), "a row that sees nothing must give 0"

    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)

    def loss(o, l):
        return (o * d_out).sum() + torch.where(torch.isfinite(l), l * d_lse, 0).sum()

    names = list(leaves)
    grads = torch.autograd.grad(loss(out, lse), [leaves[n] for n in names])
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse), [leaves[n] for n in names])
    for n, g, rg in zip(names, grads, ref_grads):
        assert_close_rms(g, rg, name=f"d{n}")


def test_per_query_sinks_match_the_explicit_formula():
    # eager's definition (Inkling2): softmax over [scores, sink] per query, the sink column dropped
    B, H, S, D = 2, 3, 11, 8
    q, k, v = (torch.randn(B, H, S, D, dtype=F64) for _ in range(3))
    sinks = torch.randn(B, H, S, 1, dtype=F64)
    scores = (q @ k.transpose(-1, -2)) / D ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1] @ v
    for sk in (sinks, sinks[..., 0]):  # [B, H, S, 1] and [B, H, S]
        out, _ = softmax_attention_reference(q, k, v, causal=True, sinks=sk, block_q=4, block_k=5)
        assert_close_rms(out, ref, name="out")
    with pytest.raises(ValueError, match="one per query"):
        softmax_attention_reference(q, k, v, sinks=torch.zeros(B, H, S + 1))


def test_empty_query_gives_empty_output():
    q, k = torch.randn(1, 2, 0, 8, dtype=F64), torch.randn(1, 1, 5, 8, dtype=F64)
    out, lse = softmax_attention_reference(q, k, k, causal=True)
    assert out.shape == (1, 2, 0, 8) and lse.shape == (1, 2, 0)


def test_sinks_only_row_and_all_masked_row():
    q, k, v = torch.randn(1, 2, 3, 4, dtype=F64), torch.randn(1, 1, 3, 4, dtype=F64), torch.randn(1, 1, 3, 4, dtype=F64)
    kpm = torch.zeros(1, 3, dtype=torch.bool)
    out, lse = softmax_attention_reference(q, k, v, key_padding_mask=kpm)
    assert (out == 0).all() and torch.isneginf(lse).all()
    sinks = torch.tensor([0.5, -1.0], dtype=F64)
    out, lse = softmax_attention_reference(q, k, v, key_padding_mask=kpm, sinks=sinks)
    assert (out == 0).all() and torch.allclose(lse, sinks.view(1, 2, 1).expand(1, 2, 3))


def test_dropout_is_unbiased():
    """Dropout acts on normalised probabilities: averaged over seeds the output approaches the dropout-free one."""
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=F64) for _ in range(3))
    clean, _ = softmax_attention_reference(q, k, v, causal=True)
    mean = torch.stack([softmax_attention_reference(q, k, v, causal=True, dropout_p=0.5, block_k=4)[0]
                        for _ in range(400)]).mean(0)
    assert not torch.equal(softmax_attention_reference(q, k, v, dropout_p=0.5)[0], clean)
    assert_close_rms(mean, clean, tol=0.1, name="dropout mean")


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return result


@pytest.mark.parametrize("train", [False, True])
def test_blockwise_memory_is_independent_of_seq_len_squared(train):
    S, D, bq, bk = 2048, 16, 128, 256
    q, k, v = (torch.randn(1, 1, S, D, requires_grad=train) for _ in range(3))
    with _LargestTensor() as mode:
        out, lse = softmax_attention_reference(q, k, v, causal=True, window=1000, block_q=bq, block_k=bk)
        if train:
            out.sum().backward()
    # the biggest tensor is a score tile or an [S, D] input/output, never an S x S matrix
    assert mode.largest <= max(bq * bk, S * D), f"largest intermediate {mode.largest} elements"
    assert mode.largest * 64 <= S * S
