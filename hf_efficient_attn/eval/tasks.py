"""Downstream tasks through lm-evaluation-harness, on the model in memory (patched or converted alike).

    from hf_efficient_attn.eval.tasks import run_tasks, format_tasks
    res = run_tasks(model, tok, "hfa_lastword")             # offline: a task built from the bundled corpus
    res.scores      # {"hfa_lastword": {"acc": 0.31, "acc_stderr": 0.033, "perplexity": 41.2, ...}}
    run_tasks(model, tok, ["hellaswag", "lambada_openai"])   # any lm-eval task, where the Hub is reachable

lm-eval's ``HFLM`` wraps the model object itself (never a checkpoint name), so what is scored is exactly what
``hfa.patch``/``hfa.convert`` returned. lm-eval is an optional extra: ``pip install "hf_efficient_attn[tasks]"``.

The bundled tasks need no network: their documents are built in memory from the held-out ``eval`` split of the
bundled corpus (``python-docs``, see `data.py`), so they never share a document with the calibration or train
splits that conversions and healing read.

* ``hfa_lastword`` — last-word prediction, LAMBADA's protocol on our corpus: a prose paragraph of the Python
  documentation (20–80 words, ending in ``word.``) without its last word and full stop is the context; the
  continuation is ``" word"``. ``acc``: the fraction whose whole continuation is the model's greedy choice, token by
  token; ``perplexity``: exp of the mean negative log-likelihood of the continuation (per word, not per token).
  200 paragraphs (a fixed, order-independent sample: the lowest SHA-256 of the text), about 7,300 words.
* ``hfa_passkey`` — passkey retrieval (`passkey.py`'s prompts: same intro, filler, needle, question and keys),
  1,024 tokens, needle at depths 0, 0.25, 0.5, 0.75, 1, two keys per depth; ``hfa_passkey_N`` for N tokens.
  Generation is greedy (8 new tokens); ``exact_match``: the first run of digits of the answer equals the key. The
  prompt is built in the evaluated tokenizer's tokens, then decoded to text for lm-eval, which encodes it again.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import logging
import os
import random
import re
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache, partial

import torch

from ..errors import HFAError, OptionError
from . import passkey as _passkey
from .data import load_text
from .perplexity import _model_name

__all__ = ["BUNDLED_TASKS", "INSTALL_HINT", "TaskResult", "format_tasks", "lastword_docs", "passkey_docs",
           "run_tasks", "task_config", "task_scores", "task_summary"]

INSTALL_HINT = 'pip install "hf_efficient_attn[tasks]"  (lm-evaluation-harness: pip install lm_eval==0.4.13)'

BUNDLED_TASKS = {
    "hfa_lastword": "last-word prediction on held-out Python documentation paragraphs (loglikelihood: acc, "
                    "perplexity), 200 documents",
    "hfa_passkey": "passkey retrieval, 1,024-token prompts, 5 depths x 2 keys (greedy generation: exact_match); "
                   "hfa_passkey_N for N-token prompts",
}
_PASSKEY_NAME = re.compile(r"^hfa_passkey(?:_(\d+))?$")

LASTWORD_DOCS = 200
LASTWORD_WORDS = (20, 80)           # words per paragraph, both ends included
PASSKEY_LENGTH = 1024
PASSKEY_TRIALS = 2
PASSKEY_NEW_TOKENS = 8


# -- hfa_lastword: prose paragraphs of the held-out corpus ---------------------------------------------------

# reST directives whose body is code, a table or markup, not prose
_NON_PROSE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testsetup", "testcleanup",
                         "testoutput", "productionlist", "literalinclude", "highlight", "csv-table", "list-table",
                         "table", "math", "raw", "parsed-literal", "toctree", "index", "only"}
_DIRECTIVE = re.compile(r"^\.\.\s+([\w-]+)::")
_RULE = re.compile(r"^\s*[=\-~^\"'`#*+:_.]{3,}\s*$")              # section underlines, table borders
_LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{2,})\.$", re.S)


def _blocks(document: str):
    """The paragraphs of a reST document: runs of non-blank lines, as lists of lines."""
    block: list[str] = []
    for line in document.splitlines() + [""]:
        if line.strip():
            block.append(line)
        elif block:
            yield block
            block = []


def _prose_paragraphs(document: str):
    """Paragraphs of running text, each joined into one line: no code (literal blocks after ``::``, code
    directives, doctest), no directive lines, comments, headings, tables or hanging-indent lists."""
    skip_deeper_than = None  # the indent of a block whose body (more indented blocks after it) is not prose
    for block in _blocks(document):
        indent = min(len(line) - len(line.lstrip()) for line in block)
        if skip_deeper_than is not None:
            if indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        first, last = block[0].strip(), block[-1].rstrip()
        directive = _DIRECTIVE.match(first)
        if directive or first.startswith(".."):  # a directive, comment, target or footnote: never prose itself
            if not directive or directive.group(1) in _NON_PROSE_DIRECTIVES:
                skip_deeper_than = indent
            continue
        if last.endswith("::"):                    # introduces a literal (code) block
            skip_deeper_than = indent
            continue
        if any(_RULE.match(line) or line.lstrip().startswith((">>>", "|", "+-", "..")) for line in block):
            continue
        if any(len(line) - len(line.lstrip()) != indent for line in block[1:]):
            continue                               # definition lists, option lists, hanging indents
        yield " ".join(line.strip() for line in block)


def _normalized(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=None)
def _lastword_docs(n: int) -> tuple[dict, ...]:
    candidates: dict[str, dict] = {}
    lo, hi = LASTWORD_WORDS
    for document in load_text(None, split="eval").documents:
        for paragraph in _prose_paragraphs(document):
            m = _LAST_WORD.match(paragraph)
            if m and lo <= len(paragraph.split()) <= hi and paragraph not in candidates:
                candidates[paragraph] = dict(context=m.group("context"), target=m.group("word"),
                                             id=hashlib.sha256(paragraph.encode("utf-8")).hexdigest()[:16])
    # the split is by document, and a few paragraphs recur in several documents (queue.rst and asyncio-queue.rst
    # share some): leave out any that a calibration or train document also holds
    elsewhere = _normalized(" ".join(load_text(None, split="calibration").documents
                                     + load_text(None, split="train").documents))
    picked = []
    for paragraph, doc in sorted(candidates.items(), key=lambda kv: kv[1]["id"]):
        if len(picked) == n:
            break
        if _normalized(paragraph) not in elsewhere:
            picked.append(doc)
    return tuple(picked)


def lastword_docs(n: int = LASTWORD_DOCS) -> list[dict]:
    """The documents of ``hfa_lastword``: ``{"context", "target", "id"}``, the ``n`` paragraphs of the held-out
    split with the lowest SHA-256 (so the choice depends on the text only), none of which a calibration or train
    document also holds. ``context + " " + target + "."`` is the paragraph."""
    return [dict(d) for d in _lastword_docs(n)]


# -- hfa_passkey: passkey.py's prompts as text -----------------------------------------------------------------

def passkey_docs(tokenizer, length: int = PASSKEY_LENGTH, depths=_passkey.DEFAULT_DEPTHS,
                 trials: int = PASSKEY_TRIALS, seed: int = 0, filler: str = "repeat") -> list[dict]:
    """The documents of ``hfa_passkey``: ``{"prompt", "key", "depth", "trial"}`` — the prompts and keys
    `passkey.passkey_retrieval` asks with ``lengths=(length,)`` and the same depths, trials, seed and filler,
    decoded to text (special tokens dropped: lm-eval adds the tokenizer's BOS again when it encodes)."""
    depths = tuple(depths)
    _passkey._check((length,), depths, trials, PASSKEY_NEW_TOKENS, filler)
    keys = _passkey.passkey_keys((length,), depths, trials, seed)
    units = _passkey._filler_units(tokenizer, filler)
    docs = []
    for d in depths:
        for t in range(trials):
            ids = _passkey.build_prompt(tokenizer, length, d, keys[(length, d, t)], filler, units)
            docs.append(dict(prompt=tokenizer.decode(ids, skip_special_tokens=True), key=keys[(length, d, t)],
                             depth=float(d), trial=t))
    return docs


# -- lm-eval task configs --------------------------------------------------------------------------------------

def _as_dataset(docs: list[dict], **_metadata):
    """lm-eval's ``custom_dataset`` hook: the split dict it reads (``_metadata`` is the task's metadata)."""
    import datasets

    return {"test": datasets.Dataset.from_list(docs)}


def _docs_sha256(docs: list[dict]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(repr(sorted(d.items())).encode("utf-8"))
    return h.hexdigest()


def task_config(name: str, tokenizer=None) -> dict:
    """The lm-eval task config (an inline dict, as a task YAML would hold) of a bundled task; its documents come
    from the ``custom_dataset`` callable, in memory. ``hfa_passkey*`` needs the tokenizer (prompts are measured in
    its tokens)."""
    if name == "hfa_lastword":
        docs = lastword_docs()
        # the space goes into the continuation, as in lm-eval's LAMBADA: lm-eval appends `target_delimiter` to the
        # context only before a few-shot answer, never before the scored continuation
        return dict(
            task=name, custom_dataset=partial(_as_dataset, docs), output_type="loglikelihood", test_split="test",
            doc_to_text="{{context}}", doc_to_target="{{' ' + target}}", target_delimiter="",
            metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True),
                         dict(metric="perplexity", aggregation="perplexity", higher_is_better=False)],
            metadata=dict(version=1.0, corpus="python-docs:eval", documents=len(docs),
                          docs_sha256=_docs_sha256(docs)))
    m = _PASSKEY_NAME.match(name)
    if m:
        if tokenizer is None:
            raise OptionError(f"the task {name} builds its prompts in the model's tokens: pass tokenizer=...")
        length = int(m.group(1)) if m.group(1) else PASSKEY_LENGTH
        try:
            docs = passkey_docs(tokenizer, length)
        except ValueError as e:
            raise OptionError(f"task {name}: {e}") from e
        return dict(
            task=name, custom_dataset=partial(_as_dataset, docs), output_type="generate_until", test_split="test",
            doc_to_text="{{prompt}}", doc_to_target="{{key}}", target_delimiter="",
            generation_kwargs=dict(until=["\n"], max_gen_toks=PASSKEY_NEW_TOKENS, do_sample=False),
            filter_list=[dict(name="none", filter=[dict(function="regex", regex_pattern=_passkey._DIGITS.pattern),
                                                  dict(function="take_first")])],
            metric_list=[dict(metric="exact_match", aggregation="mean", higher_is_better=True)],
            metadata=dict(version=1.0, length=length, depths=list(_passkey.DEFAULT_DEPTHS), trials=PASSKEY_TRIALS,
                          seed=0, filler="repeat", docs_sha256=_docs_sha256(docs)))
    raise OptionError(f"{name!r} is not a bundled task; the bundled tasks are {', '.join(BUNDLED_TASKS)}")


