"""Passkey retrieval: a number hidden at several depths in filler text, read back by greedy decoding.

The protocol (Mohtashami & Jaggi's landmark-attention test, as LongLoRA and the long-context papers run it):

    <intro> <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...> <question>

* **intro**: "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz
  you about the important information there."; **question**: "What is the pass key? The pass key is";
* **filler**: ``"repeat"`` (default) the published sentences "The grass is green. The sky is blue. The sun is yellow.
  Here we go. There and back again." repeated; ``"corpus"`` sentences of the bundled held-out text (harder: the
  needle does not stand out from its surroundings by form);
* **length**: the prompt's token count (BOS included where the tokenizer adds one), exact: filler units are added
  until the next would overflow, then the last filler unit is cut to fill exactly;
* **depth**: the fraction of the filler placed before the needle (0: right after the intro, 1: right before the
  question); the default grid is 0, 0.25, 0.5, 0.75, 1;
* **keys**: 5-digit numbers drawn from ``random.Random(seed)`` in a fixed order, so every model (dense, sparse,
  converted) answers the same prompts;
* **answer**: ``new_tokens`` greedy tokens after one prefill (a KV cache from there on); correct iff the first run
  of digits in the decoded answer equals the key (exact match).

A sparse-patched model runs its pattern on the prefill (where the needle must be found) and dense decode steps;
the result records the pattern's name and the density its prefill ran at, so an approximate row is labelled as
one. A length beyond the model's ``max_position_embeddings`` is run but flagged (``beyond_window``).
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass, field

import torch

from ..attention import sparse as _sparse
from .cost import _cache_kwarg, _output_cache
from .data import load_text
from .perplexity import _model_name

__all__ = ["DEFAULT_DEPTHS", "FILLERS", "PasskeyResult", "build_prompt", "format_passkey", "passkey_keys",
           "passkey_training_ids",
           "passkey_retrieval"]

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.")
QUESTION = " What is the pass key? The pass key is"
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_REPEAT = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
FILLERS = ("repeat", "corpus")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_DIGITS = re.compile(r"\d+")


@dataclass
class PasskeyResult:
    """Passkey accuracy of one model at one prompt length, every trial kept."""

    model: str
    length: int
    accuracy: float                       # correct / trials
    trials: list[dict] = field(default_factory=list)  # depth, key, answer (decoded), correct
    pattern: str | None = None            # the sparse pattern the prefill ran, None: dense
    approximate: bool = False             # a sparse pattern other than the exact control
    density: float | None = None          # mean block density of the prefills (sparse models)
    beyond_window: bool = False           # length > the model's max_position_embeddings
    protocol: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _check(lengths, depths, trials, new_tokens, filler) -> None:
    if filler not in FILLERS:
        raise ValueError(f"filler must be one of {FILLERS}, got {filler!r}")
    if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise ValueError(f"lengths must be positive token counts like (1024, 2048), got {lengths!r}")
    if not depths or any(not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1] like (0, 0.5, 1), got {depths!r}")
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer (prompts per depth), got {trials!r}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be a positive integer, got {new_tokens!r}")


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _bos(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS), found by encoding one word with and without."""
    with_special = tokenizer("a")["input_ids"]
    plain = _ids(tokenizer, "a")
    n = len(with_special) - len(plain)
    return with_special[:n] if n > 0 and with_special[n:] == plain else []


def _filler_units(tokenizer, filler: str) -> list[list[int]]:
    if filler == "repeat":
        return [_ids(tokenizer, _REPEAT)]
    text = " ".join(load_text(None, split="eval").documents)
    sentences = [" " + s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 3 <= len(s.split()) <= 60]
    return [_ids(tokenizer, s) for s in sentences[:4000]]


def build_prompt(tokenizer, length: int, depth: float, key: str, filler: str = "repeat",
                 units: list[list[int]] | None = None) -> list[int]:
    """The prompt's token ids: exactly ``length`` tokens with the needle (holding ``key``) at ``depth`` of the
    filler. Raises ValueError when ``length`` cannot hold the intro, needle and question."""
    head = _bos(tokenizer) + _ids(tokenizer, INTRO)
    needle = _ids(tokenizer, NEEDLE.format(key=key))
    tail = _ids(tokenizer, QUESTION)
    room = length - len(head) - len(needle) - len(tail)
    if room < 0:
        raise ValueError(f"a passkey prompt needs at least {length - room} tokens with this tokenizer; "
                         f"got length={length}")
    units = units if units is not None else _filler_units(tokenizer, filler)
    body: list[int] = []
    i = 0
    while len(body) < room:
        body += units[i % len(units)]
        i += 1
    body = body[:room]
    cut = round(depth * room)
    return head + body[:cut] + needle + body[cut:] + tail


def passkey_keys(lengths, depths, trials: int, seed: int) -> dict[tuple[int, float, int], str]:
    """The key of every prompt, ``{(length, depth, trial): "48213"}``: 5-digit numbers from ``random.Random(seed)``
    drawn in the order length, depth, trial, so the lm-eval task ``hfa_passkey`` asks what this module asks."""
    rng = random.Random(seed)
    return {(n, d, t): str(rng.randint(10000, 99999)) for n in lengths for d in depths for t in range(trials)}


