"""GQA/MHA -> MLA (multi-head latent attention): cache one rank-r latent and one small RoPE key per token.

    new = convert(model, "mla", kv_lora_rank=128, rope_dim=64, method="attention", calibration=texts,
                  tokenizer=tok)           # convert_mla, listed in conversions.convert.CONVERSIONS

After TransMLA (2025) and MHA2MLA (Ji et al. 2025). Notation as in ``attention.mla``: C hidden, Hq query
heads, Hkv KV heads, G = Hq / Hkv, D head dim, R rotary dim (D for Llama), r = kv_lora_rank, d_r = rope_dim,
P = d_r / 2 kept RoPE planes, Sigma the (C, C) second moment of the attention layer's input on calibration
data (the identity when there is none). Per layer, in float64:

1. **One RoPE key for all heads, plane by plane (exact).** For frequency f the KV heads' key planes form
   K_f (Hkv, 2); RoPE rotates every row by the same 2x2 rotation, so any orthogonal U_f (Hkv, Hkv) acting
   on the head axis commutes with it: z_f = U_f K_f. U_f is the PCA of the heads at that frequency
   (eigenvectors of K_f Sigma K_f^T, TransMLA's RoRoPE), so z_{f,0} carries the most positional energy.
   Query head h reads key plane f of its head g as sum_j U_f[j, g] z_{f,j}: the RoPE query of plane (f, j)
   is U_f[j, g] q_{h,f} (``q_rope_coef``), and the scores are unchanged.
2. **Partial RoPE.** Rank every plane (f, j) by sum_h |U_f[j, g(h)]| ||q_{h,f}|| ||z_{f,j}|| (MHA2MLA's
   ||q_f|| ||k_f|| summed over the query heads that read it; RMS norms on calibration data, from Sigma) and
   keep the top P as the shared RoPE key (d_r dims). The rest of every key, K_nope_g = k_g minus its kept
   planes, loses its rotation: the only approximation besides the rank. With d_r = Hkv * R every plane is
   kept (for MQA: d_r = D) and this step is exact. ``rope_ranking="rotation"`` also weights plane f by how far
   it turns over the distances that matter, E_t 2|sin(theta_f t / 2)| (`rotation_weight`): a slow plane is
   position-free already and costs little to drop (Gemma 3 270M, r=192 d_r=64: 36.6 vs 71.5 held-out ppl;
   SmolLM2-135M, r=128 d_r=64: 21.43 vs 26.08): the default.
3. **Joint low rank of [K_nope; V]** (2 Hkv D rows, rank <= 2 Hkv D - d_r), after scaling the K rows by
   alpha = sqrt(E||v||^2 / E||k_nope||^2) so keys and values weigh the same (undone in the up-projection):
   ``"weights"``: truncated SVD of the stacked weights; ``"activations"``: PCA of the stacked activations
   (top-r eigenvectors E of A Sigma A^T; down = E^T A, up = E), which keeps what the data uses;
   ``"attention"``: the same PCA with every error measured as attention feels it (`attention_metric`: key
   errors through the queries that read them, value errors through o_proj), A -> T A, up -> T^-1 E.
   r = 2 Hkv D - d_r (the rank of the stack) is exact. Each latent dim's down row and up column are then
   rescaled to one norm (exact), so a heal's optimizer moves both factors by similar fractions.
4. **Scale.** The layer keeps the original 1/sqrt(D) (see ``attention.mla``).

KV cache per token and layer: r + d_r values, against 2 Hkv D before.

**qk-norm families (Gemma 3, Qwen3).** Gemma and Qwen3 RMS-normalise each query and key head (q_norm, k_norm)
before RoPE, so keys are not a linear map of x and [K_nope; V] has no factorization in x. It has one in the coordinates
u = [q_n; k_n; v] (normed queries, normed keys, values), where all three are linear (selections): steps 1-3
run there unchanged (`_qk_norm_mla_layer`) with Sigma the second moments of u on calibration data
(`feature_second_moments`), and the latent becomes kv_a_proj([k_n; v]), the RoPE key k_rope_proj(k_n)
(`attention.mla.QKNormMLAAttention`). Exact at full rank, like the rest. Without calibration ("weights"),
Sigma_u is what the weights imply for isotropic x with each norm at its expected scale
(`weight_feature_moments`). Each layer uses its own RoPE (Gemma: local theta on sliding-window layers).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..attention.families import FAMILIES, attention_layers, family_of, layer_inv_freqs, rotary_dim
from ..attention.families import Family as FamilyEntry
from ..attention.mla import mla_model_class
from .io import token_blocks
from .toolkit import calibration_forward, config_fields, provenance_record, rebuild

__all__ = ["METHODS", "MLA_TRAINABLE", "SUPPORTED", "Family", "LayerMLA", "attention_metric", "convert_mla",
           "expected_rotation", "feature_second_moments", "rotation_weight", "input_second_moments", "mla_layer", "mla_ranks",
           "weight_feature_moments"]

METHODS = ("weights", "activations", "attention")


class Family(NamedTuple):
    """How one model family becomes MLA: its MLA config and model classes (``attention.mla.mla_model_class``), and
    its table entry (``attention.families``): per-head q/k RMS norms make the factorization work on the normed
    features (see "qk-norm families" above), in the norm's own gain form."""

    config_cls: type
    model_cls: type
    qk_norm: bool
    entry: FamilyEntry