def _is_bundled(name: str) -> bool:
    return name == "hfa_lastword" or bool(_PASSKEY_NAME.match(name))


# -- running ---------------------------------------------------------------------------------------------------

@dataclass
class TaskResult:
    """lm-eval scores of one model: flat ``scores`` for the report, lm-eval's own result dict in ``lm_eval``."""

    model: str
    scores: dict[str, dict[str, float | None]]     # {task: {"acc": 0.31, "acc_stderr": 0.03, ...}}
    samples: dict[str, int] = field(default_factory=dict)   # documents scored per task
    protocol: dict = field(default_factory=dict)
    lm_eval: dict = field(default_factory=dict)    # results, versions, configs, n-samples (+ samples if logged)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise OptionError(f"downstream tasks (--tasks) run through lm-evaluation-harness, which is not installed "
                          f"({e}); install it with: {INSTALL_HINT}") from e
    return lm_eval, HFLM, TaskManager


def _task_names(tasks) -> list[str]:
    if isinstance(tasks, str):
        tasks = tasks.split(",")
    try:
        names = [t.strip() for t in tasks]
    except TypeError:
        raise OptionError(f"tasks must be a name, 'NAME,NAME' or a list of names, got {tasks!r}") from None
    if not names or any(not isinstance(t, str) or not t for t in names):
        raise OptionError(f"tasks must be non-empty names like 'hfa_lastword' or 'hfa_lastword,hellaswag', "
                          f"got {tasks!r}")
    return list(dict.fromkeys(names))


