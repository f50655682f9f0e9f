"""Triton FlashAttention forward and backward vs the reference (fp64), in the interpreter on CPU."""

import math

import pytest
import torch

pytest.importorskip("triton")

from hf_efficient_attn.kernels.softmax import softmax_attention_reference  # noqa: E402
from hf_efficient_attn.kernels.softmax.triton_flash import flash_attention  # noqa: E402
from tests.tolerances import assert_close_rms  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(B, Hq, Hkv, Sq, Skv, D, Dv, dtype, bshd=False):
    """Random q, k, v; with bshd=True they are [B, H, S, D] views of [B, S, H, D] memory (as HF passes them)."""
    def make(H, S, d):
        if bshd:
            return torch.randn(B, S, H, d, device=DEVICE).to(dtype).transpose(1, 2)
        return torch.randn(B, H, S, d, device=DEVICE).to(dtype)
    return make(Hq, Sq, D), make(Hkv, Skv, D), make(Hkv, Skv, Dv)


def check_against_reference(B=1, Hq=2, Hkv=1, Sq=130, Skv=130, D=64, Dv=None, dtype=torch.float32,
                            kpm_fill=None, packed=None, sinks=False, bshd=False, backward=True, **opts):
    """Forward (out, lse) and backward (dq, dk, dv, dsinks through out AND lse) vs the fp64 reference."""
    Dv = Dv or D
    q, k, v = _inputs(B, Hq, Hkv, Sq, Skv, D, Dv, dtype, bshd)
    if kpm_fill is not None:
        opts["key_padding_mask"] = kpm_fill(torch.rand(B, Skv, device=DEVICE) > 0.3)
    if packed is not None:
        opts["cu_seqlens_q"] = torch.tensor(packed[0], device=DEVICE, dtype=torch.int32)
        opts["cu_seqlens_k"] = torch.tensor(packed[1], device=DEVICE, dtype=torch.int32)
    s = torch.randn(Hq, device=DEVICE) if sinks else None
    leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)] + ([s.requires_grad_(backward)] if sinks else [])
    out, lse = flash_attention(*leaves[:3], sinks=leaves[3] if sinks else None, **opts)

    ref_leaves = [t.detach().double().requires_grad_(backward) for t in leaves]
    ref_out, ref_lse = softmax_attention_reference(*ref_leaves[:3], sinks=ref_leaves[3] if sinks else None, **opts)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close_rms(out, ref_out, dtype, name="out")
    assert_close_rms(lse, ref_lse.float(), torch.float32, name="lse")
    if not backward:
        return out, lse
    d_out = torch.randn_like(ref_out)
    d_lse = torch.randn_like(ref_lse)
    finite = torch.isfinite(ref_lse)
    loss = (out.double() * d_out).sum() + torch.where(finite, lse.double() * d_lse, 0).sum()
    ref_loss = (ref_out * d_out).sum() + torch.where(finite, ref_lse * d_lse, 0).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad(ref_loss, ref_leaves)
    for name, g, rg, leaf in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads, leaves):
        assert g.dtype == leaf.dtype
        assert_close_rms(g, rg, dtype, name=name)  # dsinks is fp32 but built from the dtype's out and lse
    return out, lse


def _kpm_with_empty_row(m):
    m[-1] = False  # the last batch row has no real key at all
    return m


