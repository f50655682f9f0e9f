"""The family sweep: is the one-line patch exact on every causal-LM family of the installed transformers?

For each model type in ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this builds a tiny random model from the
family's own config class (a few layers, small widths, a sliding window short enough to cut), then
compares ``eager`` with ``hfa.patch(model)`` on one full row and one left-padded row (fp32 logits) and
checks that greedy cached generation is identical. Each family ends in one of these states:

* ``exact``        patched == eager (logits <= tolerance, same greedy tokens);
* ``refused``      ``hfa.patch`` refused the model with a reason (never silently wrong);
* ``not dispatching``  the modeling code does not call attention through the registry (patch refuses it too);
* ``skipped``      no tiny model could be built or run under eager itself (the reason says why);
* ``DIFFERENT`` / ``CRASH``  a bug: the patched model differs from eager, or crashes where eager runs.

Run ``python -m hf_efficient_attn.eval.families`` (``--only llama,mistral`` for a few, ``--json PATH``)
to print the table; the test suite runs the same sweep and fails on any DIFFERENT or CRASH.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import time
import traceback
import warnings
from dataclasses import asdict, dataclass

import torch

TOLERANCE = 1e-4
SEQ_LEN = 20
WINDOW = 8  # sliding windows shorter than SEQ_LEN, so they really cut
NEW_TOKENS = 6
LEFT_PAD = 7
MAX_PARAMS = 20_000_000

# Config fields set when the family's config takes them: small everything, a window that cuts.
_SMALL = dict(
    num_hidden_layers=2, num_layers=2, n_layer=2, hidden_size=64, d_model=64, n_embd=64,
    intermediate_size=96, ffn_hidden_size=96, n_inner=96,
    num_attention_heads=4, n_head=4, num_heads=4, n_heads=4, n_layers=2, emb_dim=64,
    hidden_size_per_layer_input=16, vocab_size_per_layer_input=256, expert_ffn_hidden_size=32, num_key_value_heads=2, num_kv_heads=2, head_dim=16,
    vocab_size=256, max_position_embeddings=256, n_positions=256,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_topk=2,
    moe_intermediate_size=32, shared_expert_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
    n_group=2, topk_group=1, num_expert_group=2,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
    sliding_window=WINDOW, attention_chunk_size=WINDOW, rotary_dim=8,
    encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=96, decoder_ffn_dim=96, image_size=32, patch_size=8, vision_hidden_size=64,
    swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16, sliding_window_size=WINDOW,
    unpadded_vocab_size=256, attn_layer_indices=[1], attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    attention_dropout=0.0, hidden_dropout=0.0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0, use_cache=True,
)


@dataclass
class FamilyResult:
    model_type: str
    model_class: str
    status: str  # exact | refused | not dispatching | skipped | DIFFERENT | CRASH
    max_diff: float | None = None
    greedy_identical: bool | None = None
    reason: str = ""
    fallbacks: str = ""  # what the patched model logged (e.g. an unknown kwarg run on the layer's eager function)
    seconds: float = 0.0


def causal_lm_families() -> dict[str, str]:
    """model_type -> causal-LM class name, for every family the installed transformers maps."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _init_params(cls) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


def _small_kwargs(config_cls, depth=0) -> dict:
    """Keyword arguments that make ``config_cls`` tiny: every small field it takes, sub-configs too."""
    names = _init_params(config_cls) | set(getattr(config_cls, "__annotations__", {}))
    kw = {k: v for k, v in _SMALL.items() if k in names}
    default = None
    for key, sub_cls in (getattr(config_cls, "sub_configs", None) or {}).items():
        if sub_cls.__name__ == "AutoConfig":  # the family's default names the concrete class
            with contextlib.suppress(Exception):
                default = default or config_cls()
                sub_cls = type(getattr(default, key))
        if depth < 2 and isinstance(sub_cls, type) and sub_cls.__name__ != "AutoConfig":
            with contextlib.suppress(Exception):  # a sub-config that will not shrink keeps its defaults
                kw[key] = sub_cls(**_small_kwargs(sub_cls, depth + 1))
    return kw


