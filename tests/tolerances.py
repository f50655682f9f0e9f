"""Relative-RMS comparison with tolerances by dtype: ||out - ref|| / ||ref||, NaN never passes."""

import torch

# rel-RMS tolerances; fp32 allows TF32 only where a test says so.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_rms(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.pow(2).mean().sqrt().clamp_min(1e-30)
    return ((out - ref).pow(2).mean().sqrt() / denom).item()


def assert_close_rms(out, ref, dtype=None, tol=None, name="output"):
    """Assert ``rel_rms(out, ref) <= tol`` (tol from RTOL by dtype) and that out has no NaN/inf where ref is finite."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.isfinite(out[finite]).all(), f"{name}: NaN/inf where the reference is finite"
    assert torch.equal(torch.isfinite(out), finite), f"{name}: non-finite pattern differs from the reference"
    tol = RTOL[dtype or out.dtype] if tol is None else tol
    err = rel_rms(torch.where(finite, out, 0), torch.where(finite, ref, 0))
    assert err <= tol, f"{name}: relative RMS error {err:.3e} > {tol:.1e}"
    return err