CASES = {
    # name: (dtype, options)
    "full-mha-130": (torch.float32, dict()),
    "causal-gqa3-63x130-d80": (torch.float32, dict(causal=True, Hq=3, Hkv=1, Sq=63, Skv=130, D=80)),
    "causal-gqa4-fp16": (torch.float16, dict(causal=True, Hq=4, Hkv=1)),
    "full-q1-gqa4": (torch.float32, dict(Hq=4, Hkv=1, Sq=1, Skv=63)),
    "causal-q1-fp16": (torch.float16, dict(causal=True, Hq=3, Hkv=1, Sq=1, Skv=130, D=80)),
    "padding-gqa3-fp16": (torch.float16, dict(B=2, Hq=6, Hkv=2, Sq=63, Skv=63, causal=True,
                                              kpm_fill=_kpm_with_empty_row)),
    "padding-bshd-views": (torch.float32, dict(B=2, Hq=4, Hkv=2, Sq=130, Skv=130, D=80, kpm_fill=_kpm_with_empty_row,
                                               bshd=True)),
    "varlen-causal-padding": (torch.float32, dict(Hq=4, Hkv=2, Sq=130, Skv=160, causal=True, kpm_fill=lambda m: m,
                                                  packed=([0, 1, 64, 64, 130], [0, 5, 70, 71, 160]))),
    "varlen-full-fp16": (torch.float16, dict(Hq=3, Hkv=1, Sq=130, Skv=130, D=80,
                                             packed=([0, 63, 64, 130], [0, 63, 64, 130]))),
    "window-causal-3-stages": (torch.float32, dict(causal=True, window=150, Sq=300, Skv=300, Hq=1)),
    "window-causal-small": (torch.float32, dict(causal=True, window=17, Hq=4, Hkv=1, Sq=63, Skv=130)),
    "window-full-softcap-fp16": (torch.float16, dict(window=40, softcap=5.0, Hq=3, Hkv=3)),
    "softcap-causal": (torch.float32, dict(causal=True, softcap=2.0, Hq=4, Hkv=2, D=80)),
    "sinks-causal-gqa4": (torch.float32, dict(causal=True, sinks=True, Hq=4, Hkv=1)),
    "sinks-window-softcap-varlen-fp16": (torch.float16, dict(sinks=True, window=20, softcap=3.0, causal=True, Hq=4,
                                                             Hkv=2, Sq=130, Skv=160,
                                                             packed=([0, 1, 64, 64, 130], [0, 5, 70, 71, 160]))),
    "empty-rows-q-longer-than-k": (torch.float32, dict(causal=True, Sq=130, Skv=63)),
    "head-dim-256-dv-48": (torch.float32, dict(D=256, Dv=48, Sq=63, Skv=63, causal=True)),
    "head-dim-32-scale": (torch.float16, dict(D=32, Sq=63, Skv=130, scale=0.3)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_vs_reference(name):
    dtype, opts = CASES[name]
    check_against_reference(dtype=dtype, **opts)


def test_rows_that_see_nothing_give_zero_and_minus_inf():
    out, lse = check_against_reference(causal=True, Sq=130, Skv=63, Hq=2, Hkv=2)
    assert (out[:, :, :67] == 0).all() and torch.isneginf(lse[:, :, :67]).all()
    assert torch.isfinite(lse[:, :, 67:]).all()


def test_empty_query_or_key_sets():
    """No keys: every row sees only the sink (or nothing); no queries: empty outputs and zero dK/dV."""
    from hf_efficient_attn.kernels.softmax import softmax_attention_naive
    q, k, v = _inputs(1, 2, 1, 5, 0, 16, 16, torch.float32)
    sinks = torch.randn(2, device=DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    out, lse = flash_attention(*leaves[:3], sinks=leaves[3], causal=True)
    ref_out, ref_lse = softmax_attention_naive(*leaves[:3], sinks=leaves[3], causal=True)
    assert (out == 0).all() and torch.allclose(lse, ref_lse)
    d_lse = torch.randn_like(lse)
    grads = torch.autograd.grad((lse * d_lse).sum() + out.sum(), leaves)
    ref_grads = torch.autograd.grad((ref_lse * d_lse).sum() + ref_out.sum(), leaves)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)
    q, k, v = _inputs(1, 2, 1, 0, 7, 16, 16, torch.float32)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, lse = flash_attention(*leaves)
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)
    dq, dk, dv = torch.autograd.grad(out.sum() + lse.sum(), leaves)
    assert dq.shape == q.shape and (dk == 0).all() and (dv == 0).all()


def test_no_grad_path_and_memory_layout():
    q, k, v = _inputs(1, 4, 2, 63, 63, 64, 64, torch.float16)
    with torch.no_grad():
        out, lse = flash_attention(q, k, v, causal=True)
    assert out.shape == (1, 4, 63, 64) and out.transpose(1, 2).is_contiguous()
    ref, _ = softmax_attention_reference(q, k, v, causal=True)
    assert_close_rms(out, ref, torch.float16)


@pytest.mark.parametrize("bad, message", [
    (dict(D=300), "head_dim 300"),
    (dict(k_dtype=torch.float16), "one dtype"),
    (dict(Hkv=3), "multiple"),
])
def test_bad_input_raises(bad, message):
    Hq, Hkv, D = 4, bad.get("Hkv", 2), bad.get("D", 64)
    q = torch.randn(1, Hq, 8, D, device=DEVICE)
    k = torch.randn(1, Hkv, 8, D, device=DEVICE).to(bad.get("k_dtype", torch.float32))
    v = torch.randn(1, Hkv, 8, D, device=DEVICE)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_bf16_on_gpu(causal):
    check_against_reference(dtype=torch.bfloat16, B=2, Hq=8, Hkv=2, Sq=1000, Skv=1000, D=128, causal=causal,
                            sinks=True)


@pytest.mark.gpu
def test_fp16_long_gqa_window_on_gpu():
    check_against_reference(dtype=torch.float16, B=1, Hq=12, Hkv=4, Sq=2048, Skv=4096, D=96, causal=True,
                            window=700, softcap=30.0)


def test_sinks_gradient_closed_form():
    """d sink_h = -sum_rows exp(sink_h - lse) * (rowsum(dO * O) - dlse), checked against autograd of the naive spec."""
    from hf_efficient_attn.kernels.softmax import softmax_attention_naive
    q, k, v = (t.double() for t in _inputs(2, 3, 3, 7, 11, 16, 16, torch.float32))
    sinks = torch.randn(3, dtype=torch.float64, requires_grad=True)
    out, lse = softmax_attention_naive(q, k, v, sinks=sinks, causal=True)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    (grad,) = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), sinks)
    delta = (out * d_out).sum(-1) - d_lse
    closed = -(torch.exp(sinks.detach().view(1, 3, 1) - lse) * delta).sum(dim=(0, 2))
    torch.testing.assert_close(closed, grad, rtol=1e-6, atol=1e-9)  # lse is returned in fp32, even for fp64
    assert math.isfinite(grad.sum().item())


