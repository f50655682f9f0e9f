"""Triton LoLCATs hybrid (sliding-window softmax + linear, one normaliser) vs the fp64 reference, forward and
backward, in the interpreter on CPU: odd lengths and dims, windows from 1 to wider than the sequence, GQA,
decode-shaped calls with an initial state, left padding, packed sequences, and the returned state."""

import math

import pytest
import torch

pytest.importorskip("triton")

from hf_efficient_attn.kernels.linear.reference import hybrid_attention_reference  # noqa: E402
from hf_efficient_attn.kernels.linear.triton_hybrid import (  # noqa: E402
    hybrid_attention_triton,
    hybrid_unsupported_reason,
)
from tests.tolerances import RTOL, assert_close_rms, rel_rms  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """torch.empty / empty_like give NaN-filled floats, so an element a kernel forgets to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def make_inputs(B, H, Hkv, Sq, T, Dk, F, D, dtype, state=False, bshd=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, positive=False):  # bshd: a [B, H, S, d] view of [B, S, H, d] memory (as HF passes it)
        b, h, s, d = shape
        x = torch.rand(b, s, h, d, generator=g) + 0.05 if positive else torch.randn(b, s, h, d, generator=g)
        x = x.transpose(1, 2)
        return (x if bshd else x.contiguous()).to(DEVICE, dtype)

    q, k, v = rand(B, H, Sq, Dk), rand(B, Hkv, T, Dk), rand(B, Hkv, T, D)
    fq, fk = rand(B, H, Sq, F, positive=True), rand(B, Hkv, T, F, positive=True)   # like softmax feature maps
    gate = (torch.rand(H, generator=g) * 0.8 + 0.1).to(DEVICE)
    init = None
    if state:
        init = (torch.rand(B, Hkv, F, D, generator=g).to(DEVICE) * 3, torch.rand(B, Hkv, F, generator=g).to(DEVICE) * 3)
    return q, k, v, fq, fk, gate, init


def check_grad(g, rg, dtype, name):
    """rel-RMS by dtype. A gradient that is 0 up to eps (q, k with one window key; window_factor with no linear
    key, where it is ~eps / g) is the difference of O(1) terms, so it is compared absolutely, at 10x the
    dtype's relative tolerance (inputs and dO are O(1))."""
    assert g.shape == rg.shape, name
    assert torch.isfinite(g).all(), f"{name}: NaN/inf"
    atol = 10 * RTOL[dtype]
    if rg.double().pow(2).mean().sqrt() < atol:
        assert (g.double() - rg).abs().max() <= atol, f"{name}: {(g.double() - rg).abs().max():.2e} > {atol:.0e}"
    else:
        assert_close_rms(g, rg, dtype, name=name)


def check_against_reference(B=1, H=2, Hkv=1, Sq=37, T=37, Dk=20, F=12, D=10, dtype=torch.float32, window=8,
                            state=False, bshd=False, kpm_fill=None, packed=None, backward=True, block_m=16,
                            block_n=16, **opts):
    """out and the returned state, then gradients of all inputs (through both), vs the fp64 reference."""
    q, k, v, fq, fk, gate, init = make_inputs(B, H, Hkv, Sq, T, Dk, F, D, dtype, state, bshd)
    if kpm_fill is not None:
        opts["key_padding_mask"] = kpm_fill(torch.ones(B, T, dtype=torch.bool, device=DEVICE))
    if packed is not None:
        opts["cu_seqlens"] = torch.tensor(packed, device=DEVICE, dtype=torch.int32)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v, fq, fk, gate)]
    if init is not None:
        leaves += [t.detach().requires_grad_(backward) for t in init]
    ref_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]

    def call(fn, ls, **kw):
        return fn(*ls[:5], window=window, window_factor=ls[5], initial_state=tuple(ls[6:]) or None,
                  return_state=True, **opts, **kw)

    out, (s, z) = call(hybrid_attention_triton, leaves, block_m=block_m, block_n=block_n)
    ref_out, (ref_s, ref_z) = call(hybrid_attention_reference, ref_leaves)
    assert out.dtype == dtype and s.dtype == z.dtype == torch.float32
    assert_close_rms(out, ref_out, dtype, name="out")
    assert_close_rms(s, ref_s, torch.float32, name="S")   # fp32 sums of products of the dtype's values
    assert_close_rms(z, ref_z, torch.float32, name="z")
    if not backward:
        return out
    gen = torch.Generator().manual_seed(1)
    d_out, d_s, d_z = (torch.randn(t.shape, generator=gen, dtype=torch.float64).to(DEVICE) for t in (ref_out, ref_s,
                                                                                                    ref_z))
    loss = (out.double() * d_out).sum() + (s.double() * d_s).sum() + (z.double() * d_z).sum()
    ref_loss = (ref_out * d_out).sum() + (ref_s * d_s).sum() + (ref_z * d_z).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, g, rg, leaf in zip(("dq", "dk", "dv", "dfq", "dfk", "dwindow_factor", "dS0", "dz0"), grads, ref_grads,
                                 leaves):
        assert g.dtype == leaf.dtype, name
        check_grad(g, rg, dtype, name)
    return out


