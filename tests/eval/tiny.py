"""Tiny offline models and tokenizers for the eval tests: built from configs, no downloads, seconds to run."""

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS_ID = 256


def byte_tokenizer(bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0..255), no merges.

    bos=False: no BOS, no EOS, no pad — the "tokenizer without special tokens" case.
    bos=True: prepends <s> (id 256) by default, like Gemma or Llama 2.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    if bos:
        vocab["<s>"] = BOS_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    kwargs = {}
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS_ID)])
        kwargs["bos_token"] = "<s>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.name_or_path = "byte-bos" if bos else "byte"
    return fast


def tiny_llama(seed: int = 0, vocab_size: int = 260, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               head_dim: int = 8, tie: bool = False, dtype=torch.float32, attn: str = "sdpa"):
    """A random Llama whose logits vary strongly from token to token (initializer_range 0.5), so that
    scoring the wrong tokens or the wrong positions changes the perplexity a lot."""
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=heads * head_dim, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=512,
        initializer_range=0.5, tie_word_embeddings=tie, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    model.name_or_path = f"tiny-llama-{seed}"
    return model


def tiny_gemma3(window: int = 6, seed: int = 0):
    """A random Gemma 3 text model: sliding, full, sliding layers; MQA; head_dim 16."""
    cfg = transformers.Gemma3TextConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=window, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=None,
    )
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


TEXT = (
    "Perplexity is the exponential of the average negative log-likelihood of a sequence. "
    "It is only comparable between models evaluated on the same tokens under the same protocol: the "
    "same context length, the same stride, the same data.\n\n"
    "A sliding window with a stride gives every scored token more context than disjoint chunks do, "
    "so it reports a lower perplexity for the same model and text.\n"
)
