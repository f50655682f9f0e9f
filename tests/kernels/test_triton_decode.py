"""Triton split-KV decode vs the reference (fp64), and the Triton dispatch, in the interpreter on CPU."""

import pytest
import torch

pytest.importorskip("triton")

from hf_efficient_attn.kernels.softmax import (  # noqa: E402
    softmax_attention_reference,
    triton_softmax_attention,
    triton_unsupported_reason,
)
from hf_efficient_attn.kernels.softmax.triton_decode import decode_attention  # noqa: E402
from tests.tolerances import assert_close_rms  # noqa: E402

pytestmark = pytest.mark.triton_interpret
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def check_decode(B=1, Hq=4, Hkv=1, Sq=1, Skv=300, D=64, Dv=None, dtype=torch.float32, kpm_fill=None,
                 packed=None, sinks=False, **opts):
    Dv = Dv or D
    q = torch.randn(B, Hq, Sq, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, Skv, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, Skv, Dv, device=DEVICE).to(dtype)
    if kpm_fill is not None:
        opts["key_padding_mask"] = kpm_fill(torch.rand(B, Skv, device=DEVICE) > 0.5)
    if packed is not None:
        opts["cu_seqlens_q"] = torch.tensor(packed[0], device=DEVICE, dtype=torch.int32)
        opts["cu_seqlens_k"] = torch.tensor(packed[1], device=DEVICE, dtype=torch.int32)
    s = torch.randn(Hq, device=DEVICE) if sinks else None
    out, lse = decode_attention(q, k, v, sinks=s, **opts)
    opts.pop("num_splits", None)
    ref_out, ref_lse = softmax_attention_reference(q.double(), k.double(), v.double(),
                                                   sinks=None if s is None else s.double(), **opts)
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert_close_rms(out, ref_out, dtype, name="out")
    assert_close_rms(lse, ref_lse.float(), torch.float32, name="lse")
    return out, lse


def _kpm_with_empty_row(m):
    m[-1] = False
    return m


