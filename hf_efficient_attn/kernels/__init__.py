"""Layer 0: attention math in torch and Triton only. Never imports transformers."""
