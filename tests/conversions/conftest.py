"""Shared pieces of the conversion tests: a character tokenizer for the tiny models (vocab 97), text, ids."""

import string

import pytest
import torch


def char_tokenizer(bos: bool = False):
    """A character-level fast tokenizer with ids 0 pad, 1 bos, 2 unk, 3..96 printable characters."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = string.ascii_letters + string.digits + " \n" + string.punctuation[:30]
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", unk_token="<unk>")


TEXTS = [f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7} times; " * 3 for i in range(12)]


@pytest.fixture
def tok():
    return char_tokenizer()


def random_ids(n=4, seq_len=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (n, seq_len), generator=g)


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models are all overhead: one intra-op thread is 5-30x faster than two on a shared 2-core machine
    (threads spin-wait on each other). Slow (real-model) tests keep the default."""
    if "slow" in request.keywords:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
