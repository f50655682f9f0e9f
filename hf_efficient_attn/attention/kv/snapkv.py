"""``hfa.kv.snapkv(budget, window=32, pool=7)``: SnapKV — keep, per KV head, the tokens the last queries attend.

After a prefill (more than ``DECODE_MAX_Q_LEN`` new tokens) that leaves more than ``budget`` tokens, each layer scores its cached tokens by the attention of the
prompt's last ``window`` queries (softmax over every cached token, summed over those queries and over the query
heads of each KV head's GQA group, so the choice is per KV head and K/V are never repeated), max-pools the
scores over ``pool`` neighbouring slots (SnapKV's clustering) and keeps the last ``window`` tokens plus the
``budget - window`` best others. The prefill itself is exact (dense); only the cache is cut.

Decoding appends; the queries of the last ``window`` steps are kept (a few KiB per layer), and whenever the cache
reaches ``budget + window`` tokens it is cut back to ``budget`` by the same rule, with those queries as the
observation window. Memory is therefore bounded (at most ``budget + window - 1`` slots between calls) and the
choice keeps following what recent queries read.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..sparse.base import DECODE_MAX_Q_LEN
from .base import KVPolicy, check_int

__all__ = ["SnapKV", "snapkv"]


class SnapKV(KVPolicy):
    bounded = True

    def __init__(self, budget: int, window: int, pool: int):
        self.budget, self.window, self.pool = check_int("budget", budget), check_int("window", window), \
            check_int("pool", pool)
        if budget <= window:
            raise ValueError(f"snapkv budget ({budget}) must exceed its observation window ({window}): the budget "
                             f"counts the window's own tokens")
        if pool % 2 == 0:
            raise ValueError(f"snapkv pool must be odd (a centred max-pool), got {pool}")
        super().__init__(f"snapkv_b{budget}_w{window}_p{pool}")

    def max_tokens(self) -> int:
        return self.budget + self.window - 1

    def attention(self, layer, q, q_pos, scale, *, shift, exact_ok, device_backend):
        if exact_ok:
            return None  # nothing cut yet: the ordinary exact path
        from .apply import slot_attention
        return slot_attention(q, layer.keys, layer.values, layer.pos, layer.valid, q_pos, scale), layer.slots()

    def _remember(self, layer, q, q_pos, q_valid):
        w = self.window
        qs, ps, vs = q[:, :, -w:], q_pos[:, -w:], q_valid[:, -w:]
        if "q" in layer.extra:
            qs = torch.cat([layer.extra["q"], qs], dim=2)[:, :, -w:]
            ps = torch.cat([layer.extra["q_pos"], ps], dim=1)[:, -w:]
            vs = torch.cat([layer.extra["q_valid"], vs], dim=1)[:, -w:]
        layer.extra.update(q=qs.detach(), q_pos=ps, q_valid=vs)

    def after_attention(self, layer, q, q_pos, q_valid, scale):
        self._remember(layer, q, q_pos, q_valid)
        T = layer.slots()
        prefill = q.shape[2] > DECODE_MAX_Q_LEN
        if T <= self.budget or (not prefill and T < self.budget + self.window):
            return
        obs, obs_pos, obs_ok = layer.extra["q"], layer.extra["q_pos"], layer.extra["q_valid"]
        B, Hq, w, D = obs.shape
        H = layer.keys.shape[1]
        sc = torch.einsum("bhgwd,bhtd->bhgwt", obs.float().view(B, H, Hq // H, w, D), layer.keys.float()) * scale
        allowed = layer.valid[:, :, None, :] & (layer.pos[:, :, None, :] <= obs_pos[:, None, :, None]) \
            & obs_ok[:, None, :, None]
        p = torch.softmax(sc.masked_fill(~allowed[:, :, None], float("-inf")), dim=-1).nan_to_num(0.0)
        score = p.sum(dim=(2, 3))                                                    # [B, Hkv, T]
        score = F.max_pool1d(score, self.pool, stride=1, padding=self.pool // 2)
        newest = (layer.real - 1)[:, None, None]
        recent = layer.pos > newest - self.window                                    # the observation window
        score = torch.where(recent, torch.full_like(score, float("inf")), score)
        score = score.masked_fill(~layer.valid, float("-inf"))
        top = score.topk(min(self.budget, T), dim=-1).indices
        keep = torch.zeros_like(layer.valid).scatter_(2, top, True)
        layer.keep(keep)


def snapkv(budget: int = 1024, window: int = 32, pool: int = 7) -> SnapKV:
    """SnapKV with a cache of ``budget`` tokens per KV head (see the module docstring)."""
    return SnapKV(budget, window, pool)