def _unknown(names: list[str], known: list[str]) -> None:
    if not names:
        return
    hints = []
    for n in names:
        close = difflib.get_close_matches(n, list(BUNDLED_TASKS) + known, n=3)
        hints.append(f"{n!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    raise OptionError(
        f"unknown task {'; '.join(hints)}. The bundled tasks, which run offline, are {', '.join(BUNDLED_TASKS)}; "
        "any lm-eval task name (e.g. lambada_openai, hellaswag; `lm_eval ls tasks` lists them) also works where "
        "the Hugging Face Hub is reachable to download its dataset")


def _checked_tokenizer(tokenizer, generates: bool):
    """The tokenizer lm-eval gets: a copy with a pad token where it has none (lm-eval would otherwise add one to
    the caller's tokenizer, growing its vocabulary past the model's embeddings)."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        if generates:
            raise OptionError("generation tasks (hfa_passkey, ...) stop at the tokenizer's EOS token, and this "
                              "tokenizer has none; set one (tokenizer.eos_token = ...)")
        if getattr(tokenizer, "bos_token_id", None) is None:
            raise OptionError("lm-eval needs a tokenizer with a BOS or an EOS token (it conditions empty contexts "
                              "on it); set one, e.g. tokenizer.eos_token = ...")
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer
    tok = copy.deepcopy(tokenizer)
    tok.pad_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    return tok


def _custom_dataset_notice(record: logging.LogRecord) -> bool:
    """Drop lm-eval's advice on passing --metadata to a custom dataset (ours take no options)."""
    return not (record.getMessage().startswith("hfa_") and "Custom kwargs can be passed" in record.getMessage())