# the families MLA supports: the entries of the one family table that list it
SUPPORTED = {mt: Family(*mla_model_class(mt), qk_norm=fam.qk_norm is not None, entry=fam)
             for mt, fam in FAMILIES.items() if "mla" in fam.methods}


def _check_family(model):
    family = SUPPORTED[family_of(model, "mla").model_type]
    if getattr(model.config, "attention_bias", False):
        raise ValueError("MLA conversion needs attention without q/k/v/o biases (config.attention_bias=True here)")
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        raise ValueError(f"MLA conversion does not support attention logit soft-capping (config.attn_logit_softcapping="
                         f"{model.config.attn_logit_softcapping}): the absorbed decode has no softcap")
    if getattr(model.config, "use_bidirectional_attention", False):
        raise ValueError("MLA conversion needs causal attention (config.use_bidirectional_attention=True here)")
    return family


def mla_ranks(model) -> dict:
    """The shape limits of `model`: ``{"max_rope_dim": Hkv * R, "full_rank": lambda d_r: 2 Hkv D - d_r, ...}``."""
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, attention_layers(model)[0].head_dim
    rot = rotary_dim(model)
    return {"num_kv_heads": hkv, "head_dim": d, "rotary_dim": rot, "max_rope_dim": hkv * rot,
            "full_rank": lambda rope_dim: 2 * hkv * d - rope_dim, "kv_per_token_layer": 2 * hkv * d}


def _check_ranks(model, kv_lora_rank, rope_dim):
    lim = mla_ranks(model)
    for name, v in (("kv_lora_rank", kv_lora_rank), ("rope_dim", rope_dim)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an integer, got {v!r}")
    if rope_dim < 2 or rope_dim % 2 or rope_dim > lim["max_rope_dim"]:
        raise ValueError(f"rope_dim={rope_dim} must be an even number from 2 to {lim['max_rope_dim']} (KV heads "
                         f"{lim['num_kv_heads']} x rotary dim {lim['rotary_dim']}): it counts the dims of the one RoPE "
                         "key all heads share, two per kept frequency plane")
    full = lim["full_rank"](rope_dim)
    if kv_lora_rank < 1 or kv_lora_rank > full:
        raise ValueError(f"kv_lora_rank={kv_lora_rank} must be from 1 to {full}, the rank of [K_nope; V] with "
                         f"rope_dim={rope_dim} (2 x {lim['num_kv_heads']} KV heads x head_dim {lim['head_dim']} - "
                         f"rope_dim); {full} is lossless")


# -- calibration --------------------------------------------------------------------------------------

@torch.no_grad()
def input_second_moments(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False):
    """Per attention layer, Sigma = X^T X / N (C, C) float64 of its input hidden states on `input_ids` (n, L)."""
    layers = attention_layers(model)
    c = model.config.hidden_size
    sums = [torch.zeros(c, c, dtype=torch.float64) for _ in layers]
    count = [0]

    def hook(i):
        def fn(mod, args, kwargs, out):
            x = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).detach().reshape(-1, c).double()
            sums[i] += (x.T @ x).cpu()
            if i == 0:
                count[0] += x.shape[0]
        return fn

    calibration_forward(model, input_ids, [(attn, hook(i)) for i, attn in enumerate(layers)], batch_size, progress)
    return [s / max(count[0], 1) for s in sums]