def passkey_training_ids(tokenizer, count: int, length: int, *, seed: int = 1, filler: str = "repeat") -> torch.Tensor:
    """Synthetic retrieval data to train on (DuoAttention's recipe): ``count`` passkey prompts of ``length`` tokens
    each, the answer included (prompt of ``length - len(answer)`` tokens, then " {key}."), needles at uniform random
    depths; (count, length) int64 ids for ``hfa.distill``. Keys come from ``random.Random(seed)``: the default seed
    1 never draws the evaluation's prompts (seed 0) in the same order."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int, got {count!r}")
    rng = random.Random(seed)
    units = _filler_units(tokenizer, filler)
    rows = []
    for _ in range(count):
        key = str(rng.randint(10000, 99999))
        answer = _ids(tokenizer, f" {key}.")
        rows.append(build_prompt(tokenizer, length - len(answer), rng.random(), key, filler, units) + answer)
    return torch.tensor(rows, dtype=torch.long)


@torch.no_grad()
def _answer(model, ids: list[int], new_tokens: int) -> tuple[list[int], float | None]:
    """Greedy tokens after one prefill and cached decode steps; the prefill's density when sparse."""
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    out = model(input_ids=x, use_cache=True)
    dens = _sparse.density(model) if _sparse.pattern_of(model) is not None else None
    name, got = _cache_kwarg(model), []
    past = _output_cache(out)
    nxt = out.logits[:, -1].argmax(-1)
    for step in range(new_tokens):
        got.append(int(nxt))
        if step + 1 == new_tokens:
            break
        out = model(input_ids=nxt[:, None], use_cache=True, **{name: past})
        past, nxt = _output_cache(out), out.logits[:, -1].argmax(-1)
    return got, dens


def passkey_retrieval(model, tokenizer, lengths=(1024, 2048, 4096, 8192), depths=DEFAULT_DEPTHS, trials: int = 1,
                      seed: int = 0, filler: str = "repeat", new_tokens: int = 8, progress: bool = False
                      ) -> list[PasskeyResult]:
    """Passkey accuracy of a causal LM at each prompt length (the protocol in this module's docstring).

    ``len(depths) * trials`` prompts per length, the same keys for every model given the same seed. Returns one
    :class:`PasskeyResult` per length, in order."""
    lengths, depths = tuple(lengths), tuple(depths)
    _check(lengths, depths, trials, new_tokens, filler)
    was_training = model.training
    model.eval()
    keys = passkey_keys(lengths, depths, trials, seed)
    units = _filler_units(tokenizer, filler)
    window = getattr(model.config, "max_position_embeddings", None)
    pattern = _sparse.pattern_of(model)
    results = []
    try:
        for n in lengths:
            t0, rows, dens = time.perf_counter(), [], []
            for d in depths:
                for t in range(trials):
                    key = keys[(n, d, t)]
                    got, dn = _answer(model, build_prompt(tokenizer, n, d, key, filler, units), new_tokens)
                    text = tokenizer.decode(got, skip_special_tokens=True)
                    found = _DIGITS.search(text)
                    rows.append(dict(depth=d, key=key, answer=text, correct=bool(found and found.group() == key)))
                    if dn is not None:
                        dens.append(dn)
                    if progress:
                        mark = "ok" if rows[-1]["correct"] else "miss"
                        print(f"  passkey {n} tokens depth {d:g}: {mark} ({text.strip()[:20]!r})", flush=True)
            results.append(PasskeyResult(
                model=_model_name(model), length=n, accuracy=sum(r["correct"] for r in rows) / len(rows), trials=rows,
                pattern=None if pattern is None else pattern.name, approximate=_sparse.is_sparse(model),
                density=sum(dens) / len(dens) if dens else None, beyond_window=bool(window and n > window),
                protocol=dict(filler=filler, depths=list(depths), trials=trials, seed=seed, new_tokens=new_tokens,
                              protocol="passkey retrieval (landmark-attention prompt), greedy, exact match"),
                seconds=time.perf_counter() - t0))
    finally:
        model.train(was_training)
    return results


def format_passkey(results: list[PasskeyResult]) -> str:
    """A plain-text table: model (pattern), length, accuracy, density."""
    names = [r.model + (f" + {r.pattern}" if r.pattern else "") + (" (approx.)" if r.approximate else "")
             for r in results]
    w = max([5] + [len(n) for n in names])
    lines = [f"{'model':{w}s} {'length':>7s} {'passkey':>8s} {'density':>8s}"]
    for name, r in zip(names, results):
        dens = "" if r.density is None else f"{r.density:.3f}"
        flag = "  beyond the model's window" if r.beyond_window else ""
        lines.append(f"{name:{w}s} {r.length:7d} {r.accuracy:8.0%} {dens:>8s}{flag}")
    return "\n".join(lines)
