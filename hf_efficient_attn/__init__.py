"""hf_efficient_attn: efficient attention for Hugging Face models, and proof of what it costs.

    import hf_efficient_attn as hfa
    hfa.patch(model)                 # attention on our kernels; hfa.unpatch(model) undoes it
    from_pretrained(..., attn_implementation="hfa")   # also works after this import
"""

from .attention import is_patched, patch, patched, unpatch

__version__ = "0.1.0"

__all__ = ["__version__", "is_patched", "patch", "patched", "unpatch"]