@torch.no_grad()
def feature_second_moments(model, input_ids: torch.Tensor, batch_size: int = 4, progress: bool = False):
    """qk-norm families: per attention layer, the second moments of u = [q_n (Hq D); k_n (Hkv D); v (Hkv D)]
    (normed queries and keys before RoPE, values) on `input_ids`, as (q blocks (Hq, D, D), kv block
    (2 Hkv D, 2 Hkv D)) float64. `mla_layer` never reads the q-q cross-head or q-kv terms, so they are not kept."""
    layers = attention_layers(model)
    heads_first = family_of(model).norm_layout == "bhsd"     # the norms see (B, H, S, D), else (B, S, H, D)
    sums_q = [0.0] * len(layers)
    sums_kv = [0.0] * len(layers)
    keys, values, count = {}, {}, [0]

    def add_kv(i):                          # once both the normed keys and the values of layer i are in
        if i in keys and i in values:
            u = torch.cat([keys.pop(i), values.pop(i)], dim=-1).double()
            sums_kv[i] = sums_kv[i] + (u.T @ u).cpu()
            if i == 0:
                count[0] += u.shape[0]

    def on_v(i):
        def fn(mod, args, kwargs, out):
            values[i] = out.detach().reshape(-1, out.shape[-1])                  # (B S, Hkv D)
            add_kv(i)
        return fn

    def on_q(i):
        def fn(mod, args, kwargs, out):
            q = (out if heads_first else out.transpose(1, 2)).detach().double()    # (B, Hq, S, D)
            sums_q[i] = sums_q[i] + torch.einsum("bhsd,bhse->hde", q, q).cpu()
        return fn

    def on_k(i):
        def fn(mod, args, kwargs, out):
            k = (out.transpose(1, 2) if heads_first else out).detach()               # (B, S, Hkv, D)
            keys[i] = k.reshape(-1, k.shape[2] * k.shape[3])
            add_kv(i)
        return fn

    hooks = []
    for i, attn in enumerate(layers):
        hooks += [(attn.v_proj, on_v(i)), (attn.q_norm, on_q(i)), (attn.k_norm, on_k(i))]
    calibration_forward(model, input_ids, hooks, batch_size, progress)
    n = max(count[0], 1)
    return [(q / n, kv / n) for q, kv in zip(sums_q, sums_kv)]


def weight_feature_moments(attn, num_heads: int, num_kv_heads: int, family: FamilyEntry) -> torch.Tensor:
    """qk-norm families without data: Sigma_u = M M^T (Cu, Cu) float64 for u = [q_n; k_n; v] ~ M x with x ~ N(0, I)
    and each per-head norm at its expected scale (RMS norm of W_h x -> gain W_h x / (||W_h||_F / sqrt(D)), gain the
    family's: 1 + w for Gemma, w for Qwen3); the analogue of the Llama "weights" method's identity Sigma."""
    d = attn.head_dim
    c = attn.q_proj.weight.shape[1]

    def normed(lin, norm, heads):
        w = lin.weight.detach().double().cpu().reshape(heads, d, c)
        rms = w.pow(2).sum((1, 2)).div(d).sqrt().clamp_min(1e-12)               # (heads,)
        gain = family.norm_gain(norm.weight.detach().double().cpu())             # w, or Gemma's 1 + w
        return (gain[None, :, None] * w / rms[:, None, None]).reshape(heads * d, c)

    m = torch.cat([normed(attn.q_proj, attn.q_norm, num_heads), normed(attn.k_proj, attn.k_norm, num_kv_heads),
                   attn.v_proj.weight.detach().double().cpu()])
    return m @ m.T