@contextmanager
def _quiet_and_restored():
    """Keep lm-eval's side effects inside the call: it reseeds Python's, numpy's and torch's global generators
    (restored after), bootstraps stderrs in a process pool (run in-process: the pool forks a process holding the
    model), and gives advice that does not apply to our tasks."""
    import numpy as np

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    had_env = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    task_logger = logging.getLogger("lm_eval.api.task")
    task_logger.addFilter(_custom_dataset_notice)
    try:
        yield
    finally:
        task_logger.removeFilter(_custom_dataset_notice)
        if had_env is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = had_env
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def task_scores(lm_eval_results: dict) -> dict[str, dict[str, float | None]]:
    """lm-eval's ``results["results"]`` flattened for a report: ``{task: {metric: value, metric + "_stderr":
    value}}`` — the filter name joins the metric after a slash unless it is ``none`` (``exact_match/strict-match``);
    a stderr lm-eval did not compute (``"N/A"``) is None. Groups appear as tasks do."""
    out: dict[str, dict[str, float | None]] = {}
    for task, row in (lm_eval_results.get("results") or {}).items():
        flat: dict[str, float | None] = {}
        for key, value in row.items():
            if "," not in key:
                continue  # alias, name, sample_len
            metric, filt = key.split(",", 1)
            stderr = metric.endswith("_stderr")
            base = metric.removesuffix("_stderr")
            name = base if filt == "none" else f"{base}/{filt}"
            if stderr:
                name += "_stderr"
            flat[name] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        out[task] = flat
    return out


