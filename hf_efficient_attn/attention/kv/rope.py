"""Shifting cached keys along RoPE: what lets a policy give kept tokens the positions StreamingLLM gives them.

A key cached at position p was rotated by R(p) (per plane f: angle p * inv_freq[f], HF's rotate_half layout on
the first ``rotary_dim`` dims, see :mod:`..families`). R(a) R(b) = R(a + b), so rotating it again by R(d) gives
exactly the key the model would have cached at position p + d: attention depends only on the query-key distance,
so "keys cached before RoPE and rotated by their slot" (StreamingLLM) equals "keys cached after RoPE and shifted
by the change of their distance" — the second is what :class:`RopeShift` does, on the few tokens that move.

:func:`rope_shifts` reads each layer's inv_freq from the model (one fact place: ``families.layer_inv_freqs``)
and checks it against the model's own rotary module (cos/sin at a few positions, its attention scaling divided
out); a model whose RoPE is not a plain per-plane rotation linear in position (or that has no RoPE) gets a
reason instead, and policies that shift keys refuse it.
"""

from __future__ import annotations

import inspect

import torch

from ..families import layer_inv_freqs, rotary_dim

__all__ = ["RopeShift", "rope_shifts"]


class RopeShift:
    """Rotate keys by d positions: ``rotate(k [..., D], d [...] int)``; dims past ``rotary_dim`` untouched."""

    def __init__(self, inv_freq: torch.Tensor, rotary_dim: int):
        self.inv_freq, self.rotary_dim = inv_freq.double(), int(rotary_dim)

    def rotate(self, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        R, half = self.rotary_dim, self.rotary_dim // 2
        freqs = delta.to(torch.float64)[..., None] * self.inv_freq.to(delta.device)   # [..., R/2]
        cos, sin = freqs.cos().to(k.dtype), freqs.sin().to(k.dtype)
        x1, x2, rest = k[..., :half], k[..., half:R], k[..., R:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def _model_rotation(rotary, layer_type, positions: torch.Tensor):
    """(cos, sin) [P, R] of the model's own rotary module at `positions`, its attention scaling divided out."""
    x = torch.zeros(1, positions.numel(), 1, dtype=torch.float32)
    params = inspect.signature(rotary.forward).parameters
    args = (x, positions[None]) + ((layer_type,) if "layer_type" in params else ())
    cos, sin = rotary(*args)
    cos, sin = cos[0].double(), sin[0].double()
    scale = (cos ** 2 + sin ** 2).sqrt().clamp_min(1e-12)
    return cos / scale, sin / scale


def rope_shifts(model) -> list[RopeShift] | str:
    """One :class:`RopeShift` per decoder layer, or the reason the model's keys cannot be shifted exactly."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None or not any(n.endswith("inv_freq") for n, _ in model.named_buffers()):
        return (f"{type(model).__name__} has no rotary position embedding (RoPE) to shift; its positions are "
                f"absolute, so StreamingLLM's cache positions do not apply (use positions='original')")
    try:
        R = rotary_dim(model)
        freqs = layer_inv_freqs(model)
    except (ValueError, StopIteration) as e:
        return f"cannot read {type(model).__name__}'s RoPE frequencies ({e})"
    rope_type = getattr(rotary, "rope_type", None) or "default"
    if "dynamic" in str(rope_type):
        return (f"{type(model).__name__} uses dynamic RoPE scaling, whose frequencies change with the sequence "
                f"length: cached keys cannot be shifted exactly (use positions='original')")
    types = getattr(model.config, "layer_types", None) or [None] * len(freqs)
    positions = torch.tensor([0, 1, 7, 300])
    checked = {}
    for i, inv in enumerate(freqs):
        key = types[i] if i < len(types) else None
        if key in checked:
            continue
        try:
            cos, sin = _model_rotation(rotary, key, positions)
        except Exception as e:  # noqa: BLE001  a rotary module with another call convention
            return f"cannot evaluate {type(rotary).__name__} to check its rotation ({type(e).__name__}: {e})"
        ang = positions.double()[:, None] * inv.double()[None]
        ang = torch.cat([ang, ang], dim=-1)
        if cos.shape[-1] != R or not (torch.allclose(cos, ang.cos(), atol=1e-3)
                                      and torch.allclose(sin, ang.sin(), atol=1e-3)):
            return (f"{type(rotary).__name__} is not a rotate_half RoPE linear in position (checked at positions "
                    f"{positions.tolist()}); cached keys cannot be shifted exactly (use positions='original')")
        checked[key] = True
    return [RopeShift(inv, R) for inv in freqs]