# -- one layer ----------------------------------------------------------------------------------------

class LayerMLA(dict):
    """One layer's MLA weights (float64): q_rope_coef (Hkv, P), k_rope_proj (d_r, C), kv_a_proj (r, C),
    kv_b_proj (2 Hkv D, r), plus `frequencies` (P,) and diagnostics."""


def _sqrt_psd(m: torch.Tensor, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^1/2, M^-1/2) of a symmetric PSD (n, n) matrix, regularised by `ridge` x its mean eigenvalue."""
    ev, evec = torch.linalg.eigh(m)
    ev = ev.clamp_min(0) + ridge * ev.clamp_min(0).mean().clamp_min(1e-300)
    return (evec * ev.sqrt()) @ evec.T, (evec / ev.sqrt()) @ evec.T


def expected_rotation(k_nope: torch.Tensor, inv_freq: torch.Tensor, rotary: int, distance: int) -> torch.Tensor:
    """Replace the rotation a dropped RoPE plane no longer gets by its mean over query-key distances.

    The score of plane f is q^T R(-theta_f t) k at distance t = query pos - key pos >= 0. Keeping k
    unrotated (MHA2MLA) uses R(0) = I for every t: right for slow planes, a spurious position-free bias for
    fast ones, whose rotation averages out. E_t R(-theta t) = c I - s J with c = mean cos(theta t),
    s = mean sin(theta t), t uniform on 0 .. distance - 1, is linear in k, so it folds into K_nope's weights.
    k_nope: (Hkv, D, C) (planes (f, f + R/2)); inv_freq: (R/2,). Planes kept in the RoPE key were subtracted
    from k_nope already (they are zero there), so this touches only the dropped ones."""
    half = rotary // 2
    t = torch.arange(distance, dtype=torch.float64)
    phase = inv_freq.double()[:, None] * t[None, :]                                  # (R/2, distance)
    c, s = phase.cos().mean(1), phase.sin().mean(1)                                  # (R/2,)
    x, y = k_nope[:, :half], k_nope[:, half:rotary]                                 # (Hkv, R/2, C) each
    out = k_nope.clone()
    # R(phi) (x, y) = (x cos phi - y sin phi, x sin phi + y cos phi) at phi = -theta t, averaged
    out[:, :half] = c[:, None] * x + s[:, None] * y
    out[:, half:rotary] = -s[:, None] * x + c[:, None] * y
    return out


def rotation_weight(inv_freq: torch.Tensor, distance: int) -> torch.Tensor:
    """(R/2,) E_t ||I - R(theta_f t)|| = E_t 2 |sin(theta_f t / 2)| over distances t = 0 .. distance - 1: how far
    dropping plane f's rotation moves its score term, per unit of ||q_f|| ||k_f||. Near 0 for planes that turn
    little over `distance` (they are nearly position-free already), up to 4/pi for fast ones."""
    t = torch.arange(distance, dtype=torch.float64)
    return (inv_freq.double()[:, None] * t[None, :] / 2).sin().abs().mul(2).mean(1)


def attention_metric(q_w, o_w, sigma, num_kv_heads):
    """Block-diagonal (2 Hkv D, 2 Hkv D) pair (T, T^-1) that measures K/V errors as attention feels them:
    a key error dk of group a changes the scores of its query heads by q_h . dk, so keys are weighted by
    (sum_h E[q_h q_h^T])^1/2; a value error dv reaches the output as o_proj_h dv, so values are weighted by
    (sum_h o_h^T o_h)^1/2. q_w (Hq, D, C), o_w (C, Hq, D), sigma (C, C)."""
    hq, d, _ = q_w.shape
    g = hq // num_kv_heads
    blocks, inverses = [], []
    for which in ("k", "v"):
        for a in range(num_kv_heads):
            heads = range(a * g, (a + 1) * g)
            m = (sum(q_w[h] @ sigma @ q_w[h].T for h in heads) if which == "k"
                 else sum(o_w[:, h].T @ o_w[:, h] for h in heads))
            t, t_inv = _sqrt_psd(m)
            blocks.append(t)
            inverses.append(t_inv)
    return torch.block_diag(*blocks), torch.block_diag(*inverses)


def mla_layer(q_w: torch.Tensor, k_w: torch.Tensor, v_w: torch.Tensor, sigma: torch.Tensor, rotary: int,
              kv_lora_rank: int, rope_dim: int, method: str, o_w: torch.Tensor | None = None,
              inv_freq: torch.Tensor | None = None, rope_distance: int = 512,
              factor_sigma: torch.Tensor | None = None, plane_weight: torch.Tensor | None = None) -> LayerMLA:
    """Steps 1-3 of the module docstring for one layer. q_w (Hq, D, C), k_w and v_w (Hkv, D, C), sigma (C, C),
    o_w (C, Hq, D) (used by method "attention"); inv_freq (R/2,): when given, the RoPE planes that lose their
    rotation keep its average over query-key distances 0 .. rope_distance - 1 (`expected_rotation`).
    factor_sigma (C, C): method "weights" factorizes by PCA under it instead of the SVD of the weights (which
    is PCA under the identity); qk-norm families pass their weight-implied moments (`weight_feature_moments`).
    plane_weight (R/2,): multiplies each frequency's ranking score (`rotation_weight`)."""
    hq, d, c = q_w.shape
    hkv = k_w.shape[0]
    assert k_w.shape == v_w.shape == (hkv, d, c) and sigma.shape == (c, c) and hq % hkv == 0
    g_of = torch.arange(hq) // (hq // hkv)                                     # (Hq,) group of each query head
    half, p_keep = rotary // 2, rope_dim // 2

    # -- 1. per-frequency PCA over the KV heads (commutes with RoPE)
    planes_k = torch.stack([k_w[:, :half], k_w[:, half:rotary]], dim=2)         # (Hkv, R/2, 2, C)
    planes_q = torch.stack([q_w[:, :half], q_w[:, half:rotary]], dim=2)         # (Hq, R/2, 2, C)
    m = torch.einsum("afic,ce,bfie->fab", planes_k, sigma, planes_k)             # (R/2, Hkv, Hkv)
    eigval, eigvec = torch.linalg.eigh(m)                                        # ascending
    u = eigvec.flip(-1).transpose(1, 2)                                          # (R/2, Hkv, Hkv): u[f, j, a]
    z_energy = eigval.flip(-1).clamp_min(0)                                      # (R/2, Hkv): E||z_{f,j}||^2
    q_energy = torch.einsum("hfic,ce,hfie->hf", planes_q, sigma, planes_q).clamp_min(0)   # (Hq, R/2)

    # -- 2. rank the planes (f, j) and keep the top P
    weight = u[:, :, g_of].abs()                                                 # (R/2, Hkv_j, Hq)
    score = torch.einsum("fjh,hf->fj", weight, q_energy.sqrt()) * z_energy.sqrt()   # (R/2, Hkv)
    if plane_weight is not None:
        score = score * plane_weight.to(score)[:, None]
    top = torch.topk(score.flatten(), p_keep).indices
    f_idx, j_idx = top // hkv, top % hkv
    order = torch.argsort(f_idx * hkv + j_idx)                                   # sorted by frequency, for reading
    f_idx, j_idx = f_idx[order], j_idx[order]
    coef = u[f_idx, j_idx].T                                                     # (Hkv, P): coef[a, p] = U_f[j, a]
    z_w = torch.einsum("ap,apic->pic", coef, planes_k[:, f_idx])                 # (P, 2, C) kept plane weights
    k_rope_w = torch.cat([z_w[:, 0], z_w[:, 1]])                                 # (d_r, C): rotate_half layout
    k_nope = k_w.clone()                            # subtract the kept planes (index_add: a frequency may repeat)
    k_nope.index_add_(1, f_idx, -coef[:, :, None] * z_w[None, :, 0])
    k_nope.index_add_(1, f_idx + half, -coef[:, :, None] * z_w[None, :, 1])
    if inv_freq is not None:
        k_nope = expected_rotation(k_nope, inv_freq, rotary, rope_distance)

    # -- 3. balanced joint low rank of [K_nope; V]
    stack = torch.cat([k_nope.reshape(hkv * d, c), v_w.reshape(hkv * d, c)])    # (2 Hkv D, C)
    metric = metric_inv = None
    if method == "attention":                   # measure K/V in the units scores and outputs feel them
        metric, metric_inv = attention_metric(q_w, o_w, sigma, hkv)
        stack = metric @ stack
    energy = lambda w: float(torch.einsum("ic,ce,ie->", w, sigma, w))
    e_k, e_v = energy(stack[: hkv * d]), energy(stack[hkv * d:])
    alpha = math.sqrt(e_v / e_k) if e_k > 1e-12 * max(e_v, 1e-300) else 1.0
    scale = torch.cat([torch.full((hkv * d,), alpha), torch.ones(hkv * d)]).to(stack)
    balanced = stack * scale[:, None]
    if method == "weights" and factor_sigma is None:
        uu, s, vh = torch.linalg.svd(balanced, full_matrices=False)
        down = s[:kv_lora_rank, None] * vh[:kv_lora_rank]                       # (r, C)
        basis = uu[:, :kv_lora_rank]                                             # (2 Hkv D, r)
        spectrum = s.pow(2)
    else:
        cov = balanced @ (sigma if factor_sigma is None else factor_sigma) @ balanced.T   # (2 Hkv D, 2 Hkv D)
        ev, evec = torch.linalg.eigh(cov)
        basis = evec.flip(-1)[:, :kv_lora_rank]
        down = basis.T @ balanced
        spectrum = ev.flip(-1).clamp_min(0)
    up = basis / scale[:, None]
    if metric_inv is not None:
        up = metric_inv @ up
    # latent dim j: down row j and up column j to one norm (exact; Adam's per-weight steps, the same size on both
    # factors, then change both by similar fractions: at 30:0.2 a heal's first step wrecked the small side)
    gain = (up.norm(dim=0) / down.norm(dim=1).clamp_min(1e-300)).sqrt().clamp_min(1e-150)     # (r,)
    down, up = down * gain[:, None], up / gain[None, :]
    kept_energy = float(spectrum[:kv_lora_rank].sum() / spectrum.sum().clamp_min(1e-300))
    rope_energy = float(z_energy[f_idx, j_idx].sum() / z_energy.sum().clamp_min(1e-300))
    return LayerMLA(q_rope_coef=coef, k_rope_proj=k_rope_w, kv_a_proj=down, kv_b_proj=up,
                    frequencies=f_idx, planes=list(zip(f_idx.tolist(), j_idx.tolist())),
                    kv_energy_kept=kept_energy, rope_key_energy_kept=rope_energy, kv_balance=alpha)


