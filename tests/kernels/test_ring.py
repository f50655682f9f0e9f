"""Ring attention: layout, the per-block pieces against the naive spec, and 2- and 3-process gloo runs against
dense attention on the whole sequence (forward, lse and backward; causal/bidirectional, GQA 1 and 3, odd lengths,
padding, windows, fp16 inputs with the fp32 merge, ring and all-gather)."""

import math

import pytest
import torch

from hf_efficient_attn.kernels.ring import (block_attention_backward, block_attention_forward, check_length,
                                            choose_mode, merge_partials, pair_kind, ring_attention, run_distributed,
                                            segments, shard_positions, shard_tensor, unshard_tensor)
from hf_efficient_attn.kernels.softmax import softmax_attention_naive

from ..tolerances import assert_close_rms
from . import ring_cases


@pytest.mark.parametrize("layout,S,W", [("zigzag", 24, 3), ("zigzag", 8, 1), ("contiguous", 21, 3)])
def test_layout_round_trip_and_positions(layout, S, W):
    x = torch.arange(S * 2).view(2, S)
    parts = [shard_tensor(x, 1, W, r, layout) for r in range(W)]
    assert torch.equal(unshard_tensor(parts, 1, layout), x)
    pos = torch.cat([shard_positions(S, W, r, layout) for r in range(W)])
    assert sorted(pos.tolist()) == list(range(S))
    for r in range(W):
        assert torch.equal(parts[r][0], shard_positions(S, W, r, layout))
    if layout == "zigzag":
        c = S // (2 * W)
        assert segments(S, W, 0, layout) == [(0, c), ((2 * W - 1) * c, c)]


def test_layout_refuses_lengths_it_cannot_split():
    with pytest.raises(ValueError, match=r"multiple of 6 .*Pad it by 2"):
        check_length(10, 3, "zigzag")
    with pytest.raises(ValueError, match="unknown ring layout"):
        segments(8, 2, 0, "striped")


def test_zigzag_balances_causal_work():
    """Every rank does the same number of visible (query, key) pairs under a causal mask; contiguous does not."""
    S, W = 48, 4

    def work(layout, r):
        pos = shard_positions(S, W, r, layout)
        return int((pos[:, None] >= torch.arange(S)[None, :]).sum())

    assert len({work("zigzag", r) for r in range(W)}) == 1
    assert len({work("contiguous", r) for r in range(W)}) == W


def test_pair_kind_matches_brute_force():
    for causal in (True, False):
        for window in (None, 1, 3, 6):
            for qa in range(0, 12, 3):
                for ka in range(0, 12, 2):
                    qs, ks = (qa, 3), (ka, 4)
                    qp, kp = torch.arange(qa, qa + 3), torch.arange(ka, ka + 4)
                    d = qp[:, None] - kp[None, :]
                    ok = (d >= 0) if causal else torch.ones_like(d, dtype=torch.bool)
                    if window is not None:
                        ok = ok & ((d < window) if causal else (d.abs() < window))
                    want = "skip" if not ok.any() else ("full" if ok.all() else "masked")
                    assert pair_kind(qs, ks, causal, window) == want, (causal, window, qs, ks)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("causal,window", [(True, None), (True, 4), (False, None), (False, 3)])
def test_block_pieces_match_naive(G, causal, window, monkeypatch):
    """One piece at arbitrary positions (keys before and after the queries, padding, tiny tiles) vs the naive
    spec with the equivalent explicit mask: out, lse, and the gradients from the global lse."""
    import hf_efficient_attn.kernels.ring.reference as ref_mod
    monkeypatch.setattr(ref_mod, "TILE_ELEMENTS", 50)  # several row tiles
    B, Hkv, D, n, m = 2, 2, 8, 7, 9
    q = torch.randn(B, Hkv * G, n, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, m, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, m, 5, dtype=torch.float64, requires_grad=True)
    q_pos, k_pos = torch.arange(10, 17), torch.tensor([0, 3, 9, 11, 12, 13, 16, 18, 20])
    k_valid = torch.ones(B, m, dtype=torch.bool)
    k_valid[1, 4] = False
    d = q_pos[:, None] - k_pos[None, :]
    ok = (d >= 0) if causal else torch.ones_like(d, dtype=torch.bool)
    if window is not None:
        ok = ok & ((d < window) if causal else (d.abs() < window))
    mask = ok[None, None] & k_valid[:, None, None, :]
    want, want_lse = softmax_attention_naive(q, k, v, attn_mask=mask)
    dout = torch.randn_like(want)
    want.backward(dout)
    out, lse = block_attention_forward(q.detach(), k.detach(), v.detach(), q_pos, k_pos, k_valid, scale=D ** -0.5,
                                       causal=causal, window=window)
    assert_close_rms(out, want.detach())
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.allclose(lse[fin], want_lse.detach()[fin])
    delta = (dout * want.detach()).sum(-1)
    dq, dk, dv = block_attention_backward(q.detach(), k.detach(), v.detach(), dout, want_lse.detach(), delta, q_pos,
                                          k_pos, k_valid, scale=D ** -0.5, causal=causal, window=window)
    for name, got, exp in (("dq", dq, q.grad), ("dk", dk, k.grad), ("dv", dv, v.grad)):
        assert_close_rms(got, exp, name=name)


