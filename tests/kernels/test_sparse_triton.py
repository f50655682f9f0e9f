"""Triton block-sparse attention (forward, backward, decode) vs the block-sparse reference (fp64), in the
interpreter on CPU. Every buffer the kernels fill starts as NaN, so an element left unwritten fails."""

import math

import pytest
import torch

pytest.importorskip("triton")

from hf_efficient_attn.kernels.softmax import softmax_attention_reference  # noqa: E402
from hf_efficient_attn.kernels.sparse import BlockLayout, block_sparse_attention_reference  # noqa: E402
from hf_efficient_attn.kernels.sparse import triton_block_sparse as tbs  # noqa: E402
from hf_efficient_attn.kernels.sparse.triton_block_sparse import (  # noqa: E402
    block_sparse_attention,
    block_sparse_decode,
    block_sparse_unsupported_reason,
)
from tests.tolerances import assert_close_rms  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def nan_poisoned_buffers(monkeypatch):
    """Every output, partial and gradient buffer of the kernels starts as NaN."""
    monkeypatch.setattr(tbs, "_empty", lambda *shape, dtype, device: torch.full(shape, math.nan, dtype=dtype,
                                                                                  device=device))


def _inputs(B, Hq, Hkv, Sq, Sk, D, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g).to(device=DEVICE, dtype=dtype)
                 for s in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, Dv)))


def _no_nan(name, *tensors):
    for t in tensors:
        assert not torch.isnan(t).any(), f"{name}: NaN left in the output (an element was never written)"


