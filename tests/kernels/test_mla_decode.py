"""MLA: absorbed == expanded reference (fp64), and the Triton split-KV latent decode vs the reference."""

import math

import pytest
import torch

from hf_efficient_attn.kernels.mla import (
    absorb_query,
    latent_attention_reference,
    mla_attention_expanded,
    mla_attention_reference,
)
from tests.tolerances import assert_close_rms


def _inputs(B=2, H=6, Hkv=2, Sq=1, Sk=37, r=40, dr=8, Dn=24, Dv=20, dtype=torch.float64):
    t = lambda *s: torch.randn(*s, dtype=dtype)
    return dict(q_nope=t(B, H, Sq, Dn), q_rope=t(B, H, Sq, dr), latent=t(B, Sk, r), k_rope=t(B, Sk, dr),
                w_uk=t(Hkv, Dn, r) / math.sqrt(r), w_uv=t(Hkv, Dv, r))


@pytest.mark.parametrize("Sq,causal", [(1, False), (5, True), (5, False)])
def test_absorbed_equals_expanded(Sq, causal):
    x = _inputs(Sq=Sq)
    kpm = torch.rand(2, 37) > 0.3
    kpm[:, -1] = True
    for opts in ({}, {"key_padding_mask": kpm}):
        out, lse = mla_attention_reference(**x, scale=0.2, causal=causal, **opts)
        ref, ref_lse = mla_attention_expanded(**x, scale=0.2, causal=causal, **opts)
        assert out.shape == (2, 6, Sq, 20) and lse.shape == (2, 6, Sq)
        assert_close_rms(out, ref, torch.float64, name="out")
        assert_close_rms(lse, ref_lse, torch.float64, name="lse")


def test_fully_masked_row_is_zero():
    x = _inputs()
    kpm = torch.zeros(2, 37, dtype=torch.bool)
    out, lse = mla_attention_reference(**x, scale=0.2, key_padding_mask=kpm)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isinf(lse).all()


def test_reference_rejects_bad_shapes():
    x = _inputs()
    q_lat = absorb_query(x["q_nope"], x["w_uk"])
    with pytest.raises(ValueError, match="latent"):
        latent_attention_reference(q_lat, x["q_rope"], x["latent"][..., :-1], x["k_rope"], scale=1.0)
    with pytest.raises(ValueError, match="k_rope"):
        latent_attention_reference(q_lat, x["q_rope"], x["latent"], x["k_rope"][:, :-1], scale=1.0)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,H,Sk,r,dr,splits,padded", [
    (1, 9, 1, 40, 8, 1, False),       # one cached token, 9 heads (not a power of two), r not a power of two
    (2, 4, 77, 64, 16, 3, True),      # odd length over 3 splits, left padding
    (1, 3, 300, 96, 32, None, False),  # the automatic split count
])
def test_triton_mla_decode(dtype, B, H, Sk, r, dr, splits, padded):
    from hf_efficient_attn.kernels.mla import mla_decode

    q_lat = torch.randn(B, H, 1, r).to(dtype)
    q_rope = torch.randn(B, H, 1, dr).to(dtype)
    latent = (torch.randn(B, Sk, r) / r ** 0.25).to(dtype)
    k_rope = torch.randn(B, Sk, dr).to(dtype)
    kpm = None
    if padded:
        kpm = torch.ones(B, Sk, dtype=torch.bool)
        kpm[0, :11] = False                      # sequence 0 is left-padded
    scale = 1 / math.sqrt(64)
    out, lse = mla_decode(q_lat, q_rope, latent, k_rope, scale=scale, key_padding_mask=kpm, num_splits=splits)
    ref, ref_lse = latent_attention_reference(q_lat.double(), q_rope.double(), latent.double(), k_rope.double(),
                                              scale=scale, key_padding_mask=kpm)
    assert out.dtype == dtype and out.shape == (B, H, 1, r) and lse.shape == (B, H, 1)
    assert_close_rms(out, ref, dtype, name="out_lat")
    assert_close_rms(lse, ref_lse.float(), torch.float32, name="lse")


@pytest.mark.triton_interpret
def test_triton_mla_decode_errors():
    from hf_efficient_attn.kernels.mla import mla_decode

    q = torch.randn(1, 2, 2, 16)
    with pytest.raises(ValueError, match="one new token"):
        mla_decode(q, torch.randn(1, 2, 2, 8), torch.randn(1, 5, 16), torch.randn(1, 5, 8), scale=1.0)
    with pytest.raises(ValueError, match="one dtype"):
        mla_decode(q[:, :, :1], torch.randn(1, 2, 1, 8).half(), torch.randn(1, 5, 16), torch.randn(1, 5, 8), scale=1.0)
