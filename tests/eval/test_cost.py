"""KV-cache bytes from the real cache object (any tensors, shared storage once), speed, parameters."""

import functools
import importlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hf_efficient_attn.eval import cache_tensors, kv_cache_bytes, measure_speed, parameter_count

from .tiny import tiny_bert, tiny_gemma3, tiny_llama

cost_mod = importlib.import_module("hf_efficient_attn.eval.cost")


@pytest.mark.parametrize("dtype,tokens,batch", [(torch.float32, 37, 1), (torch.bfloat16, 64, 1), (torch.float32, 10, 3)])
def test_llama_cache_is_keys_plus_values(dtype, tokens, batch):
    m = tiny_llama(dtype=dtype, layers=3, heads=4, kv_heads=2, head_dim=8)
    per_token = 3 * 2 * 2 * 8 * (4 if dtype == torch.float32 else 2)  # layers * (K, V) * kv heads * head dim * bytes
    assert kv_cache_bytes(m, tokens=tokens, batch_size=batch) == per_token * tokens * batch


def test_gemma3_sliding_layers_stop_growing():
    """Sliding layers hold their window (minus one, as transformers keeps it); full layers every token."""
    window = 6
    m = tiny_gemma3(window=window)
    per_token_layer = 2 * 1 * 16 * 4  # (K, V) * 1 KV head * head_dim 16 * fp32
    for tokens in (4, 20):
        total = kv_cache_bytes(m, tokens=tokens)
        kv = per_token_layer * (tokens + 2 * min(tokens, window - 1))  # 1 full layer + 2 sliding
        # the cache also holds a small tensor per sliding layer (its window size): counted, as every tensor is
        assert kv <= total <= kv + 2 * 8, (tokens, total, kv)
    assert kv_cache_bytes(m, 20) < kv_cache_bytes(m, 4) * 5


class _LatentCache:
    """A stand-in for a converted model's cache: a latent per layer, a recurrent state, a running key sum,
    a shared buffer viewed twice, a tensor referenced twice, and a reference to a module (not counted)."""

    def __init__(self, tokens):
        shared = torch.zeros(10, 8)                      # 320 bytes, viewed by two layers
        state = torch.zeros(2, 4, 4, dtype=torch.float64)  # 256 bytes, referenced twice
        self.layers = [
            SimpleNamespace(latent=torch.zeros(1, tokens, 16), rope_key=torch.zeros(1, tokens, 4), view=shared[:5]),
            SimpleNamespace(state=state, key_sum=torch.zeros(2, 4), view=shared[5:], again=state),
        ]
        self.extra = {"state": state, "names": ["a", "b"], "legacy": ((torch.zeros(3),),)}
        self.module = nn.Linear(100, 100)                # a cache may point at its model: never counted
        self.layers.append(self.layers[0])               # cycles and repeats are visited once

    @staticmethod
    def expected(tokens):
        return 4 * tokens * (16 + 4) + 320 + 256 + 2 * 4 * 4 + 3 * 4


class _LatentModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.config = SimpleNamespace()

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(cache=_LatentCache(input_ids.shape[1]) if use_cache else None,
                               __dataclass_fields__={"cache": None})


def test_any_cache_structure_is_measured():
    assert kv_cache_bytes(_LatentModel(), tokens=11) == _LatentCache.expected(11)
    paths = {p for p, _ in cache_tensors(_LatentCache(3))}
    assert {"layers.0.latent", "layers.1.state", "extra.legacy.0.0"} <= paths
    assert not any(p.startswith("module") for p in paths)


def test_legacy_tuple_cache():
    legacy = tuple((torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)) for _ in range(3))
    assert [p for p, _ in cache_tensors(legacy)][:2] == ["0.0", "0.1"]
    assert len(cache_tensors(legacy)) == 6


def test_encoder_has_no_cache():
    with pytest.raises(ValueError, match="keeps no KV cache"):
        kv_cache_bytes(tiny_bert(), tokens=8)
    with pytest.raises(ValueError, match="positive integer"):
        kv_cache_bytes(tiny_llama(), tokens=0)


def test_measure_speed_points():
    m = tiny_llama()
    m.train()
    points = measure_speed(m, context_lengths=(8, 32), decode_tokens=3, repeats=2)
    assert [p.context for p in points] == [8, 32] and m.training
    for p in points:
        assert p.decode_tokens == 3 and p.prefill_s > 0 and p.decode_s > 0
        assert p.decode_tok_s == pytest.approx(3 / p.decode_s) and p.prefill_tok_s == pytest.approx(p.context / p.prefill_s)
        assert set(p.to_dict()) == {"context", "prefill_s", "prefill_tok_s", "decode_tokens", "decode_s", "decode_tok_s",
                                    "cache_bytes", "repeats", "decode_tok_s_min", "decode_tok_s_max"}
        assert p.repeats == 2 and p.decode_tok_s_min <= p.decode_tok_s <= p.decode_tok_s_max
        assert p.cache_bytes == kv_cache_bytes(m, tokens=p.context)         # the cache right after the prefill
    with pytest.raises(ValueError, match="decode_tokens"):
        measure_speed(m, (8,), decode_tokens=0)
    with pytest.raises(ValueError, match="context_lengths"):
        measure_speed(m, (0,))


def test_measure_speed_decodes_with_the_cache(monkeypatch):
    """Each decode step feeds one token and the cache back: the cache grows by one per step."""
    m = tiny_llama()
    lengths = []
    real_forward = m.forward

    @functools.wraps(real_forward)  # keeps the signature, so the cache keyword is chosen as for the model
    def spy(*a, **k):
        out = real_forward(*a, **k)
        lengths.append((k["input_ids"].shape[1], cost_mod._output_cache(out).get_seq_length()))
        return out

    monkeypatch.setattr(m, "forward", spy)
    measure_speed(m, context_lengths=(10,), decode_tokens=4, warmup=False)
    assert lengths == [(10, 10), (1, 11), (1, 12), (1, 13), (1, 14)]


def test_parameter_count_counts_tied_weights_once():
    untied, tied = tiny_llama(tie=False), tiny_llama(tie=True)
    emb = 260 * 32
    assert parameter_count(untied) - parameter_count(tied) == emb
    assert parameter_count(untied) == sum(p.numel() for p in untied.parameters())
    for p in untied.model.embed_tokens.parameters():
        p.requires_grad_(False)
    assert parameter_count(untied, trainable_only=True) == parameter_count(untied) - emb