def check_against_reference(B=1, Hq=2, Hkv=1, Sq=70, Sk=70, D=32, Dv=None, bm=16, bn=16, density=0.5,
                            dtype=torch.float32, layout=None, layout_rows=None, kpm_fill=None, packed=None,
                            backward=True, **opts):
    """Forward (out, lse) and backward (dq, dk, dv through out AND lse) vs the fp64 gather reference."""
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, D, Dv or D, dtype)
    if kpm_fill is not None:
        opts["key_padding_mask"] = kpm_fill(torch.rand(B, Sk, generator=torch.Generator().manual_seed(1)) > 0.3
                                            ).to(DEVICE)
    if packed is not None:
        opts["cu_seqlens_q"] = torch.tensor(packed[0], device=DEVICE, dtype=torch.int32)
        opts["cu_seqlens_k"] = torch.tensor(packed[1], device=DEVICE, dtype=torch.int32)
    if layout is None:
        rows, heads = layout_rows or (B, Hkv)
        lq, lk = (Sq, Sk) if packed is None else (max(b - a for a, b in zip(packed[0], packed[0][1:])),
                                                  max(b - a for a, b in zip(packed[1], packed[1][1:])))
        layout = BlockLayout.random(rows, heads, lq, lk, bm, bn, density, causal=opts.get("causal", False), seed=2,
                                    device=DEVICE)
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    out, lse = block_sparse_attention(*leaves, layout, **opts)
    ref_leaves = [t.detach().double().requires_grad_(backward) for t in (q, k, v)]
    ref_out, ref_lse = block_sparse_attention_reference(*ref_leaves, layout, **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _no_nan("forward", out, lse)
    assert_close_rms(out, ref_out, dtype, name="out")
    assert_close_rms(lse, ref_lse.float(), torch.float32, name="lse")
    if not backward:
        return out, lse
    d_out, d_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    finite = torch.isfinite(ref_lse)
    loss = (out.double() * d_out).sum() + torch.where(finite, lse.double() * d_lse, 0).sum()
    ref_loss = (ref_out * d_out).sum() + torch.where(finite, ref_lse * d_lse, 0).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, g, rg, leaf in zip(("dq", "dk", "dv"), grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        _no_nan(name, g)
        assert_close_rms(g, rg, dtype, name=name)
    return out, lse


def _kpm_with_empty_row(m):
    m[-1] = False  # the last batch row has no real key at all
    return m


CASES = {
    # name: (dtype, options)
    "causal-odd-gqa3-two-row-tiles": (torch.float32, dict(causal=True, Hq=3, Hkv=1, Sq=77, Sk=93, bm=32, bn=32)),
    "causal-q-shorter-than-k-mha": (torch.float32, dict(causal=True, Hq=2, Hkv=2, Sq=40, Sk=100, bn=32)),
    "padding-window-sinks-gqa2-fp16": (torch.float16, dict(B=2, Hq=4, Hkv=2, Sq=50, Sk=50, bm=32, causal=True,
                                                           window=20, sink_tokens=5, kpm_fill=_kpm_with_empty_row)),
    "noncausal-window-odd-dv-broadcast-layout": (torch.float32, dict(B=2, Hq=3, Hkv=1, Sq=45, Sk=70, Dv=24, bn=32,
                                                                     window=25, layout_rows=(1, 1))),
    "sinks-outside-layout-scale": (torch.float32, dict(Hq=2, Hkv=1, Sq=64, Sk=64, density=0.2, causal=True,
                                                       sink_tokens=20, scale=0.3)),
    "varlen-causal-sinks-padding": (torch.float32, dict(Hq=4, Hkv=2, Sq=70, Sk=90, causal=True, sink_tokens=3,
                                                        kpm_fill=lambda m: m, layout_rows=(3, 2),
                                                        packed=([0, 20, 20, 70], [0, 30, 41, 90]))),
    "q-longer-than-k-rows-see-nothing": (torch.float32, dict(causal=True, Sq=50, Sk=30)),
    "bf16-causal-gqa3": (torch.bfloat16, dict(causal=True, Hq=3, Hkv=1, Sq=45, Sk=45, bn=32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_vs_reference(name):
    dtype, opts = CASES[name]
    check_against_reference(dtype=dtype, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_gqa_on_gpu(dtype):
    check_against_reference(dtype=dtype, B=2, Hq=9, Hkv=3, Sq=1500, Sk=2100, D=64, bm=64, bn=64, density=0.2,
                            causal=True, sink_tokens=4, kpm_fill=lambda m: m)


@pytest.mark.gpu
def test_decode_long_cache_on_gpu():
    q, k, v = _inputs(4, 32, 8, 1, 32768, 128, 128, torch.bfloat16)
    lay = BlockLayout.random(4, 8, 1, 32768, 64, 64, 0.1, causal=True, device=DEVICE)
    with torch.no_grad():
        out, lse = block_sparse_decode(q, k, v, lay, causal=True, sink_tokens=4)
    ref_out, ref_lse = block_sparse_attention_reference(q.float(), k.float(), v.float(), lay, causal=True,
                                                        sink_tokens=4)
    assert_close_rms(out, ref_out.to(out.dtype), torch.bfloat16)
    assert_close_rms(lse, ref_lse, torch.float32, tol=1e-3)


def test_empty_layout_gives_zero_minus_inf_and_zero_grads():
    lay = BlockLayout.from_block_mask(torch.zeros(1, 1, 3, 3, dtype=torch.bool, device=DEVICE), 16, 16, 40, 40)
    out, lse = check_against_reference(Hq=3, Hkv=1, Sq=40, Sk=40, layout=lay, causal=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    q, k, v = (t.requires_grad_() for t in _inputs(1, 3, 1, 40, 40, 32, 32, torch.float32))
    out, lse = block_sparse_attention(q, k, v, lay, causal=True)
    for g in torch.autograd.grad(out.sum(), (q, k, v)):
        assert (g == 0).all()


def test_full_layout_equals_dense_softmax():
    q, k, v = _inputs(2, 6, 2, 45, 77, 32, 32, torch.float32)
    kpm = (torch.rand(2, 77, generator=torch.Generator().manual_seed(3)) > 0.2).to(DEVICE)
    lay = BlockLayout.full(45, 77, 16, 32, causal=True, device=DEVICE)
    with torch.no_grad():
        out, lse = block_sparse_attention(q, k, v, lay, causal=True, key_padding_mask=kpm)
    ref_out, ref_lse = softmax_attention_reference(q.double(), k.double(), v.double(), causal=True,
                                                   key_padding_mask=kpm)
    assert_close_rms(out, ref_out.float())
    assert_close_rms(lse, ref_lse.float())


DECODE = {
    # name: (B, Hq, Hkv, Sq, Sk, options, num_splits)
    "one-token-gqa3-splits": (2, 6, 2, 1, 300, dict(causal=True, sink_tokens=4), 3),
    "four-tokens-padding-window": (2, 4, 1, 4, 200, dict(causal=True, window=90, kpm=True), None),
    "varlen-one-split": (1, 3, 1, 5, 190, dict(causal=True, packed=([0, 1, 1, 5], [0, 60, 60, 190])), 1),
}


@pytest.mark.parametrize("name", list(DECODE))
def test_decode_vs_reference(name):
    B, Hq, Hkv, Sq, Sk, opts, splits = DECODE[name]
    opts = dict(opts)
    q, k, v = _inputs(B, Hq, Hkv, Sq, Sk, 32, 32, torch.float32)
    if opts.pop("kpm", False):
        opts["key_padding_mask"] = _kpm_with_empty_row(torch.rand(B, Sk) > 0.3).to(DEVICE)
    lq, lk = Sq, Sk
    packed = opts.pop("packed", None)
    if packed is not None:
        opts["cu_seqlens_q"] = torch.tensor(packed[0], device=DEVICE, dtype=torch.int32)
        opts["cu_seqlens_k"] = torch.tensor(packed[1], device=DEVICE, dtype=torch.int32)
        lq = max(b - a for a, b in zip(packed[0], packed[0][1:]))
        lk = max(b - a for a, b in zip(packed[1], packed[1][1:]))
    rows = B if packed is None else len(packed[0]) - 1
    lay = BlockLayout.random(rows, Hkv, lq, lk, 16, 32, 0.3, causal=True, seed=5, device=DEVICE)
    with torch.no_grad():
        out, lse = block_sparse_decode(q, k, v, lay, num_splits=splits, **opts)
        via_dispatch, _ = block_sparse_attention(q, k, v, lay, **opts)
    ref_out, ref_lse = block_sparse_attention_reference(q.double(), k.double(), v.double(), lay, **opts)
    _no_nan("decode", out, lse)
    assert_close_rms(out, ref_out.float())
    assert_close_rms(lse, ref_lse.float())
    assert_close_rms(via_dispatch, ref_out.float())


def test_unsupported_reasons_and_bad_calls():
    q, k, v = _inputs(1, 2, 1, 32, 32, 32, 32, torch.float32)
    lay = BlockLayout.random(1, 1, 32, 32, 16, 16, 0.5, device=DEVICE)
    assert block_sparse_unsupported_reason(q, k, v, lay) is None
    odd = BlockLayout.random(1, 1, 32, 32, 16, 8, 0.5, device=DEVICE)
    assert "block_n 8" in block_sparse_unsupported_reason(q, k, v, odd)
    assert "dtype float64" in block_sparse_unsupported_reason(q.double(), k.double(), v.double(), lay)
    with pytest.raises(ValueError, match="block_n 8"):
        block_sparse_attention(q, k, v, odd)
    with pytest.raises(ValueError, match="one query block"), torch.no_grad():
        block_sparse_decode(q, k, v, lay)
    with pytest.raises(ValueError, match="layout is for"):
        block_sparse_attention(q[:, :, :20], k, v, lay)


def compile_for_hopper():
    """Compile every block-sparse kernel for sm_90 (no GPU needed) with every feature on.

    Runs in a subprocess without TRITON_INTERPRET (see test_kernels_compile_for_hopper)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_efficient_attn.kernels.sparse import triton_block_sparse as k
    assert not k.INTERPRETED

    def jit_fn(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        return kernel

    pointers = dict(LSE="*fp32", DELTA="*fp32", KPM="*i8", CU_Q="*i32", CU_K="*i32", ENT="*i32", CNT="*i32",
                    O_PART="*fp32", LSE_PART="*fp32")
    ints = ("H_KV", "G", "BQ", "S_Q", "S_K", "W", "N_SINK", "N_MT", "Q_ROWS", "N_SPLITS")
    for kernel, block_m in ((k._fwd_kernel, 256), (k._decode_split_kernel, 16), (k._bwd_dkdv_kernel, 64),
                            (k._bwd_dq_kernel, 128)):
        for dtype, d in (("*bf16", 64), ("*fp16", 128)):
            fn = jit_fn(kernel)
            fp32 = False
            bm, warps, stages = k._row_tile(block_m, 64, d, fp32, bwd=kernel is k._bwd_dkdv_kernel)
            constexprs = dict(D=d - 16, DV=d - 16, D_PAD=d, DV_PAD=d, CAUSAL=True, HAS_WINDOW=True, HAS_KPM=True,
                              IS_VARLEN=True, UPCAST=False, PRECISION="tf32", BLOCK_M=bm, BLOCK_N=64)
            constexprs = {n: x for n, x in constexprs.items() if n in fn.arg_names}
            signature = {n: "constexpr" if n in constexprs else pointers.get(
                n, "fp32" if n in ("qk_scale", "scale") else dtype if n.isupper() and n not in ints else "i32")
                for n in fn.arg_names}
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(n),): x for n, x in constexprs.items()})
            triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile every kernel for real")
def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", "from tests.kernels.test_sparse_triton import compile_for_hopper; "
                          "compile_for_hopper()"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no ptxas to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
