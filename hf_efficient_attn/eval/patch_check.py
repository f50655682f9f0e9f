"""`hfa patch-check`: run a model stock and patched on a fixed text and say whether they agree.

The check a user runs before trusting the patch on their checkpoint: max logit difference on a
fixed passage, whether the greedy continuation is identical token for token, and the time of each.
"""

from __future__ import annotations

import json
import time

import torch

from ..attention import patch, unpatch
from ..conversions.toolkit import atomic_write

FIXED_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable metal type made it "
    "possible to reproduce books quickly and cheaply. Within fifty years, presses had spread to more than "
    "two hundred cities, and the number of books in Europe grew from thousands to millions. Scholars could "
    "now compare identical copies of a text, which changed how knowledge was checked and shared."
)

# fp32 logits of two exact attention implementations differ only by summation order
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.1}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _run(model, enc, new_tokens, is_lm):
    with torch.no_grad():
        out, t_fwd = _timed(lambda: model(**enc))
        logits = out.logits if is_lm else out.last_hidden_state
        gen, t_gen = None, None
        if is_lm and new_tokens > 0:
            pad = model.generation_config.pad_token_id
            if pad is None:
                pad = model.generation_config.eos_token_id
            if isinstance(pad, list):
                pad = pad[0]
            gen, t_gen = _timed(lambda: model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                       do_sample=False, pad_token_id=pad))
            gen = gen[0, enc["input_ids"].shape[1]:]
    return logits.float(), gen, t_fwd, t_gen


def patch_check(model_or_name, backend="auto", reference_impl="sdpa", new_tokens=32, dtype="float32",
                json_path=None, tokenizer=None, text=FIXED_TEXT, device=None) -> dict:
    """Compare ``model`` stock (``reference_impl``) and patched (``backend``) on a fixed text.

    model_or_name: a loaded model (then pass ``tokenizer``) or a name for ``load_model`` (loaded on `device`: None
    is CPU, ``"auto"`` CUDA where available).
    Returns a dict: max_abs_logit_diff, tolerance, greedy_identical, greedy_agree_tokens, times, ok.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    torch_dtype = _DTYPES[dtype]
    if isinstance(model_or_name, str):
        from .models import load_model
        model, tokenizer = load_model(model_or_name, dtype=torch_dtype, attn_implementation=reference_impl,
                                      device=device)
        name = model_or_name
    else:
        model, name = model_or_name, getattr(model_or_name.config, "_name_or_path", type(model_or_name).__name__)
        if tokenizer is None:
            raise ValueError("patch_check(model) needs tokenizer=... when given a model object")
    model.eval()
    is_lm = hasattr(model, "generate") and model.can_generate()
    enc = tokenizer(text, return_tensors="pt").to(next(model.parameters()).device)
    enc.pop("token_type_ids", None) if is_lm else None

    before = model.config._attn_implementation
    if before != reference_impl:
        model.set_attn_implementation(reference_impl)
    ref_logits, ref_gen, ref_t, ref_tg = _run(model, enc, new_tokens, is_lm)
    patch(model, backend=backend)
    try:
        logits, gen, t, tg = _run(model, enc, new_tokens, is_lm)
    finally:
        unpatch(model)
        if before != reference_impl:
            model.set_attn_implementation(before)

    diff = (logits - ref_logits).abs().max().item()
    tol = TOLERANCE[torch_dtype]
    res = {
        "model": name, "backend": backend, "reference_impl": reference_impl, "dtype": dtype,
        "tokens": int(enc["input_ids"].shape[1]), "max_abs_logit_diff": diff, "tolerance": tol,
        "forward_s": {"stock": ref_t, "patched": t},
    }
    ok = diff <= tol and bool(torch.isfinite(logits).all())
    if is_lm and new_tokens > 0:
        same = (gen == ref_gen).int()
        agree = int(same.cumprod(0).sum().item())
        res.update(new_tokens=new_tokens, greedy_identical=agree == len(ref_gen), greedy_agree_tokens=agree,
                   generate_s={"stock": ref_tg, "patched": tg}, continuation=tokenizer.decode(gen))
        ok = ok and res["greedy_identical"]
    res["ok"] = ok
    if json_path:
        atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(res, indent=2)))
    return res


def print_patch_check(res: dict) -> None:
    rows = [
        ("model", res["model"]),
        ("backend vs stock", f"{res['backend']} vs {res['reference_impl']} ({res['dtype']}, {res['tokens']} tokens)"),
        ("max |logit diff|", f"{res['max_abs_logit_diff']:.2e} (tolerance {res['tolerance']:.0e})"),
        ("forward time", f"stock {res['forward_s']['stock']:.3f} s, patched {res['forward_s']['patched']:.3f} s"),
    ]
    if "greedy_identical" in res:
        rows += [
            ("greedy continuation", f"{res['greedy_agree_tokens']}/{res['new_tokens']} tokens identical"),
            ("generate time", f"stock {res['generate_s']['stock']:.2f} s, patched {res['generate_s']['patched']:.2f} s"),
        ]
    rows.append(("result", "OK" if res["ok"] else "MISMATCH"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