def test_default_tiles_are_in_their_grids(monkeypatch):
    """Without HFA_TRITON_AUTOTUNE each kernel runs exactly its default tile; with it, every tile that fits."""
    from hf_efficient_attn.kernels.softmax import triton_decode as dec
    from hf_efficient_attn.kernels.softmax import triton_flash as fl
    from hf_efficient_attn.kernels.triton_utils.jit import config_space, tile_pruner
    monkeypatch.delenv("HFA_TRITON_AUTOTUNE", raising=False)
    for space, default, streamed in ((fl._FWD_SPACE, fl._fwd_default, "BLOCK_N"),
                                     (fl._DKDV_SPACE, fl._dkdv_default, "BLOCK_M"),
                                     (fl._DQ_SPACE, fl._dq_default, "BLOCK_N"),
                                     (dec._SPLIT_SPACE, dec._split_default, "BLOCK_N")):
        grid = config_space(space)
        for d in (16, 32, 64, 128, 256):
            for precision in ("tf32", "ieee"):
                args = {"D_PAD": d, "DV_PAD": d, "PRECISION": precision}
                (chosen,) = tile_pruner(default, streamed)(grid, args)
                meta, warps, stages = default(d, precision == "ieee")
                assert (chosen.kwargs, chosen.num_warps, chosen.num_stages) == (meta, warps, stages)
                monkeypatch.setenv("HFA_TRITON_AUTOTUNE", "1")
                tuned = tile_pruner(default, streamed)(grid, args)
                assert chosen in tuned and 1 < len(tuned) <= len(grid)
                monkeypatch.delenv("HFA_TRITON_AUTOTUNE")


def compile_for_hopper():
    """Compile every kernel for sm_90 (no GPU needed) with every feature on; the interpreter checks no types.

    Runs in a subprocess without TRITON_INTERPRET (see test_kernels_compile_for_hopper)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_efficient_attn.kernels.softmax import triton_decode as dec
    from hf_efficient_attn.kernels.softmax import triton_flash as fl
    from hf_efficient_attn.kernels.triton_utils import jit as shared
    assert not fl.INTERPRETED and not shared.INTERPRETED

    def jit_fn(kernel):
        while not isinstance(kernel, triton.runtime.jit.JITFunction):
            kernel = kernel.fn
        return kernel

    features = dict(D=80, DV=80, D_PAD=128, DV_PAD=128, CAUSAL=True, HAS_WINDOW=True, HAS_SOFTCAP=True, HAS_KPM=True,
                    HAS_SINKS=True, IS_VARLEN=True, HAS_DLSE=True, UPCAST=False, PRECISION="tf32", NS_PAD=32)
    pointers = dict(LSE="*fp32", DELTA="*fp32", DLSE="*fp32", SINKS="*fp32", KPM="*i8", CU_Q="*i32", CU_K="*i32",
                    O_PART="*fp32", LSE_PART="*fp32")
    floats = ("qk_scale", "sc_in", "sc_out", "scale")
    ints = ("H", "G", "H_KV", "S", "S_Q", "S_K", "W", "Q_ROWS", "N_SPLITS")
    kernels = [(fl._fwd_kernel, fl._fwd_default), (fl._bwd_dkdv_kernel, fl._dkdv_default),
               (fl._bwd_dq_kernel, fl._dq_default), (dec._decode_split_kernel, dec._split_default),
               (fl._bwd_preprocess_kernel, lambda d, f: (dict(BLOCK_M=64), 4, 1)),
               (shared.lse_merge_kernel, lambda d, f: (dict(), 4, 1))]
    for kernel, default in kernels:
        fn = jit_fn(kernel)
        meta, warps, stages = default(128, False)
        constexprs = {**features, "BLOCK_M": 16, **meta}
        constexprs = {n: v for n, v in constexprs.items() if n in fn.arg_names}
        signature = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else
                                                                           "*bf16" if n.isupper() and n not in ints
                                                                           else "i32")
                     for n in fn.arg_names}
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
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
    run = subprocess.run([sys.executable, "-c", "from tests.kernels.test_triton_flash import compile_for_hopper; "
                          "compile_for_hopper()"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no ptxas to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