def test_merge_of_split_keys_equals_whole():
    """Attention over keys split in two pieces, merged by lse, equals attention over all keys; empty pieces
    (lse = -inf) change nothing and two empty pieces stay 0 / -inf."""
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4)
    pos_q, pos_k = torch.arange(5), torch.arange(8)
    whole, whole_lse = block_attention_forward(q, k, v, pos_q, pos_k, scale=0.5, causal=False)
    a = block_attention_forward(q, k[:, :, :3], v[:, :, :3], pos_q, pos_k[:3], scale=0.5, causal=False)
    b = block_attention_forward(q, k[:, :, 3:], v[:, :, 3:], pos_q, pos_k[3:], scale=0.5, causal=False)
    out, lse = a[0].clone(), a[1].clone()
    merge_partials(out, lse, *b)
    assert_close_rms(out, whole)
    assert torch.allclose(lse, whole_lse)
    folded = (a[0].clone(), a[1].clone())  # the same, tile by tile into the running result
    block_attention_forward(q, k[:, :, 3:], v[:, :, 3:], pos_q, pos_k[3:], scale=0.5, causal=False, into=folded)
    assert_close_rms(folded[0], whole)
    assert torch.allclose(folded[1], whole_lse)
    empty_o, empty_l = torch.zeros_like(out), torch.full_like(lse, -math.inf)
    merge_partials(out, lse, empty_o, empty_l)
    assert_close_rms(out, whole)
    merge_partials(empty_o, empty_l, torch.zeros_like(out), torch.full_like(lse, -math.inf))
    assert torch.equal(empty_o, torch.zeros_like(out)) and torch.isinf(empty_l).all()


def test_choose_mode_rule():
    assert choose_mode("auto", 2, 9, 3) == "allgather"   # 2 x 3 <= 9: gathered K/V smaller than local Q
    assert choose_mode("auto", 4, 9, 3) == "ring"
    assert choose_mode("auto", 2, 8, 8) == "ring"        # MHA
    assert choose_mode("ring", 2, 9, 3) == "ring"
    with pytest.raises(ValueError, match="unknown ring mode"):
        choose_mode("tree", 2, 9, 3)


def test_outside_a_process_group_names_torchrun():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="torchrun"):
        ring_attention(q, q, q)


CASES = [
    dict(name="causal zigzag GQA3 ring", seed=1, Hq=6, Hkv=2, chunk=5, causal=True, layout="zigzag", mode="ring"),
    dict(name="causal zigzag MHA allgather", seed=2, Hq=2, Hkv=2, chunk=4, causal=True, layout="zigzag",
         mode="allgather"),
    dict(name="bidirectional contiguous odd GQA3 ring", seed=3, Hq=3, Hkv=1, chunk=7, causal=False,
         layout="contiguous", mode="ring", Dv=12),
    dict(name="causal window 7 zigzag ring", seed=4, Hq=4, Hkv=2, chunk=6, causal=True, window=7, layout="zigzag",
         mode="ring"),
    dict(name="causal padded zigzag GQA3 allgather", seed=5, Hq=6, Hkv=2, chunk=4, causal=True, pad=True,
         layout="zigzag", mode="allgather"),
    dict(name="causal padded contiguous ring", seed=6, Hq=2, Hkv=2, chunk=5, causal=True, pad=True,
         layout="contiguous", mode="ring"),
    dict(name="bidirectional window 5 contiguous allgather", seed=7, Hq=3, Hkv=3, chunk=6, causal=False, window=5,
         layout="contiguous", mode="allgather"),
    dict(name="fp16 causal zigzag GQA3 ring", seed=8, Hq=6, Hkv=2, chunk=8, causal=True, layout="zigzag",
         mode="ring", dtype=torch.float16),
    dict(name="lse gradient zigzag ring", seed=9, Hq=2, Hkv=1, chunk=3, causal=True, layout="zigzag", mode="ring",
         lse_grad=True, pad=True),
]


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_matches_dense_on_the_whole_sequence(world):
    per_rank = run_distributed(ring_cases.run_cases, world, args=(CASES,))
    for rank, results in enumerate(per_rank):
        for (name, e), case in zip(results, CASES):
            tol = 2e-3 if case.get("dtype") == torch.float16 else 1e-5
            where = f"W={world} rank {rank} {name}"
            assert e["finite"] and e["same_empty"] and e["dtype_ok"], where
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert e[key] <= tol, f"{where}: {key} rel err {e[key]:.2e} > {tol}"
            assert e["sent"] == _expected_bytes(case, world, e), where