def _few_layer_patterns(config_cls, names, n_layers: int) -> dict:
    """The family's per-layer patterns (``layer_types``, ``layers_block_type``, ...: list fields as long as the
    default depth) cut to a few layers that still hold one of each kind, so a hybrid keeps its attention layers."""
    try:
        default = config_cls()
    except Exception:
        return {}
    depth = getattr(default, "num_hidden_layers", None)
    lists = {k: v for k, v in vars(default).items()
             if k in names and isinstance(v, (list, tuple)) and depth and len(v) == depth
             and all(isinstance(x, (str, int, bool)) for x in v)}
    if not lists:
        return {}
    kinds = {k: list(dict.fromkeys(v)) for k, v in lists.items()}
    n = max(n_layers, *(len(x) for x in kinds.values()))
    out = {k: [ks[i % len(ks)] for i in range(n)] for k, ks in kinds.items()}
    out["num_hidden_layers"] = n
    return out


def tiny_config(model_type: str, config_cls=None):
    """A tiny config of ``model_type`` (its own config class with small fields), or raise why not."""
    from transformers import CONFIG_MAPPING
    config_cls = config_cls or CONFIG_MAPPING[model_type]
    kw = _small_kwargs(config_cls)
    names = _init_params(config_cls) | set(getattr(config_cls, "__annotations__", {}))
    if "num_hidden_layers" in kw:
        kw.update(_few_layer_patterns(config_cls, names, kw["num_hidden_layers"]))
    if "kv_lora_rank" in kw and "num_attention_heads" in kw:  # MLA: keys come per query head
        kw["num_key_value_heads"] = kw["num_attention_heads"]
        if "head_dim" in kw and "qk_rope_head_dim" in kw:  # there head_dim names the RoPE part
            kw["head_dim"] = kw["qk_rope_head_dim"]
    return config_cls(**kw)


def _text_config(cfg):
    get = getattr(cfg, "get_text_config", None)
    return get() if get is not None else cfg


def _build(model_type: str, class_name: str, seed: int = 0):
    import transformers
    cls = getattr(transformers, class_name)
    cfg = tiny_config(model_type, getattr(cls, "config_class", None))
    cfg._attn_implementation = "eager"
    with torch.device("meta"):  # count first: a config whose fields we could not shrink may be huge
        n = sum(p.numel() for p in cls(cfg).parameters())
    if n > MAX_PARAMS:
        raise ValueError(f"{n / 1e6:.0f}M parameters after shrinking the config (> {MAX_PARAMS / 1e6:.0f}M): "
                         f"fields this sweep does not know stay large")
    torch.manual_seed(seed)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # random init leaves norms at exactly 1 and biases at 0: perturb so bugs show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _vocab(model) -> int:
    emb = model.get_input_embeddings()
    n = getattr(emb, "num_embeddings", None) or getattr(_text_config(model.config), "vocab_size", 256)
    return int(min(n, 256))


def _inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, _vocab(model), (2, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :LEFT_PAD] = 0
    ids[1, :LEFT_PAD] = 0
    return ids, mask