def _qk_norm_mla_layer(attn, moments, o_w, hq, hkv, rotary, kv_lora_rank, rope_dim, method, inv_freq,
                       rope_distance, plane_weight=None, *, family: FamilyEntry) -> LayerMLA:
    """`mla_layer` for a layer with per-head q/k norms, in the coordinates u = [q_n (Hq D); k_n (Hkv D); v (Hkv D)]
    where queries, keys and values are linear (selections): the RoPE key and the latent come out as maps of
    k_n and [k_n; v] (`QKNormMLAAttention`). moments: `feature_second_moments` of this layer, or None (then
    the weight-implied ones). Method "weights" factorizes under the weight-implied moments."""
    d = attn.head_dim
    nq, nk = hq * d, hkv * d
    eye = torch.eye(nq + 2 * nk, dtype=torch.float64)
    q_u, k_u, v_u = (eye[a:b].reshape(-1, d, nq + 2 * nk) for a, b in ((0, nq), (nq, nq + nk), (nq + nk, nq + 2 * nk)))
    implied = weight_feature_moments(attn, hq, hkv, family)
    sigma = implied if moments is None else torch.block_diag(*moments[0], moments[1])
    lay = mla_layer(q_u, k_u, v_u, sigma, rotary, kv_lora_rank, rope_dim, method, o_w, inv_freq, rope_distance,
                    factor_sigma=implied if method == "weights" else None, plane_weight=plane_weight)
    for name, cols in (("k_rope_proj", slice(nq, nq + nk)), ("kv_a_proj", slice(nq, nq + 2 * nk))):
        w = lay[name]
        rest = torch.cat([w[:, :cols.start], w[:, cols.stop:]], dim=1)
        assert rest.abs().max() <= 1e-9 * w.abs().max().clamp_min(1e-300), f"{name} reads the queries"
        lay[name] = w[:, cols]
    return lay