def _expected_bytes(case, world, e):
    """What one rank sends for forward + backward: K/V (+ key padding) to W - 1 ranks in each pass; the ring sends
    each dK/dV accumulator (fp32) W times, the all-gather reduce-scatters them ((W - 1) / W of W blocks)."""
    kv_and_pad = e["kv_bytes"] + e["pad_bytes"]
    return 2 * (world - 1) * kv_and_pad + (world if case["mode"] == "ring" else world - 1) * e["acc_bytes"]


TRITON_CASES = [
    dict(name="triton causal zigzag GQA3", seed=11, Hq=6, Hkv=2, chunk=8, causal=True, layout="zigzag", mode="ring",
         local="triton"),
    dict(name="triton causal window 5 padded", seed=12, Hq=2, Hkv=1, chunk=8, causal=True, window=5, pad=True,
         layout="zigzag", mode="allgather", local="triton"),
    dict(name="triton fp16 bidirectional contiguous", seed=13, Hq=4, Hkv=2, chunk=9, causal=False,
         layout="contiguous", mode="ring", local="triton", dtype=torch.float16),
]


@pytest.mark.triton_interpret
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors through the interpreter; on a GPU "
                    "test_ring_attention_triton_pieces_on_cuda runs them for real")
def test_ring_attention_triton_pieces_match_dense():
    """The per-pair work on our flash kernels (unmasked pairs and aligned diagonals; the rest on torch), 2 ranks."""
    for rank, results in enumerate(run_distributed(ring_cases.run_cases, 2, args=(TRITON_CASES,))):
        for (name, e), case in zip(results, TRITON_CASES):
            tol = 2e-3 if case.get("dtype") == torch.float16 else 1e-5
            assert e["finite"] and e["same_empty"] and e["dtype_ok"], name
            for key in ("out", "lse", "dq", "dk", "dv"):
                assert e[key] <= tol, f"rank {rank} {name}: {key} rel err {e[key]:.2e} > {tol}"


@pytest.mark.triton_interpret
def test_flash_backward_takes_a_strided_lse():
    """Ring backward hands the flash backward a slice of the global lse; the kernels once read delta with lse's
    strides (garbage dq/dk for any lse that was not contiguous)."""
    from hf_efficient_attn.kernels.softmax.triton_flash import _flash_bwd, _flash_fwd
    B, H, n, D = 1, 2, 8, 16
    q, k, v, do = (torch.randn(B, H, n, D) for _ in range(4))
    opts = dict(scale=0.25, causal=True, window=None, softcap=None, key_padding_mask=None, cu_seqlens_q=None,
                cu_seqlens_k=None, max_seqlen_q=n, max_seqlen_k=n)
    o, lse = _flash_fwd(q, k, v, sinks=None, **opts)
    wide = torch.full((B, H, 2 * n), float("nan"))
    wide[:, :, :n] = lse
    want = _flash_bwd(do, None, q, k, v, o, lse, sinks=None, **opts)[:3]
    got = _flash_bwd(do, None, q, k, v, o, wide[:, :, :n], sinks=None, **opts)[:3]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def _cuda_pieces(rank, world):
    """One rank (no traffic) on CUDA: the zigzag split still cuts the sequence into diagonal and full pairs."""
    from hf_efficient_attn.kernels.softmax import softmax_attention_reference
    torch.manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 6, 512, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, 2, 512, 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, 2, 512, 64, device="cuda", dtype=dtype, requires_grad=True)
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        ref, _ = softmax_attention_reference(qd, kd, vd, causal=True, window=100)
        do = torch.randn_like(ref)
        ref.backward(do)
        got, _ = ring_attention(q, k, v, causal=True, window=100, local="triton", layout="zigzag")
        got.backward(do.to(dtype))
        rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()  # noqa: E731
        out[str(dtype)] = [rel(got, ref), rel(q.grad, qd.grad), rel(k.grad, kd.grad), rel(v.grad, vd.grad)]
    return out


@pytest.mark.gpu
def test_ring_attention_triton_pieces_on_cuda():
    (res,) = run_distributed(_cuda_pieces, 1)
    for dtype, errs in res.items():
        tol = 1e-5 if dtype == "torch.float32" else 1.6e-2
        assert max(errs) <= tol, (dtype, errs)