def _logits(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    return out.logits.float()


def _greedy(model, ids):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[:, ids.shape[1]:]


@contextlib.contextmanager
def _quiet():
    """Silence transformers' and our own warnings while a tiny model runs (the table says what matters)."""
    loggers = [logging.getLogger(n) for n in ("transformers", "hf_efficient_attn")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= 240 else text[:237] + "..."


def check_family(model_type: str, class_name: str, backend: str = "auto") -> FamilyResult:
    """Eager vs patched on one family (see the module docstring for the states)."""
    import hf_efficient_attn as hfa
    t0 = time.perf_counter()
    res = FamilyResult(model_type, class_name, "skipped")
    with _quiet():
        try:
            model = _build(model_type, class_name)
        except Exception as e:  # the family's own code cannot build a tiny model: not ours to judge
            res.reason = "no tiny model: " + _short(e)
            return _done(res, t0)
        if not model._can_set_attn_implementation():
            res.status, res.reason = "not dispatching", "modeling code does not call ALL_ATTENTION_FUNCTIONS"
            with contextlib.suppress(Exception):
                hfa.patch(model, backend=backend)
                res.status, res.reason = "CRASH", "patch accepted a model that does not dispatch"
            return _done(res, t0)
        ids, mask = _inputs(model)
        try:
            ref = _logits(model, ids, mask)
            ref_tokens = _greedy(model, ids[:1])
        except Exception as e:
            res.reason = "eager itself fails on the tiny model: " + _short(e)
            return _done(res, t0)
        if not torch.isfinite(ref[0]).all():
            res.reason = "eager logits are not finite on the tiny model"
            return _done(res, t0)
        try:
            hfa.patch(model, backend=backend)
        except (ValueError, TypeError) as e:
            res.status, res.reason = "refused", _short(e)
            return _done(res, t0)
        from ..attention import registry
        before = set(registry._logged_once)
        registry._logged_once.clear()  # so this family's fallbacks are logged (and listed) even if seen before
        try:
            got = _logits(model, ids, mask)
            tokens = _greedy(model, ids[:1])
            res.fallbacks = "; ".join(sorted(m.replace("hf_efficient_attn: ", "") for m in registry._logged_once))
        except Exception as e:
            res.status, res.reason = "CRASH", _short(e) + " | " + traceback.format_exc(limit=-2).replace("\n", " ")[-300:]
            return _done(res, t0)
        finally:
            registry._logged_once.update(before)
        keep = mask.bool()  # padded query rows are undefined in eager too
        diff = (got - ref).abs()[keep]
        res.max_diff = float(diff.max()) if diff.numel() else 0.0
        res.greedy_identical = bool(torch.equal(tokens, ref_tokens))
        finite = bool(torch.isfinite(got[keep]).all())
        if finite and res.max_diff <= TOLERANCE and res.greedy_identical:
            res.status = "exact"
            res.reason = res.fallbacks
        else:
            res.status = "DIFFERENT"
            res.reason = (f"max |logit diff| {res.max_diff:.2e}" + ("" if finite else ", non-finite logits")
                          + ("" if res.greedy_identical else ", greedy tokens differ"))
    return _done(res, t0)


def _done(res, t0):
    res.seconds = round(time.perf_counter() - t0, 2)
    return res


def sweep(only=None, backend: str = "auto", progress=None) -> list[FamilyResult]:
    """Run :func:`check_family` over every causal-LM family (or the ``only`` ones)."""
    families = causal_lm_families()
    if only:
        unknown = sorted(set(only) - set(families))
        if unknown:
            raise ValueError(f"unknown model type(s) {unknown}; known: {', '.join(families)}")
        families = {k: v for k, v in families.items() if k in set(only)}
    out = []
    for i, (model_type, class_name) in enumerate(families.items()):
        r = check_family(model_type, class_name, backend=backend)
        if progress is not None:
            progress(i, len(families), r)
        out.append(r)
    return out


def counts(results) -> dict[str, int]:
    c: dict[str, int] = {}
    for r in results:
        c[r.status] = c.get(r.status, 0) + 1
    return dict(sorted(c.items()))


def format_table(results) -> str:
    import transformers
    rows = [("model type", "class", "status", "max diff", "greedy", "reason")]
    for r in results:
        rows.append((r.model_type, r.model_class, r.status, "" if r.max_diff is None else f"{r.max_diff:.1e}",
                     "" if r.greedy_identical is None else ("same" if r.greedy_identical else "differs"), r.reason))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  ------")
    summary = ", ".join(f"{n} {s}" for s, n in counts(results).items())
    lines.append(f"transformers {transformers.__version__}, torch {torch.__version__}: {len(results)} families: {summary}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hf_efficient_attn.eval.families", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=None, help="comma-separated model types (default: every causal-LM family)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference"])
    p.add_argument("--json", default=None, help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    results = sweep(only, backend=args.backend,
                    progress=lambda i, n, r: print(f"[{i + 1}/{n}] {r.model_type}: {r.status} {r.reason}"[:160],
                                                   flush=True))
    print(format_table(results))
    if args.json:
        from ..conversions.toolkit import atomic_write
        atomic_write(args.json, lambda tmp: tmp.write_text(json.dumps([asdict(r) for r in results], indent=1)))
    return 1 if any(r.status in ("DIFFERENT", "CRASH") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
