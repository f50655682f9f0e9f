"""Triton chunked linear attention (plain and gated) forward and backward, and the decode step, vs the fp64
reference, in the interpreter on CPU (torch.empty is NaN-poisoned by tests/conftest.py)."""

import pytest
import torch

pytest.importorskip("triton")

from hf_efficient_attn.kernels.linear.reference import (  # noqa: E402
    linear_attention_recurrent,
    linear_attention_reference,
)
from hf_efficient_attn.kernels.linear.triton_chunked import (  # noqa: E402
    linear_attention_step_triton,
    linear_attention_triton,
    linear_triton_unsupported_reason,
)
from tests.tolerances import assert_close_rms  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(B=1, H=2, Hkv=1, T=17, F=12, D=20, dtype=torch.float32, decay=False, state=False, seed=0,
                bshd=False):
    """Positive features (like the Hedgehog / elu+1 maps), Gaussian values, decay in [exp(-0.3), 1]; with
    bshd=True q, k, v are [B, H, T, *] views of [B, T, H, *] memory (as HF projections give them)."""
    g = torch.Generator().manual_seed(seed)

    def make(rand, heads, dim):
        if bshd:
            return rand(B, T, heads, dim, generator=g).transpose(1, 2)
        return rand(B, heads, T, dim, generator=g)
    q = make(torch.rand, H, F) + 0.05
    k = make(torch.rand, Hkv, F) + 0.05
    v = make(torch.randn, Hkv, D)
    ld = -torch.rand(B, Hkv, T, generator=g) * 0.3 if decay else None
    s0 = (torch.rand(B, Hkv, F, D, generator=g), torch.rand(B, Hkv, F, generator=g)) if state else None
    move = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return (q.to(DEVICE, dtype), k.to(DEVICE, dtype), v.to(DEVICE, dtype), move(ld),
            None if s0 is None else tuple(move(t) for t in s0))


def check_against_reference(dtype=torch.float32, normalize=True, return_state=False, chunk_size=16, cu_seqlens=None,
                            backward=True, **shape):
    """Forward (out, final state) and backward (dq, dk, dv, dlog_decay, dS0, dz0, through out AND the state)."""
    q, k, v, ld, s0 = make_inputs(dtype=dtype, **shape)
    cu = None if cu_seqlens is None else torch.tensor(cu_seqlens, dtype=torch.int32, device=DEVICE)
    leaves = [q, k, v, ld, *(s0 or (None, None))]
    leaves = [None if t is None else t.detach().requires_grad_(backward) for t in leaves]
    ref_leaves = [None if t is None else t.detach().double().requires_grad_(backward) for t in leaves]

    def call(fn, xs, **extra):
        state = None if xs[4] is None else (xs[4], xs[5])
        res = fn(*xs[:3], log_decay=xs[3], normalize=normalize, initial_state=state, return_state=return_state,
                 cu_seqlens=cu, **extra)
        return (res[0], *res[1]) if return_state else (res,)

    outs = call(linear_attention_triton, leaves, chunk_size=chunk_size)
    refs = call(linear_attention_reference, ref_leaves)
    assert outs[0].dtype == dtype
    assert_close_rms(outs[0], refs[0], dtype, name="out")
    for name, got, want in zip(("S", "z"), outs[1:], refs[1:]):
        assert got.dtype == torch.float32
        assert_close_rms(got, want, dtype, name=name)  # the state is fp32, built from inputs of the dtype
    if not backward:
        return outs
    cotangents = [torch.randn_like(r) for r in refs]
    loss = sum((o.double() * c).sum() for o, c in zip(outs, cotangents))
    ref_loss = sum((r * c).sum() for r, c in zip(refs, cotangents))
    live = [i for i, t in enumerate(leaves) if t is not None]
    grads = torch.autograd.grad(loss, [leaves[i] for i in live])
    ref_grads = torch.autograd.grad(ref_loss, [ref_leaves[i] for i in live])
    for i, g, rg in zip(live, grads, ref_grads):
        name = ("dq", "dk", "dv", "dlog_decay", "dS0", "dz0")[i]
        assert g.dtype == leaves[i].dtype, name
        assert_close_rms(g, rg, dtype, name=name)
    return outs