def _left_pad(m):
    m[1, :10] = False       # row 1: 10 pad tokens on the left
    m[0, :1] = False
    return m


CASES = {
    # name: (dtype, options)
    "T1": (torch.float32, dict(Sq=1, T=1, window=4)),
    "T19-window1-gqa3": (torch.float32, dict(H=3, Hkv=1, Sq=19, T=19, window=1)),
    "T19-window4-fp16": (torch.float16, dict(H=3, Hkv=1, Sq=19, T=19, window=4)),
    "T19-window64-wider-than-T": (torch.float32, dict(Sq=19, T=19, window=64, block_m=32)),
    "T100-window16-mha-blocks32x16": (torch.float32, dict(B=2, H=2, Hkv=2, Sq=100, T=100, window=16, block_m=32)),
    "T100-window16-gqa3-fp16-bshd": (torch.float16, dict(H=3, Hkv=1, Sq=100, T=100, window=16, bshd=True,
                                                         block_n=32)),
    "Sq-lt-T-initial-state-gqa3": (torch.float32, dict(H=3, Hkv=1, Sq=7, T=40, window=16, state=True)),
    "Sq-lt-T-initial-state-fp16": (torch.float16, dict(B=2, H=2, Hkv=2, Sq=20, T=45, window=4, state=True, Dk=33,
                                                       F=20, D=17)),
    "left-padding-window4": (torch.float32, dict(B=2, H=2, Hkv=1, Sq=37, T=37, window=4, kpm_fill=_left_pad)),
    "left-padding-window16-fp16": (torch.float16, dict(B=2, H=3, Hkv=1, Sq=30, T=37, window=16, kpm_fill=_left_pad,
                                                       state=True)),
    "varlen-with-length-1-and-0": (torch.float32, dict(H=3, Hkv=1, Sq=57, T=57, window=4,
                                                       packed=[0, 1, 20, 20, 57])),
    "varlen-padding-fp16": (torch.float16, dict(H=2, Hkv=2, Sq=50, T=50, window=8, packed=[0, 33, 34, 50],
                                                kpm_fill=lambda m: m.index_fill_(1, torch.tensor([3, 40]), False))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_vs_reference(name):
    dtype, opts = CASES[name]
    check_against_reference(dtype=dtype, **opts)


def test_decode_call_equals_reference():
    """Sq = 1 over exactly `window` keys plus the state of everything older: what a decoder computes per token."""
    out = check_against_reference(H=3, Hkv=1, Sq=1, T=16, window=16, state=True, backward=False)
    assert out.shape == (1, 3, 1, 10)


def test_prefill_state_then_decode_equals_one_pass():
    """The returned state plus the last window - 1 keys is all the next token needs (what a hybrid cache keeps)."""
    w, T = 8, 29
    q, k, v, fq, fk, gate, _ = make_inputs(1, 3, 1, T, T, 20, 12, 10, torch.float32)
    full = hybrid_attention_triton(q, k, v, fq, fk, window=w, window_factor=gate, block_m=16, block_n=16)
    _, state = hybrid_attention_triton(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], fq[:, :, :-1], fk[:, :, :-1],
                                       window=w, window_factor=gate, return_state=True, block_m=16, block_n=16)
    last = slice(T - w, T)   # the new token and the w - 1 keys before it
    step = hybrid_attention_triton(q[:, :, -1:], k[:, :, last], v[:, :, last], fq[:, :, -1:], fk[:, :, last],
                                   window=w, window_factor=gate, initial_state=state, block_m=16, block_n=16)
    assert rel_rms(step, full[:, :, -1:]) < 1e-5


def test_no_grad_path_scalar_factor_and_scale():
    q, k, v, fq, fk, _, init = make_inputs(2, 4, 2, 21, 21, 16, 8, 16, torch.float16, state=True)
    opts = dict(window=5, window_factor=0.4, scale=0.3, eps=1e-3, initial_state=init)
    with torch.no_grad():
        out = hybrid_attention_triton(q, k, v, fq, fk, **opts, block_m=16, block_n=16)
    ref = hybrid_attention_reference(*(t.double() for t in (q, k, v, fq, fk)), **opts)
    assert_close_rms(out, ref, torch.float16)


def test_window_factor_scalar_tensor_gets_its_gradient():
    q, k, v, fq, fk, _, _ = make_inputs(1, 2, 1, 19, 19, 16, 8, 16, torch.float32)
    grads = []
    for fn, dt in ((hybrid_attention_triton, torch.float32), (hybrid_attention_reference, torch.float64)):
        g = torch.tensor(0.6, dtype=dt, requires_grad=True)
        out = fn(*(t.to(dt) for t in (q, k, v, fq, fk)), window=4, window_factor=g)
        grads.append(torch.autograd.grad(out.double().pow(2).sum(), g)[0])
    assert abs(grads[0].item() - grads[1].item()) <= 1e-5 * abs(grads[1].item())


def test_no_queries_still_returns_the_state():
    q, k, v, fq, fk, gate, init = make_inputs(1, 2, 1, 0, 9, 16, 8, 16, torch.float32, state=True)
    out, (s, z) = hybrid_attention_triton(q, k, v, fq, fk, window=4, initial_state=init, return_state=True)
    _, (rs, rz) = hybrid_attention_reference(q, k, v, fq, fk, window=4, initial_state=init, return_state=True)
    assert out.shape == (1, 2, 0, 16)
    assert_close_rms(s, rs, torch.float32)
    assert_close_rms(z, rz, torch.float32)


def test_unsupported_reasons(monkeypatch):
    q, k, v, fq, fk, _, _ = make_inputs(1, 2, 1, 4, 4, 16, 8, 16, torch.float32)
    assert hybrid_unsupported_reason(q, k, v, fq, fk, window=2) is None
    assert hybrid_unsupported_reason(*(t.double() for t in (q, k, v, fq, fk))) == "dtype float64"
    assert "mixed dtypes" in hybrid_unsupported_reason(q, k, v.half(), fq, fk)
    big = torch.zeros(1, 2, 4, 300)
    assert hybrid_unsupported_reason(q, k, v, big, big[:, :1]) == "feature_dim 300 > 256"
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "TRITON_INTERPRET is not 1" in hybrid_unsupported_reason(q, k, v, fq, fk)
        with pytest.raises(ValueError, match="hybrid_attention_reference"):
            hybrid_attention_triton(q, k, v, fq, fk, window=2)


@pytest.mark.parametrize("bad, message", [
    (dict(window=0), "window must be an int"),
    (dict(block_m=24), "block_m must be a power of two"),
    (dict(Hkv=3), "multiple"),
])
def test_bad_input_raises(bad, message):
    Hkv = bad.pop("Hkv", 1)
    q, k, v, fq, fk, _, _ = make_inputs(1, 4, Hkv, 8, 8, 16, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=message):
        hybrid_attention_triton(q, k, v, fq, fk, **{"window": 4, **bad})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_gqa_on_gpu(dtype):
    check_against_reference(dtype=dtype, B=2, H=8, Hkv=2, Sq=1000, T=1100, Dk=64, F=128, D=64, window=64,
                            state=True, kpm_fill=_left_pad, block_m=None, block_n=None)


def compile_for_hopper():
    """Compile every kernel for sm_90 (no GPU needed) with every feature on; the interpreter checks no types.

    Runs in a subprocess without TRITON_INTERPRET (see test_kernels_compile_for_hopper)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_efficient_attn.kernels.linear import triton_hybrid as th
    assert not th.INTERPRETED

    pointers = dict(GATE="*fp32", HS="*fp32", ZS="*fp32", S0="*fp32", Z0="*fp32", SF="*fp32", ZF="*fp32",
                    M2="*fp32", AMAX="*i32", ZD="*fp32", DELTA="*fp32", R="*fp32", DHS="*fp32", DZS="*fp32",
                    DSF="*fp32", DZF="*fp32", KPM="*i8", CU="*i32")
    floats = ("qk_scale", "scale", "eps")
    ints = ("H", "G", "H_KV", "S_Q", "S_K", "W", "NC1", "NQ1")
    # the LoLCATs shape (head dim 64, hedgehog features 2 x 64) in bf16 at the GPU default tiles, and odd dims in
    # fp32 at the fp32 default tiles (about 40 s together on 2 CPU cores; large fp32 tiles take minutes in ptxas)
    for dtype, precision, dims, block in (("*bf16", "tf32", dict(DK=64, F=128, D=64), 64),
                                          ("*fp32", "ieee", dict(DK=20, F=12, D=10), 32)):
        pads = {f"{n}_PAD": max(16, triton.next_power_of_2(d)) for n, d in dims.items()}
        consts = dict(**dims, **pads, BF=min(pads["F_PAD"], 64), BD=min(pads["D_PAD"], 64),
                      HAS_S0=True, HAS_KPM=True, IS_VARLEN=True, HAS_DSTATE=True, UPCAST=False,
                      PRECISION=precision, BLOCK_M=block, BLOCK_N=block)
        consts["N_DT"] = pads["D_PAD"] // consts["BD"]
        for kernel in (th._state_fwd_kernel, th._fwd_kernel, th._bwd_dq_kernel, th._state_bwd_kernel,
                       th._bwd_dkdv_kernel):
            c = {n: v for n, v in consts.items() if n in kernel.arg_names}
            signature = {n: "constexpr" if n in c else pointers.get(n, "fp32" if n in floats else
                                                                     dtype if n.isupper() and n not in ints
                                                                     else "i32")
                         for n in kernel.arg_names}
            src = ASTSource(fn=kernel, signature=signature,
                            constexprs={(kernel.arg_names.index(n),): v for n, v in c.items()})
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile every kernel for real")
def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", "from tests.kernels.test_linear_hybrid_triton import "
                          "compile_for_hopper; compile_for_hopper()"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=600)
    if "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no ptxas to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