def run_tasks(model, tokenizer, tasks, *, limit: int | float | None = None, batch_size: int | str = 1,
              num_fewshot: int | None = None, max_length: int | None = None, bootstrap_iters: int = 1000,
              log_samples: bool = False, task_manager=None) -> TaskResult:
    """Score a causal LM on lm-eval tasks: bundled ones (offline) and any lm-eval task name.

    tasks: a name, ``"NAME,NAME"`` or a list of names. limit: documents per task (an int, or a fraction < 1);
    None: all (the bundled tasks are small). batch_size: lm-eval's (an int or ``"auto"``). num_fewshot: None keeps
    each task's default (0 for the bundled ones). max_length: the longest input lm-eval builds (None: the model's
    ``max_position_embeddings``). bootstrap_iters: resamples for stderrs without a closed form (perplexity).
    log_samples: keep lm-eval's per-document records in ``result.lm_eval["samples"]``. task_manager: an
    ``lm_eval.tasks.TaskManager`` to resolve non-bundled names (e.g. with ``include_path=`` your own YAML tasks).

    Raises OptionError for an unknown task name or a missing lm-eval (naming the install command), HFAError when a
    non-bundled task's dataset cannot be downloaded."""
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = _task_names(tasks)
    if model.get_output_embeddings() is None or getattr(model.config, "is_encoder_decoder", False):
        raise OptionError(f"downstream tasks score a causal LM's next-token predictions; {type(model).__name__} "
                          "has no LM head (load it with AutoModelForCausalLM)")
    hub = [n for n in names if not _is_bundled(n)]
    tok = _checked_tokenizer(tokenizer, generates=bool(hub) or any(_PASSKEY_NAME.match(n) for n in names))
    if hub and task_manager is None:
        task_manager = TaskManager()  # indexes lm-eval's ~15k task YAMLs: seconds, so only when needed
    if hub:
        _unknown([n for n in hub if n not in task_manager.all_tasks], task_manager.all_tasks)
    elif task_manager is None:
        task_manager = TaskManager(include_defaults=False)
    specs = [task_config(n, tok) if _is_bundled(n) else n for n in names]

    was_training = model.training
    t0 = time.perf_counter()
    lm_logger = logging.getLogger("lm_eval")
    try:
        with _quiet_and_restored():
            level = lm_logger.level
            lm_logger.setLevel(logging.ERROR)
            try:
                lm = HFLM(pretrained=model, tokenizer=tok, backend="causal", batch_size=batch_size,
                          max_length=max_length)
            finally:
                lm_logger.setLevel(level)
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=specs, task_manager=task_manager, limit=limit,
                                              num_fewshot=num_fewshot, bootstrap_iters=bootstrap_iters,
                                              log_samples=log_samples)
            except ConnectionError as e:  # datasets/huggingface_hub raise it (or a subclass) when offline
                if not hub:
                    raise
                raise HFAError(
                    f"the lm-eval task(s) {', '.join(hub)} download their datasets from the Hugging Face Hub, "
                    f"which could not be reached ({e}). Offline, run the bundled tasks: {', '.join(BUNDLED_TASKS)}"
                ) from e
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    keep = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
            "n-samples") + (("samples",) if log_samples else ())
    raw = {k: out[k] for k in keep if k in out}
    for cfg in raw.get("configs", {}).values():
        if not isinstance(cfg.get("custom_dataset", ""), str):
            cfg["custom_dataset"] = repr(cfg["custom_dataset"])
    n_samples = {t: int(v.get("effective", v.get("original", 0))) for t, v in (out.get("n-samples") or {}).items()}
    protocol = dict(harness=f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}", tasks=names,
                    limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, max_length=lm.max_length,
                    bundled={n: s["metadata"] for n, s in zip(names, specs) if isinstance(s, dict)})
    return TaskResult(model=_model_name(model), scores=task_scores(out), samples=n_samples, protocol=protocol,
                      lm_eval=raw, seconds=seconds)


# -- formatting ------------------------------------------------------------------------------------------------

def _number(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 1e6 else f"{value:.3g}"


def task_summary(scores: dict[str, dict[str, float | None]]) -> str:
    """One line for a report cell: ``hfa_lastword acc 0.310±0.033 perplexity 41.2±6.1; hfa_passkey ...``."""
    parts = []
    for task, row in scores.items():
        metrics = [f"{m} {_number(v)}" + ("" if row.get(m + "_stderr") is None else f"±{_number(row[m + '_stderr'])}")
                   for m, v in row.items() if not m.endswith("_stderr")]
        parts.append(" ".join([task] + metrics))
    return "; ".join(parts)


def format_tasks(results: list[TaskResult]) -> str:
    """A plain-text table: one row per model and task metric, value and stderr (lm-eval's numbers)."""
    rows = [(r.model, task, m, _number(v), _number(row.get(m + "_stderr")), str(r.samples.get(task, "")))
            for r in results for task, row in r.scores.items() for m, v in row.items() if not m.endswith("_stderr")]
    head = ("model", "task", "metric", "value", "stderr", "docs")
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) if rows else len(head[i]) for i in range(6)]
    lines = [" ".join(f"{c:{w}s}" if i < 3 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(head, widths)))]
    lines += [" ".join(f"{c:{w}s}" if i < 3 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines)
