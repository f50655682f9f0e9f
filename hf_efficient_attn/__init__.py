"""hf_efficient_attn: efficient attention for Hugging Face models, and proof of what it costs.

    import hf_efficient_attn as hfa
    hfa.patch(model)                 # attention on our kernels; hfa.unpatch(model) undoes it
    hfa.patch(model, sparse=hfa.sparse.top_p(0.95)); hfa.sparse.density(model)   # training-free sparse prefill
    hfa.patch(model, kv=hfa.kv.streaming(4, 1024))   # a bounded KV cache: StreamingLLM, SnapKV, Quest
    hfa.patch(model, backend="ring"); model(**hfa.ring.prepare(ids))   # under torchrun: a sequence over processes
    from_pretrained(..., attn_implementation="hfa")   # also works after this import
    res = hfa.perplexity(model, tok, data, context_length=512)
    hfa.kv_cache_bytes(model, tokens=1024)
    new = hfa.convert(model, "gqa", num_kv_heads=1, method="aligned", calibration=texts, tokenizer=tok)
    hfa.distill(new, model, texts, tokenizer=tok, max_tokens=100_000); hfa.save(new, "out"); hfa.load("out")

Importing this package registers our attention implementations with transformers. The kernels
alone (``hf_efficient_attn.kernels``) need only torch and triton: without transformers installed,
this package still imports and the transformers-facing names raise an ImportError when used.
"""

__version__ = "0.1.0"

_API = {
    "is_patched": "attention", "patch": "attention", "patched": "attention", "unpatch": "attention",
    "sparse": "attention", "kv": "attention", "ring": "attention",
    "convert": "conversions", "distill": "conversions", "save": "conversions", "load": "conversions",
    "expand_kv_heads": "conversions", "freeze": "conversions",
    "perplexity": "eval", "kv_cache_bytes": "eval", "load_model": "eval", "load_text": "eval",
}
__all__ = ["HFAError", "__version__", "errors", *_API]

from . import errors  # noqa: E402  the user-error types; standard library only
from .errors import HFAError  # noqa: E402

try:
    from .attention import is_patched, kv, patch, patched, ring, sparse, unpatch  # noqa: F401  registers "hfa", "hfa_triton", "hfa_reference"
    from .conversions import convert, distill, expand_kv_heads, freeze, load, save  # noqa: F401  every conversion, listed in CONVERSIONS
    from .eval import kv_cache_bytes, load_model, load_text, perplexity  # noqa: F401
except ModuleNotFoundError as _e:
    if _e.name != "transformers":
        raise
    _MISSING = _e

    def __getattr__(name):
        if name in _API:
            raise ImportError(f"hf_efficient_attn.{name} needs transformers (>=5.17): "
                              f"pip install 'transformers>=5.17'") from _MISSING
        raise AttributeError(f"module 'hf_efficient_attn' has no attribute {name!r}")
