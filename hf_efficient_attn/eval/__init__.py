"""Layer 3: accuracy and cost checks — bundled models, data, perplexity, KV-cache accounting, reports."""

from .models import BUNDLED_MODELS, load_model

__all__ = ["BUNDLED_MODELS", "load_model"]