CASES = {
    # name: options of check_against_reference (chunk_size 16 unless given: several chunks at small T)
    "t1-mha-decay-state": dict(T=1, H=2, Hkv=2, decay=True, state=True, return_state=True),
    "t17-gqa3-decay-state": dict(T=17, H=6, Hkv=2, B=2, decay=True, state=True, return_state=True),
    "t17-plain-no-normalize": dict(T=17, H=3, Hkv=1, normalize=False, return_state=True),
    "t100-gqa3-plain-chunk64": dict(T=100, H=3, Hkv=1, chunk_size=64, state=True),
    "t100-decay-no-normalize-f20-d12-chunk32": dict(T=100, H=2, Hkv=2, F=20, D=12, decay=True, normalize=False,
                                                    state=True, return_state=True, chunk_size=32),
    "bshd-views-gqa2-decay-chunk128": dict(T=37, H=4, Hkv=2, B=2, decay=True, bshd=True, chunk_size=128),
    "t33-f80-d72-blocks-decay": dict(T=33, H=2, Hkv=1, F=80, D=72, decay=True, state=True, return_state=True),
    "fp16-t100-gqa3-decay-state": dict(dtype=torch.float16, T=100, H=3, Hkv=1, decay=True, state=True,
                                       return_state=True, chunk_size=32),
    "fp16-t17-plain-no-normalize": dict(dtype=torch.float16, T=17, H=2, Hkv=2, normalize=False),
    "varlen-decay-empty-and-length-1": dict(T=40, H=6, Hkv=2, decay=True, return_state=True,
                                            cu_seqlens=[0, 0, 1, 18, 40]),
    "varlen-plain-gqa3": dict(T=40, H=3, Hkv=1, return_state=True, cu_seqlens=[0, 17, 17, 18, 40]),
    "fp16-varlen-decay-no-normalize": dict(dtype=torch.float16, T=40, H=2, Hkv=1, decay=True, normalize=False,
                                           cu_seqlens=[0, 1, 40]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_backward_vs_reference(name):
    check_against_reference(**CASES[name])


def test_empty_sequence_returns_the_initial_state():
    q, k, v, ld, (s0, z0) = make_inputs(T=0, H=2, Hkv=1, decay=True, state=True)
    out, (s, z) = linear_attention_triton(q, k, v, log_decay=ld, initial_state=(s0, z0), return_state=True)
    assert out.shape == (1, 2, 0, 20)
    torch.testing.assert_close(s, s0)
    torch.testing.assert_close(z, z0)


def test_no_grad_path_and_fp32_state_from_fp16():
    q, k, v, ld, s0 = make_inputs(T=37, H=4, Hkv=2, dtype=torch.float16, decay=True, state=True)
    s0 = tuple(t.half() for t in s0)  # a half-precision state is read as is, returned in fp32
    with torch.no_grad():
        out, (s, z) = linear_attention_triton(q, k, v, log_decay=ld, initial_state=s0, return_state=True)
    ref, (rs, rz) = linear_attention_reference(q, k, v, log_decay=ld, initial_state=s0, return_state=True)
    assert out.dtype == torch.float16 and s.dtype == z.dtype == torch.float32
    assert_close_rms(out, ref, torch.float16)
    assert_close_rms(s, rs, torch.float16, name="S")


def test_gradient_through_the_state_alone():
    """out unused (no gradient arrives for it): k, v, log_decay and the initial state still get theirs."""
    q, k, v, ld, s0 = make_inputs(T=37, H=3, Hkv=1, decay=True, state=True)
    leaves = [t.clone().requires_grad_() for t in (k, v, ld, *s0)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    _, (s, z) = linear_attention_triton(q, *leaves[:2], log_decay=leaves[2], initial_state=tuple(leaves[3:]),
                                        return_state=True)
    _, (rs, rz) = linear_attention_reference(q.double(), *ref_leaves[:2], log_decay=ref_leaves[2],
                                             initial_state=tuple(ref_leaves[3:]), return_state=True)
    ws, wz = torch.randn_like(rs), torch.randn_like(rz)
    grads = torch.autograd.grad((s.double() * ws).sum() + (z.double() * wz).sum(), leaves)
    ref_grads = torch.autograd.grad((rs * ws).sum() + (rz * wz).sum(), ref_leaves)
    for name, g, rg in zip(("dk", "dv", "dlog_decay", "dS0", "dz0"), grads, ref_grads):
        assert_close_rms(g, rg, torch.float32, name=name)


def test_chunk_size_does_not_change_the_result():
    q, k, v, ld, s0 = make_inputs(T=70, H=2, Hkv=1, decay=True, state=True)
    outs = [linear_attention_triton(q, k, v, log_decay=ld, initial_state=s0, chunk_size=c) for c in (16, 32, 128)]
    for o in outs[1:]:
        assert_close_rms(o, outs[0], torch.float32)


# -- decode step -------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("H, Hkv, F, D", [(6, 2, 12, 20), (2, 2, 80, 72)])
def test_decode_step_equals_recurrent(decay, normalize, H, Hkv, F, D):
    q, k, v, ld, state = make_inputs(B=2, H=H, Hkv=Hkv, T=3, F=F, D=D, decay=decay, state=True)
    given = state
    before = tuple(t.clone() for t in state)
    want, (ws, wz) = linear_attention_recurrent(q, k, v, log_decay=ld, normalize=normalize, initial_state=state,
                                                return_state=True)
    outs = []
    for t in range(3):  # three chained steps, each fed the state the last one returned
        step = slice(t, t + 1)
        o, state = linear_attention_step_triton(q[:, :, step], k[:, :, step], v[:, :, step], state,
                                                log_decay=None if ld is None else ld[:, :, step], normalize=normalize)
        outs.append(o)
    assert all(torch.equal(a, b) for a, b in zip(given, before))  # out of place: the given state is untouched
    assert_close_rms(torch.cat(outs, 2), want, torch.float32)
    assert_close_rms(state[0], ws, torch.float32, name="S")
    assert_close_rms(state[1], wz, torch.float32, name="z")


def test_decode_step_fp16_and_strided_state():
    q, k, v, ld, (s, z) = make_inputs(B=2, H=4, Hkv=2, T=1, dtype=torch.float16, decay=True, state=True)
    s_view = s.transpose(0, 1).contiguous().transpose(0, 1)  # the same values with non-standard strides
    out, (s1, z1) = linear_attention_step_triton(q, k, v, (s_view, z), log_decay=ld)
    want, (ws, wz) = linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=(s, z), return_state=True)
    assert out.dtype == torch.float16 and s1.dtype == torch.float32
    assert_close_rms(out, want, torch.float16)
    assert_close_rms(s1, ws, torch.float32, name="S")
    assert_close_rms(z1, wz, torch.float32, name="z")


# -- dispatch and bad input --------------------------------------------------------------------------

def test_unsupported_reasons():
    q, k, v, ld, s0 = make_inputs(decay=True, state=True)
    assert linear_triton_unsupported_reason(q, k, v, log_decay=ld, initial_state=s0) is None
    assert "float64" in linear_triton_unsupported_reason(q.double(), k.double(), v.double())
    assert "mixed dtypes" in linear_triton_unsupported_reason(q, k.half(), v)
    big = torch.zeros(1, 1, 4, 300, device=DEVICE)
    assert "300 > 256" in linear_triton_unsupported_reason(big, big, v[:, :1, :4])


@pytest.mark.parametrize("bad, message", [
    (dict(chunk_size=48), "power of two"),
    (dict(chunk_size=8), "power of two"),
    (dict(dtype=torch.float64), "dtype float64"),
])
def test_bad_input_raises(bad, message):
    q, k, v, _, _ = make_inputs(dtype=bad.pop("dtype", torch.float32))
    with pytest.raises(ValueError, match=message):
        linear_attention_triton(q, k, v, **bad)


def test_decode_step_rejects_several_tokens():
    q, k, v, _, s0 = make_inputs(T=2, state=True)
    with pytest.raises(ValueError, match="one token"):
        linear_attention_step_triton(q, k, v, s0)


# -- on a GPU ----------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("decay", [False, True])
def test_bf16_long_on_gpu(decay):
    check_against_reference(dtype=torch.bfloat16, B=2, H=8, Hkv=2, T=1000, F=64, D=128, decay=decay, state=True,
                            return_state=True, chunk_size=64)


@pytest.mark.gpu
def test_fp16_varlen_f256_on_gpu():
    check_against_reference(dtype=torch.float16, H=4, Hkv=1, T=700, F=256, D=96, decay=True, return_state=True,
                            chunk_size=64, cu_seqlens=[0, 0, 1, 300, 700])


# -- compilation for Hopper (no GPU needed) ----------------------------------------------------------

def compile_for_hopper():
    """Compile every kernel for sm_90 twice: every feature on with bf16 inputs, every feature off with fp32
    inputs (exact dots); the interpreter checks no types. Runs in a subprocess without TRITON_INTERPRET (see
    test_kernels_compile_for_hopper)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hf_efficient_attn.kernels.linear import triton_chunked as lc
    assert not lc.INTERPRETED

    flags = ("HAS_DECAY", "HAS_S0", "HAS_DST", "NORMALIZE", "IS_VARLEN")
    fp32 = ("HS", "HZ", "ST", "ZT", "S0", "Z0", "DEN", "DDEN", "DST", "DZT", "DHS", "DHZ", "DS0", "DZ0", "DG", "S",
            "Z", "S_OUT", "Z_OUT", "LD")
    int_ptrs = ("CU", "CHUNK_OFFS", "CHUNKS")
    ints = ("H", "H_KV", "G", "T", "NT")
    for on, tensor, precision in ((True, "*bf16", "tf32"), (False, "*fp32", "ieee")):
        features = dict(F=80, D=72, BT=64, BK=64, BV=64, D_PAD=128, G_PAD=16, UPCAST=False, PRECISION=precision,
                        F32_PRECISION=precision, **{f: on for f in flags})
        for fn in (lc._fwd_state_kernel, lc._fwd_out_kernel, lc._bwd_prep_kernel, lc._bwd_dstate_kernel,
                   lc._bwd_dv_kernel, lc._bwd_dqk_kernel, lc._step_kernel):
            constexprs = {n: v for n, v in features.items() if n in fn.arg_names}
            signature = {}
            for n in fn.arg_names:
                if n in constexprs:
                    signature[n] = "constexpr"
                elif n in fp32:
                    signature[n] = "*fp32"
                elif n in int_ptrs:
                    signature[n] = "*i32"
                elif n.isupper() and n not in ints:
                    signature[n] = tensor
                else:
                    signature[n] = "fp32" if n == "eps" else "i32"
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
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
    run = subprocess.run([sys.executable, "-c", "from tests.kernels.test_linear_triton import compile_for_hopper; "
                          "compile_for_hopper()"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    if "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("this triton has no ptxas to compile for sm_90")
    assert run.returncode == 0, run.stderr[-3000:]
