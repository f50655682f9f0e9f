"""Perplexity under a stated protocol, so two numbers are comparable only when they should be.

The protocol, exactly:

1. The data (`load_text`) is one token stream: its documents joined by a blank line, tokenized
   without special tokens, piece by piece (a document at a time, very long documents cut after a
   newline), so 100 MB of text never goes through the tokenizer at once. ``max_tokens`` keeps the
   first ``max_tokens`` tokens of the stream.
2. If the tokenizer prepends a BOS token by default (Gemma, Llama 2), every window starts with BOS,
   and ``context_length`` counts it: a window holds ``W = context_length - 1`` stream tokens, and all
   of them are scored. Otherwise (SmolLM2, GPT-2) a window holds ``W = context_length`` stream tokens and
   its first token, having no context, can only be scored when an earlier window provides it.
3. ``stride=None``: disjoint windows ``[0, W), [W, 2W), ...``; each scores every token it can
   (``W`` with BOS, ``W - 1`` without), the last window may be shorter.
   ``stride=s`` (``1 <= s <= W``): the sliding-window protocol of the transformers perplexity guide —
   windows start at ``0, s, 2s, ...`` and each scores only the tokens no earlier window scored (its
   last ``s``; the first window scores all it can), so every token is scored exactly once with up to
   ``W - s`` tokens of context. ``stride=W`` without BOS is identical to ``stride=None``.
4. ``nll`` is the mean negative log-likelihood in nats over the scored tokens (log-softmax in fp32,
   summed in fp64), ``ppl = exp(nll)``.
5. ``bits_per_byte`` is the summed NLL in bits over the UTF-8 bytes of the scored tokens' text (each window's
   scored span decoded as one piece), so models with different tokenizers compare on the same text.

Per-token perplexities of models with different tokenizers are not comparable; compare models that share a
tokenizer (a model and its conversions), or compare bits per byte.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..conversions.toolkit import DOCUMENT_SEPARATOR, accepts_logits_to_keep, tokenizer_adds_bos
from .data import TextData, load_text

logger = logging.getLogger(__name__)

__all__ = ["PerplexityResult", "perplexity", "scored_bytes", "tokenize_stream", "tokenizer_adds_bos", "windows"]

_PIECE_CHARS = 1 << 16          # tokenize at most ~64k characters per call
_LOGITS_BUDGET_BYTES = 1 << 30  # auto batch size: fp32 logits of one batch stay under 1 GiB


@dataclass
class PerplexityResult:
    ppl: float
    nll: float       # mean negative log-likelihood per scored token, nats
    tokens: int      # scored tokens
    protocol: dict = field(default_factory=dict)
    bytes: int | None = None           # UTF-8 bytes of the scored tokens' text
    bits_per_byte: float | None = None  # nll * tokens / ln 2 / bytes: comparable across tokenizers

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        p = self.protocol
        stride = "disjoint" if p.get("stride") is None else f"stride {p['stride']}"
        bpb = "" if self.bits_per_byte is None else f", {self.bits_per_byte:.4f} bits/byte"
        return (f"ppl {self.ppl:.4f} (nll {self.nll:.5f}{bpb}) over {self.tokens} tokens of {p.get('data')}; "
                f"context {p.get('context_length')}, {stride}, {p.get('dtype')}")


# -- tokenization -------------------------------------------------------------------------------------

def _safe_cut(text: str, limit: int) -> int:
    """A cut position in (0, limit] where tokenizing the two sides apart gives the same tokens as the whole.

    Right after a lone newline between two non-space characters ("abc\\n|def"): byte-level BPE
    pre-tokenizers (GPT-2, Llama 3, SmolLM2) split there anyway. Failing that (one giant line), before
    a space that follows a non-space ("abc| def"), which such pre-tokenizers attach to the next word.
    Requires len(text) > limit, so the character after any candidate exists.
    """
    pos = text.rfind("\n", 1, limit)
    while pos > 0:
        if not text[pos - 1].isspace() and not text[pos + 1].isspace():
            return pos + 1
        pos = text.rfind("\n", 1, pos)
    pos = text.rfind(" ", 1, limit + 1)
    while pos > 0:
        if not text[pos - 1].isspace():
            return pos
        pos = text.rfind(" ", 1, pos)
    return limit


def _pieces(documents, limit: int = _PIECE_CHARS):
    """The text `DOCUMENT_SEPARATOR.join(documents)` in pieces of at most `limit` characters, cut only
    at `_safe_cut` points, without ever building the joined text."""
    buf = ""
    for i, doc in enumerate(documents):
        buf = buf + DOCUMENT_SEPARATOR + doc if i else doc
        while len(buf) > 2 * limit:
            cut = _safe_cut(buf, limit)
            yield buf[:cut], cut
            buf = buf[cut:]
    while len(buf) > limit:
        cut = _safe_cut(buf, limit)
        yield buf[:cut], cut
        buf = buf[cut:]
    if buf:
        yield buf, len(buf)


def tokenize_stream(tokenizer, data: TextData, max_tokens: int | None = None, progress: bool = False) -> torch.Tensor:
    """The token stream of `data` (no special tokens), `int64 [N]`, tokenized piece by piece.

    For byte-level BPE tokenizers (SmolLM2, GPT-2, Llama 3) the result equals tokenizing the joined
    text in one call (tested); for SentencePiece ones it can in principle differ at a piece boundary
    (on the bundled eval split Gemma 3's is equal too). Stops once `max_tokens` tokens are collected, so a small budget
    on a large corpus is cheap.
    """
    chunks: list[list[int]] = []
    count = 0
    bar = None
    if progress and data.num_chars > 5_000_000:
        from tqdm.auto import tqdm
        bar = tqdm(total=data.num_chars, unit="char", unit_scale=True, desc="tokenizing")
    for piece, size in _pieces(data.documents, _PIECE_CHARS):
        ids = tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"]
        chunks.append(ids)
        count += len(ids)
        if bar is not None:
            bar.update(size)
        if max_tokens is not None and count >= max_tokens:
            break
    if bar is not None:
        bar.close()
    stream = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    return stream[:max_tokens] if max_tokens is not None else stream


# -- windows ------------------------------------------------------------------------------------------

def windows(num_tokens: int, window: int, stride: int | None, bos: bool) -> list[tuple[int, int, int]]:
    """The evaluation windows over a stream of `num_tokens` tokens, as `(start, end, scored)`.

    The window feeds stream tokens `[start, end)` (after a BOS when `bos`), and scores the last
    `scored` of them. `window` is the number of stream tokens per window (context length minus BOS).
    """
    out = []
    if stride is None:
        for start in range(0, num_tokens, window):
            end = min(start + window, num_tokens)
            scored = (end - start) if bos else (end - start - 1)
            if scored > 0:
                out.append((start, end, scored))
        return out
    prev_end = 0
    for start in range(0, num_tokens, stride):
        end = min(start + window, num_tokens)
        # score what no earlier window scored; without BOS a window's first token has no context, so
        # it is never scored here (only when stride == window, where this equals disjoint windows)
        scored = min(end - prev_end, end - start - (0 if bos else 1))
        if scored > 0:
            out.append((start, end, scored))
        prev_end = end
        if end == num_tokens:
            break
    return out


# -- scoring ------------------------------------------------------------------------------------------

def _model_name(model) -> str:
    return (getattr(model, "name_or_path", None) or getattr(model.config, "name_or_path", None)
            or type(model).__name__)


def _check_options(model, tokenizer, context_length, stride, max_tokens, batch_size) -> tuple[bool, int]:
    """Refuse options the protocol cannot follow; returns (whether each window starts with BOS, W: the stream
    tokens per window)."""
    if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
        raise ValueError(f"context_length must be an integer >= 2, got {context_length!r}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise TypeError(
            f"perplexity needs a causal language model with an LM head; {type(model).__name__} has none "
            "(an encoder or a base model). Load it with AutoModelForCausalLM"
        )
    bos = tokenizer_adds_bos(tokenizer)
    window = context_length - 1 if bos else context_length
    if stride is not None:
        if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"stride must be a positive integer or None (disjoint windows), got {stride!r}")
        if stride > window:
            bos_note = " (a BOS token takes one place in each window)" if bos else ""
            raise ValueError(
                f"stride {stride} is larger than the {window} text tokens a window of context_length "
                f"{context_length} holds{bos_note}: tokens between windows would never be scored. Use "
                f"stride <= {window}, or stride=None for disjoint windows"
            )
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and context_length > max_pos:
        logger.warning("context_length %d exceeds the model's max_position_embeddings %d; positions beyond "
                       "what it was trained on", context_length, max_pos)
    return bos, window


def _check_stream(model, stream: torch.Tensor, text: TextData, max_tokens, bos: bool) -> None:
    needed = 1 if bos else 2
    if stream.numel() < needed:
        raise ValueError(
            f"{text.name} gives {stream.numel()} token(s) (max_tokens={max_tokens}); perplexity needs at least "
            f"{needed} ({'a token after BOS' if bos else 'a token to predict and one before it'}). Give more text"
        )
    vocab = model.get_input_embeddings().num_embeddings
    if int(stream.max()) >= vocab:
        raise ValueError(f"the tokenizer produced id {int(stream.max())}, but the model's embedding has only "
                         f"{vocab} rows: tokenizer and model do not match")


def _batches(wins: list[tuple[int, int, int]], batch_size: int) -> list[list[tuple[int, int, int]]]:
    """Full-length windows batch together; a shorter last window runs on its own (no padding anywhere)."""
    groups: list[list[tuple[int, int, int]]] = []
    for w in wins:
        if groups and len(groups[-1]) < batch_size and (groups[-1][0][1] - groups[-1][0][0]) == (w[1] - w[0]):
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def _score(model, stream: torch.Tensor, groups, bos_id: int | None, progress: bool) -> tuple[float, int]:
    """(sum of the NLL in nats, number of scored tokens) over the windows of `groups`; `bos_id`: prepended to every
    window (None: no BOS)."""
    device = next(model.parameters()).device
    keep_ok = accepts_logits_to_keep(model)
    nll_sum, n_scored = 0.0, 0
    was_training = model.training
    model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(map(len, groups)), unit="window", desc=f"perplexity {_model_name(model)}")
    try:
        with torch.inference_mode():
            for group in groups:
                ids = torch.stack([stream[s:e] for s, e, _ in group])
                if bos_id is not None:
                    ids = torch.cat([torch.full((ids.shape[0], 1), bos_id, dtype=ids.dtype), ids], dim=1)
                ids = ids.to(device)                                  # (B, T)
                most = max(n for _, _, n in group)
                kwargs = {"use_cache": False}
                if keep_ok:
                    kwargs["logits_to_keep"] = most + 1
                logits = model(input_ids=ids, **kwargs).logits        # (B, K, V), K = most+1 or T
                for b, (_, _, n) in enumerate(group):
                    # logits at position t predict token t+1: the last n tokens come from positions [T-n-1, T-1)
                    pred = logits[b, logits.shape[1] - n - 1: logits.shape[1] - 1].float()   # (n, V)
                    target = ids[b, ids.shape[1] - n:]                                       # (n,)
                    nll_sum += F.cross_entropy(pred, target, reduction="sum").double().item()
                    n_scored += n
                if bar is not None:
                    bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return nll_sum, n_scored


def scored_bytes(tokenizer, stream: torch.Tensor, wins: list[tuple[int, int, int]]) -> int:
    """UTF-8 bytes of the text of the scored tokens: each window's scored span ``stream[end - n:end]`` decoded as
    one piece (a byte-level BPE round-trips exactly; a character split across two windows' spans counts once per
    side, at most a few bytes per window)."""
    total = 0
    for _, end, n in wins:
        ids = stream[end - n:end].tolist()
        total += len(tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                     .encode("utf-8"))
    return total


def _protocol(model, tokenizer, text: TextData, stream: torch.Tensor, context_length, stride, max_tokens, bos,
              n_scored: int, n_windows: int) -> dict:
    """Everything needed to tell whether two results were measured the same way."""
    param = next(model.parameters())
    protocol = {
        "data": text.name,
        "data_sha256": text.sha256,
        "data_chars": text.num_chars,
        "model": _model_name(model),
        "tokenizer": f"{getattr(tokenizer, 'name_or_path', '') or ''} ({type(tokenizer).__name__})",
        "context_length": context_length,
        "stride": stride,
        "bos_per_window": bos,
        "max_tokens": max_tokens,
        "stream_tokens": int(stream.numel()),
        "token_stream_sha256": hashlib.sha256(stream.numpy().astype("<i8").tobytes()).hexdigest(),
        "tokens": n_scored,
        "windows": n_windows,
        "dtype": str(param.dtype).removeprefix("torch."),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "device": str(param.device),
        "torch": torch.__version__,
    }
    try:
        import transformers
        protocol["transformers"] = transformers.__version__
    except ImportError:
        pass
    return protocol


def perplexity(model, tokenizer, data=None, context_length: int = 512, stride: int | None = None,
               max_tokens: int | None = None, batch_size: int | None = None, split: str | None = None,
               progress: bool = True) -> PerplexityResult:
    """Perplexity of a causal LM on `data` under the protocol in this module's docstring.

    model: a causal LM returning `.logits [B, T, V]`. data: anything `load_text` accepts (None: the
    bundled held-out split). context_length: tokens the model sees per window, BOS included.
    stride: None for disjoint windows, else the sliding-window step (new tokens scored per window).
    max_tokens: use only the first `max_tokens` tokens of the stream. batch_size: windows per
    forward pass (None: as many as keep one batch's fp32 logits under 1 GiB, at most 16); the result
    does not depend on it beyond float rounding.
    """
    bos, window = _check_options(model, tokenizer, context_length, stride, max_tokens, batch_size)
    text = load_text(data, split=split)
    stream = tokenize_stream(tokenizer, text, max_tokens=max_tokens, progress=progress)
    _check_stream(model, stream, text, max_tokens, bos)

    wins = windows(stream.numel(), window, stride, bos)
    if batch_size is None:
        vocab_out = getattr(model.config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
        batch_size = max(1, min(16, _LOGITS_BUDGET_BYTES // (4 * context_length * vocab_out)))
    nll_sum, n_scored = _score(model, stream, _batches(wins, batch_size), tokenizer.bos_token_id if bos else None,
                               progress)
    nll = nll_sum / n_scored
    if not math.isfinite(nll):
        raise FloatingPointError(f"the model produced a non-finite loss ({nll}) on {text.name}: check its dtype "
                                 f"({next(model.parameters()).dtype}; fp16 overflows easily) and weights")
    protocol = _protocol(model, tokenizer, text, stream, context_length, stride, max_tokens, bos, n_scored, len(wins))
    n_bytes = scored_bytes(tokenizer, stream, wins)
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=n_scored, protocol=protocol, bytes=n_bytes,
                            bits_per_byte=nll_sum / math.log(2) / n_bytes if n_bytes else None)
