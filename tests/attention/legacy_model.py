"""A toy model whose attention does NOT dispatch through the transformers registry (for the error test)."""

import torch
from torch import nn
from transformers import LlamaConfig, PreTrainedModel


class LegacyAttention(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.qkv = nn.Linear(hidden, 3 * hidden)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v


class LegacyModel(PreTrainedModel):
    config_class = LlamaConfig

    def __init__(self, config):
        super().__init__(config)
        self.attn = LegacyAttention(config.hidden_size)

    def forward(self, x):
        return self.attn(x)