# -- the conversion -----------------------------------------------------------------------------------

def convert_mla(model, kv_lora_rank: int, rope_dim: int, method: str = "attention", calibration=None,
                tokenizer=None, calibration_tokens: int = 16384, seq_len: int = 512, batch_size: int = 4,
                dropped_rope: str = "keep", rope_distance: int = 512, rope_ranking: str = "rotation",
                progress: bool = False):
    """A copy of `model` with MLA attention (`model` is not modified): a `LlamaMLAForCausalLM` from a Llama, a
    `Qwen3MLAForCausalLM` from a Qwen3, a `Gemma3MLAForCausalLM` from a Gemma 3 text model (the families whose
    entry in ``attention.families.FAMILIES`` lists "mla").

    kv_lora_rank: r, the latent size (1 .. 2 Hkv D - rope_dim; the maximum is lossless). rope_dim: d_r, the
    size of the RoPE key shared by all heads (even, 2 .. Hkv * rotary_dim; the maximum keeps every RoPE
    plane). method: ``"weights"`` (SVD of the stacked K_nope/V weights), ``"activations"`` (PCA of their
    activations on calibration data; needs `calibration`) or ``"attention"`` (that PCA with key errors
    weighted by the queries and value errors by o_proj; needs `calibration`; the default: on SmolLM2-135M at
    r=128, d_r=64 it reads 31.2 held-out ppl against 41.9 for "activations", training-free). Calibration text (or token ids (n, seq_len)),
    when given, also ranks the RoPE planes and sets the K/V balance; without it ``"weights"`` uses the
    weights alone. The result's ``hfa_conversions`` records the options and, per layer, the RoPE planes
    kept and the fraction of K/V energy the rank keeps. dropped_rope: what the RoPE planes left out of the
    RoPE key become: ``"keep"`` (unrotated, MHA2MLA) or ``"expected"`` (their rotation averaged over
    distances 0 .. rope_distance - 1, `expected_rotation`). rope_ranking: which RoPE planes the RoPE key keeps:
    ``"norms"`` (by ||q_f|| ||k_f||, MHA2MLA) or ``"rotation"`` (the default: that times how much the plane turns
    over distances 0 .. rope_distance - 1, `rotation_weight`: slow planes, nearly position-free already, go first;
    training-free at r=128 d_r=64 on SmolLM2-135M, 4,088 held-out tokens: 21.43 ppl vs 26.08 by norms).
    """
    family = _check_family(model)
    _check_ranks(model, kv_lora_rank, rope_dim)
    if method not in METHODS:
        raise ValueError(f"unknown MLA method {method!r}; the methods are: {', '.join(METHODS)}")
    if dropped_rope not in ("keep", "expected"):
        raise ValueError(f"dropped_rope={dropped_rope!r}: use 'keep' or 'expected'")
    if rope_ranking not in ("norms", "rotation"):
        raise ValueError(f"rope_ranking={rope_ranking!r}: use 'norms' or 'rotation'")
    if calibration is not None and tokenizer is None and not torch.is_tensor(calibration):
        raise ValueError("calibration text needs its tokenizer: pass tokenizer=...")
    if method in ("activations", "attention") and calibration is None:
        raise ValueError(f"method={method!r} factorizes calibration activations: pass calibration=<text> and "
                         "tokenizer=<its tokenizer> (or token ids), or use method='weights'")
    cfg, c = model.config, model.config.hidden_size
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    layers = attention_layers(model)
    d, rot = layers[0].head_dim, rotary_dim(model)
    record = provenance_record("mla", model, method=method, kv_lora_rank=kv_lora_rank, rope_dim=rope_dim,
                               dropped_rope=dropped_rope, rope_ranking=rope_ranking,
                               kv_values_per_token_layer=[2 * hkv * d, kv_lora_rank + rope_dim])
    moments = None
    if calibration is not None:
        ids = token_blocks(tokenizer, calibration, seq_len, calibration_tokens)
        moments = (feature_second_moments if family.qk_norm else input_second_moments)(model, ids, batch_size,
                                                                                        progress)
        record.update(calibration_tokens=int(ids.numel()), seq_len=seq_len)

    inv_freqs = layer_inv_freqs(model)
    per_layer = []
    for i, attn in enumerate(layers):
        o_w = attn.o_proj.weight.detach().double().cpu().reshape(c, hq, d)
        inv_freq = inv_freqs[i] if dropped_rope == "expected" else None
        plane_weight = rotation_weight(inv_freqs[i], rope_distance) if rope_ranking == "rotation" else None
        if family.qk_norm:
            per_layer.append(_qk_norm_mla_layer(attn, None if moments is None else moments[i], o_w, hq, hkv, rot,
                                                kv_lora_rank, rope_dim, method, inv_freq, rope_distance, plane_weight,
                                                family=family.entry))
            continue
        w = lambda lin, h: lin.weight.detach().double().cpu().reshape(h, d, c)
        sigma = torch.eye(c, dtype=torch.float64) if moments is None else moments[i]
        per_layer.append(mla_layer(w(attn.q_proj, hq), w(attn.k_proj, hkv), w(attn.v_proj, hkv), sigma, rot,
                                   kv_lora_rank, rope_dim, method, o_w, inv_freq, rope_distance,
                                   plane_weight=plane_weight))

    # -- the new model: the same weights, MLA attention
    dtype = next(model.parameters()).dtype
    dropped = () if family.qk_norm else ("k_proj", "v_proj")      # qk-norm layers still compute k_n and v
    state = {k: v for k, v in model.state_dict().items() if not any(f".self_attn.{n}." in k for n in dropped)}
    for i, lay in enumerate(per_layer):
        for name in ("q_rope_coef", "k_rope_proj", "kv_a_proj", "kv_b_proj"):
            key = f"model.layers.{i}.self_attn.{name}" + ("" if name == "q_rope_coef" else ".weight")
            state[key] = lay[name].to(dtype)
    mean = lambda key: round(sum(lay[key] for lay in per_layer) / len(per_layer), 6)
    record.update(kv_energy_kept=mean("kv_energy_kept"), rope_key_energy_kept=mean("rope_key_energy_kept"),
                  rope_planes=[lay["planes"] for lay in per_layer])
    fields = {**config_fields(model), "kv_lora_rank": kv_lora_rank, "mla_rope_dim": rope_dim,
              "mla_rope_frequencies": [lay["frequencies"].tolist() for lay in per_layer],
              "mla_scaling": float(layers[0].scaling)}
    return rebuild(model, family.config_cls, family.model_cls, fields, state, record)


MLA_NEW_MODULES = ("kv_a_proj", "kv_b_proj", "k_rope_proj", "q_rope_coef")


def MLA_TRAINABLE(name: str, param) -> bool:  # noqa: N802 - a constant-like selector for hfa.distill(trainable=...)
    """`distill(trainable=MLA_TRAINABLE)`, also listed as ``TRAINABLE["mla"]`` (`hfa convert --method mla`'s
    default): every attention weight of an MLA model (the new latent, RoPE-key and
    up-projections, the RoPE query coefficients, q_proj and o_proj; in qk-norm families also k_proj, v_proj and
    the q/k norms, which feed the latent)."""
    parts = name.split(".")
    return "self_attn" in parts and any(
        part in (*MLA_NEW_MODULES, "q_proj", "o_proj", "k_proj", "v_proj", "q_norm", "k_norm") for part in parts)