CASES = {
    "q1-mha": (torch.float32, dict(Hq=2, Hkv=2)),
    "q1-gqa4-fp16": (torch.float16, dict(Hq=4, Hkv=1)),
    "q1-gqa3-d80-one-split": (torch.float32, dict(Hq=6, Hkv=2, D=80, num_splits=1)),
    "q4-causal-gqa4": (torch.float32, dict(Sq=4, causal=True, Hq=8, Hkv=2)),
    "q4-causal-fp16-many-splits": (torch.float16, dict(Sq=4, causal=True, num_splits=7)),
    "q4-window-softcap-sinks": (torch.float32, dict(Sq=4, causal=True, window=50, softcap=4.0, sinks=True,
                                                    num_splits=3)),
    "q4-full-window": (torch.float32, dict(Sq=4, window=30, Hq=3, Hkv=1)),
    "q4-padding-fp16": (torch.float16, dict(B=2, Sq=4, causal=True, kpm_fill=_kpm_with_empty_row)),
    "varlen-causal-window-padding": (torch.float32, dict(Hq=6, Hkv=2, Sq=9, Skv=400, causal=True, window=30,
                                                         kpm_fill=lambda m: m,
                                                         packed=([0, 1, 5, 5, 9], [0, 50, 300, 301, 400]))),
    "q16-gqa8-two-m-tiles": (torch.float32, dict(Hq=16, Hkv=2, Sq=16, Skv=40, causal=True)),
    "q1-d256-dv48": (torch.float32, dict(D=256, Dv=48, Skv=130, num_splits=2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_decode_vs_reference(name):
    dtype, opts = CASES[name]
    check_decode(dtype=dtype, **opts)


def test_decode_rows_that_see_nothing():
    out, lse = check_decode(B=2, Sq=1, kpm_fill=_kpm_with_empty_row, num_splits=4)
    assert (out[-1] == 0).all() and torch.isneginf(lse[-1]).all()
    out, lse = check_decode(B=2, Sq=1, kpm_fill=_kpm_with_empty_row, sinks=True)
    assert (out[-1] == 0).all() and torch.isfinite(lse[-1]).all()  # the sink alone: lse = sink


def test_decode_rejects_what_it_does_not_serve():
    q, k, v = torch.randn(1, 2, 17, 32), torch.randn(1, 2, 40, 32), torch.randn(1, 2, 40, 32)
    with pytest.raises(ValueError, match="up to 16"):
        decode_attention(q, k, v)
    with pytest.raises(ValueError, match="forward-only"):
        decode_attention(q[:, :, :1].requires_grad_(), k, v)


@pytest.mark.gpu
def test_decode_bf16_long_cache_on_gpu():
    check_decode(dtype=torch.bfloat16, B=4, Hq=32, Hkv=8, Sq=1, Skv=32768, D=128, sinks=True)
    check_decode(dtype=torch.bfloat16, B=2, Hq=16, Hkv=2, Sq=4, Skv=5000, D=64, causal=True, window=1024,
                 kpm_fill=_kpm_with_empty_row)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------

def _qkv(Sq=4, Skv=40, D=32, dtype=torch.float32):
    return (torch.randn(1, 4, Sq, D, device=DEVICE, dtype=dtype), torch.randn(1, 2, Skv, D, device=DEVICE, dtype=dtype),
            torch.randn(1, 2, Skv, D, device=DEVICE, dtype=dtype))


def test_dispatch_decode_without_grad_flash_with_grad(monkeypatch):
    import hf_efficient_attn.kernels.softmax.triton_decode as decode_mod
    import hf_efficient_attn.kernels.softmax.triton_flash as flash_mod
    calls = []
    for mod, name in ((decode_mod, "decode_attention"), (flash_mod, "flash_attention")):
        real = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    q, k, v = _qkv()
    ref, _ = softmax_attention_reference(q.double(), k.double(), v.double(), causal=True)
    out, _ = triton_softmax_attention(q, k, v, causal=True)
    assert calls == ["decode_attention"]
    assert_close_rms(out, ref, torch.float32)
    q.requires_grad_(True)
    out, _ = triton_softmax_attention(q, k, v, causal=True)
    out.sum().backward()
    assert calls == ["decode_attention", "flash_attention"] and torch.isfinite(q.grad).all()
    with torch.no_grad():
        triton_softmax_attention(*_qkv(Sq=17), causal=True)
    assert calls[-1] == "flash_attention"


@pytest.mark.parametrize("change, reason", [
    (dict(attn_mask=torch.ones(1, 1, 4, 40, dtype=torch.bool)), "arbitrary 4-D attn_mask"),
    (dict(dropout_p=0.1), "dropout"),
    (dict(D=300), "head_dim 300 > 256"),
    (dict(dtype=torch.float64), "dtype float64"),
    (dict(sinks=torch.zeros(1, 4, 4, 1)), "per-query sinks; the kernels take one sink logit per head"),
])
def test_unsupported_reasons(change, reason):
    change = dict(change)
    q, k, v = _qkv(D=change.pop("D", 32), dtype=change.pop("dtype", torch.float32))
    assert triton_unsupported_reason(q, k, v, **change) == reason
    with pytest.raises(ValueError, match=reason):
        triton_softmax_attention(q, k, v, **change)


def test_supported_case_has_no_reason():
    q, k, v = _qkv()
    assert triton_unsupported_reason(q, k, v, causal=True, window=8, softcap=5.0, sinks=torch.zeros(4),
                                     key_padding_mask=torch.ones(1, 40, dtype=torch.bool)) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-without-interpreter answer")
def test_cpu_without_interpreter_is_reported(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_unsupported_reason(*_qkv()) == "tensors on cpu and TRITON_INTERPRET is not 1"


def test_missing_triton_is_reported(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    assert triton_unsupported_reason(*_qkv()) == "triton is not installed"
