"""How a pattern runs inside our attention function, and what it records: one call, one model.

``hfa.patch(model, sparse=pattern)`` attaches a :class:`SparseLayer` to every module of the model (the attention
function looks its module's up); the registry hands each call to :meth:`SparseLayer.attend`, which decides:

* **sparse** (the pattern's plan on the block-sparse kernels): prefill calls, and decode calls (at most
  ``DECODE_MAX_Q_LEN`` queries over a cache) when the pattern defines a decode rule;
* **dense** (the call exactly as without a pattern): other decode calls, and layers the model itself restricts to a
  sliding window (a pattern applies to full-attention layers; a sliding layer keeps its window);
* **refused** (ValueError naming the layer, what the call carries and what to do): calls the block-sparse kernels
  cannot compute exactly with a pattern: an explicit mask (static cache, packed sequences found from position ids,
  a mask the layer rewrote), attention-sink logits, a logit softcap, a position bias, attention dropout, kwargs we
  do not understand.

Rows are cut to their own sequence before a pattern sees them: leading padding (left-padded batches) is sliced off
per row, packed sequences (cu_seqlens) run one by one, so a pattern's positions count from each sequence's first
real token. Backends follow the one rule (:func:`~hf_efficient_attn.attention.backends.use_triton`): Triton where
``block_sparse_unsupported_reason`` is None on CUDA, else the reference block-gather path.

Every call records the fraction of its allowed blocks it computed, per KV head (dense calls: all of them, or the
window's). :func:`density` reads the records of the last forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...kernels.sparse import block_sparse_attention_reference
from ..backends import use_triton
from .base import DECODE_MAX_Q_LEN, SparsePattern, SparsePlan, allowed_blocks, window_blocks

__all__ = ["SparseLayer", "SparseState", "attach", "density", "detach", "is_sparse", "layer_errors", "pattern_of",
           "sparse_layer"]

_LAYER_ATTR = "_hfa_sparse_layer"
_STATE_ATTR = "_hfa_sparse_state"


# ----------------------------------------------------------------------------------------------
# what is recorded
# ----------------------------------------------------------------------------------------------

@dataclass
class CallRecord:
    """One attention call of one layer: the fraction of its allowed blocks computed, per KV head."""

    step: int
    density: torch.Tensor  # (Hkv,) fp32, CPU
    sparse: bool           # ran the pattern (False: dense, e.g. a decode step or a sliding-window layer)
    q_len: int
    kv_len: int


@dataclass
class SparseState:
    """The model's pattern and the records of its layers (``step`` counts the model's forward passes)."""

    pattern: SparsePattern
    step: int = 0
    records: dict = field(default_factory=dict)  # layer name -> CallRecord
    hook: object = None
    errors: dict | None = None  # layer name -> [relative error per call], while layer_errors() runs

    def new_forward(self, *_):
        self.step += 1


# ----------------------------------------------------------------------------------------------
# one attention call
# ----------------------------------------------------------------------------------------------

def _refusal(opts) -> str | None:
    """What in this call the block-sparse kernels cannot combine with a pattern exactly (None: nothing)."""
    if opts["attn_mask"] is not None:
        return ("an explicit attention mask (a static cache, packed sequences found from position_ids, a position "
                "bias, or a mask the layer rewrote), which a block layout cannot carry")
    if opts["sinks"] is not None:
        return "attention-sink logits (s_aux / sinks), which the block-sparse kernels do not take"
    if opts["softcap"] is not None:
        return "a logit softcap, which the block-sparse kernels do not take"
    if opts["dropout_p"]:
        return "attention dropout (the model is in training mode with attention_dropout > 0)"
    return None


def _kernel_reason(q, k, v, layout, key_padding_mask) -> str | None:
    try:
        from ...kernels.sparse.triton_block_sparse import block_sparse_unsupported_reason
    except ImportError as e:  # triton missing, or the kernels failed to import
        return f"the Triton block-sparse kernels are unavailable ({e})"
    return block_sparse_unsupported_reason(q, k, v, layout, key_padding_mask=key_padding_mask)


def _run_plan(q, k, v, plan: SparsePlan, *, scale, causal, key_padding_mask, backend, dense):
    """out [B, Hq, Sq, Dv] of one plan on the chosen backend, the dense query rows merged in."""
    opts = dict(scale=scale, causal=causal, window=plan.window, key_padding_mask=key_padding_mask,
                sink_tokens=plan.sink_tokens)
    layout = plan.layout
    if use_triton(backend, q.device, lambda: _kernel_reason(q, k, v, layout, key_padding_mask),
                  "this sparse attention call"):
        from ...kernels.sparse.triton_block_sparse import block_sparse_attention
        out = block_sparse_attention(q, k, v, layout, **opts)[0]
    else:
        out = block_sparse_attention_reference(q, k, v, layout, **opts)[0]
    g = min(plan.dense_query_rows, q.shape[2])
    if g:  # rows no layout row can express: dense over every key the call allows, in place of the sparse rows
        rows = dense(q[:, :, :g], k, v, scale=scale, causal=causal, window=None, softcap=None, sinks=None,
                     key_padding_mask=key_padding_mask, attn_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
                     dropout_p=0.0)
        out = torch.cat([rows.to(out.dtype), out[:, :, g:]], dim=2)
    return out


def _segment_attention(q, k, v, pattern, *, scale, causal, key_padding_mask, backend, dense):
    """One sequence (or a batch of sequences starting at key 0): (out, density [B, Hkv] fp32)."""
    if key_padding_mask is not None and bool(key_padding_mask.all()):
        key_padding_mask = None
    plan = pattern.plan(q, k, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    out = _run_plan(q, k, v, plan, scale=scale, causal=causal, key_padding_mask=key_padding_mask, backend=backend,
                    dense=dense)
    lay = plan.layout
    region = allowed_blocks(lay.q_len, lay.kv_len, lay.block_m, lay.block_n, causal, q.device)
    frac = plan.block_mask(causal).sum((-1, -2)).float() / max(1, int(region.sum()))
    return out, frac.expand(q.shape[0], k.shape[1]).cpu()


def sparse_attention(q, k, v, pattern: SparsePattern, *, scale=None, causal=True, key_padding_mask=None,
                     cu_seqlens_q=None, cu_seqlens_k=None, backend="auto", dense):
    """One attention call under ``pattern``. q: [B, Hq, Sq, D], k: [B, Hkv, Skv, D], v: [B, Hkv, Skv, Dv];
    key_padding_mask [B, Skv] (True = real) or None; cu_seqlens_q/k [N + 1] packed sequences (B == 1). dense: the
    exact dense attention function (``softmax_attention`` options), for rows a layout cannot express.

    Returns (out [B, Hq, Sq, Dv], density [Hkv] fp32 on CPU: the fraction of the allowed blocks computed, the mean
    over the sequences). Rows or sequences with no real key give 0."""
    reason = pattern.unsupported_reason(causal=causal)
    if reason is not None:
        raise ValueError(f"{pattern.name} cannot run this call: {reason}")
    run = dict(pattern=pattern, scale=scale, causal=causal, backend=backend, dense=dense)
    B, Hq, Sq, _ = q.shape
    Skv, Dv = k.shape[2], v.shape[3]
    lead = None  # leading padding per row, when some row has any
    if cu_seqlens_q is None and key_padding_mask is not None:
        real = key_padding_mask.to(q.device).bool()
        lead = torch.where(real.any(-1), real.int().argmax(-1), Skv).tolist()
        lead = lead if any(lead) else None
    if cu_seqlens_q is None and lead is None:
        out, frac = _segment_attention(q, k, v, key_padding_mask=key_padding_mask, **run)
        return out, frac.mean(0)
    fracs = []

    def segment(r, q0, q1, k0, k1):
        """Queries q0:q1 of row r over keys k0:k1 (zeros when there is no key)."""
        if k1 <= k0:
            return q.new_zeros(1, Hq, q1 - q0, Dv)
        kpm = None if key_padding_mask is None else key_padding_mask[r:r + 1, k0:k1]
        out, frac = _segment_attention(q[r:r + 1, :, q0:q1], k[r:r + 1, :, k0:k1], v[r:r + 1, :, k0:k1],
                                       key_padding_mask=kpm, **run)
        fracs.append(frac)
        return out

    if cu_seqlens_q is not None:  # packed sequences, one after another along the tokens of row 0
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        pieces = [segment(0, cq[n], cq[n + 1], ck[n], ck[n + 1]) for n in range(len(cq) - 1) if cq[n + 1] > cq[n]]
        pieces.append(q.new_zeros(1, Hq, Sq - cq[-1], Dv))  # tokens past the last sequence, if any
        out = torch.cat(pieces, dim=2)
    else:  # left padding: each row from its first real key; queries before it see nothing
        rows = []
        for r, n in enumerate(lead):
            q0 = min(Sq, max(0, n - (Skv - Sq)))  # the first query at or after the first real key
            rows.append(torch.cat([q.new_zeros(1, Hq, q0, Dv), segment(r, q0, Sq, n, Skv)], dim=2))
        out = torch.cat(rows, dim=0)
    density = torch.cat(fracs).mean(0) if fracs else torch.zeros(k.shape[1])
    return out, density


def structure_density(q_len, kv_len, block, causal, window, kv_heads) -> torch.Tensor:
    """[Hkv] fp32: the fraction of the allowed blocks a dense call computes (all, or those its window crosses)."""
    region = allowed_blocks(q_len, kv_len, block, block, causal, "cpu")
    used = window_blocks(q_len, kv_len, block, block, window, causal, "cpu") & region
    return torch.full((kv_heads,), float(used.sum()) / max(1, int(region.sum())))


# ----------------------------------------------------------------------------------------------
# the layer's view: sparse, dense or refused
# ----------------------------------------------------------------------------------------------

class SparseLayer:
    """What one module of a sparse-patched model carries: the model's state and the module's name."""

    def __init__(self, state: SparseState, name: str):
        self.state, self.name = state, name

    @property
    def pattern(self) -> SparsePattern:
        return self.state.pattern

    def is_decode(self, q_len: int, kv_len: int) -> bool:
        return q_len <= DECODE_MAX_Q_LEN and kv_len > q_len

    def applies(self, q_len: int, kv_len: int, windowed: bool) -> bool:
        """Whether the pattern runs this call (see the module docstring): not on sliding-window layers, and on
        decode steps only when the pattern defines a decode rule."""
        return not windowed and (self.pattern.decode or not self.is_decode(q_len, kv_len))

    def refuse(self, module, reason: str) -> ValueError:
        return ValueError(
            f"sparse pattern {self.pattern.name} cannot apply to {type(module).__name__} ({self.name}): its "
            f"attention calls carry {reason}. Patch without sparse= for this model, or use a model whose layers "
            f"pass only causal/window/padding structure (Llama, Mistral, Qwen2/3, Gemma 3, Phi3, GPT-NeoX, BERT).")

    def record(self, density: torch.Tensor, sparse: bool, q_len: int, kv_len: int) -> None:
        self.state.records[self.name] = CallRecord(self.state.step, density.float().cpu(), sparse, q_len, kv_len)

    def attend(self, module, q, k, v, opts, *, windowed: bool, backend: str, dense):
        """out [B, Hq, Sq, Dv] for one call: the pattern where it applies, else ``dense(q, k, v, **opts)``."""
        Sq, Skv = q.shape[2], k.shape[2]
        if not self.applies(Sq, Skv, windowed):
            out = dense(q, k, v, **opts)
            self.record(structure_density(Sq, Skv, self.pattern.block, opts["causal"], opts["window"], k.shape[1]),
                        False, Sq, Skv)
            return out
        reason = _refusal(opts)
        if reason is not None:
            raise self.refuse(module, reason)
        reason = self.pattern.unsupported_reason(causal=opts["causal"])
        if reason is not None:
            raise ValueError(f"sparse pattern {self.pattern.name} cannot apply to {type(module).__name__} "
                             f"({self.name}): {reason}. Choose another pattern for this model.")
        out, frac = sparse_attention(q, k, v, self.pattern, scale=opts["scale"], causal=opts["causal"],
                                     key_padding_mask=opts["key_padding_mask"], cu_seqlens_q=opts["cu_seqlens_q"],
                                     cu_seqlens_k=opts["cu_seqlens_k"], backend=backend, dense=dense)
        self.record(frac, True, Sq, Skv)
        if self.state.errors is not None:  # shadow mode: measure against dense, hand dense on
            exact = dense(q, k, v, **opts)
            err = (out.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30)
            self.state.errors.setdefault(self.name, []).append(float(err))
            return exact
        return out


def sparse_layer(module) -> SparseLayer | None:
    """The SparseLayer ``hfa.patch(model, sparse=...)`` attached to ``module``, or None."""
    return module.__dict__.get(_LAYER_ATTR)


# ----------------------------------------------------------------------------------------------
# the model's view
# ----------------------------------------------------------------------------------------------

def attach(model, pattern: SparsePattern) -> None:
    """Give every module of ``model`` the pattern (replacing any earlier one); records start empty."""
    if not isinstance(pattern, SparsePattern):
        raise TypeError(f"sparse= takes a pattern from hfa.sparse (streaming, longformer, dilated, vertical_slash, "
                        f"top_p, lsh, full), got {type(pattern).__name__}")
    detach(model)
    state = SparseState(pattern)
    state.hook = model.register_forward_pre_hook(state.new_forward)
    model.__dict__[_STATE_ATTR] = state
    for name, m in model.named_modules():
        m.__dict__[_LAYER_ATTR] = SparseLayer(state, name or type(m).__name__)


def detach(model) -> None:
    """Remove the pattern (the model's attention is dense again); a model without one is left as it is."""
    state = model.__dict__.pop(_STATE_ATTR, None)
    if state is not None and state.hook is not None:
        state.hook.remove()
    for m in model.modules():
        m.__dict__.pop(_LAYER_ATTR, None)


def _state(model) -> SparseState | None:
    return model.__dict__.get(_STATE_ATTR)


def pattern_of(model) -> SparsePattern | None:
    """The pattern ``hfa.patch(model, sparse=...)`` applied, or None (dense)."""
    state = _state(model)
    return None if state is None else state.pattern


def is_sparse(model) -> bool:
    """True when the model's attention is an approximation: a sparse pattern other than the exact ``full`` control
    is applied. Reports say "approximate" (and the pattern's name, ``pattern_of(model).name``) when it is."""
    pattern = pattern_of(model)
    return pattern is not None and pattern.approximate


def density(model, per: str | None = None):
    """The fraction of the allowed (causal) blocks computed in the last forward pass.

    per=None: the mean over layers and KV heads (a float); "layer": {layer name: float}; "head": {layer name:
    tensor [Hkv]}. Dense calls count every allowed block (1.0), a sliding-window layer the blocks its window
    crosses; a decode step's density is that step's. Raises ValueError when the model has no pattern, or when no
    attention call has run through it yet."""
    if per not in (None, "layer", "head"):
        raise ValueError(f"per must be None, 'layer' or 'head', got {per!r}")
    state = _state(model)
    if state is None:
        raise ValueError("this model has no sparse pattern: hfa.patch(model, sparse=hfa.sparse.streaming(...)) first")
    last = [(name, r) for name, r in state.records.items() if r.step == state.step]
    if not last:
        raise ValueError(f"no attention call has run through {state.pattern.name} yet: run a forward pass first")
    if per == "head":
        return {name: r.density.clone() for name, r in last}
    if per == "layer":
        return {name: float(r.density.mean()) for name, r in last}
    return float(torch.stack([r.density.mean() for _, r in last]).mean())


@torch.no_grad()
def layer_errors(model, input_ids, attention_mask=None) -> dict[str, float]:
    """Each layer's output error under the pattern, on the exact model's own inputs: {layer name: relative error}.

    One forward pass in which every call the pattern runs computes both the pattern and dense attention from the
    same q/k/v, records ``||sparse - dense|| / ||dense||`` (Frobenius, fp32, over the batch) and hands the dense
    output on, so layer ``l``'s error is its own, not the sum of the errors before it. Layers the pattern does not
    run (sliding-window layers) are absent. ``density(model)`` afterwards reads this pass. Raises ValueError when the
    model has no pattern or the pattern ran on no layer."""
    state = _state(model)
    if state is None:
        raise ValueError("this model has no sparse pattern: hfa.patch(model, sparse=hfa.sparse.top_p(...)) first")
    state.errors = {}
    try:
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
        model(input_ids=input_ids, use_cache=False, **kwargs)
        errors = {name: sum(v) / len(v) for name, v in state.errors.items()}
    finally:
        state.errors = None
    if not errors:
        raise ValueError(f"{state.pattern.name} ran on no layer of this call (decode-only input, or every layer keeps "
                         f"its own sliding window): give a prefill of full-attention layers")
    return errors
