"""The model card `save` writes beside a checkpoint (``README.md``, huggingface_hub's `ModelCard`).

    card = model_card(model, "smollm2-mla", eval_table=markdown)    # a huggingface_hub.ModelCard
    card.save(folder / "README.md")

What a person on the Hub needs to trust and use the checkpoint: its base model (also in the card's metadata, so
the Hub links the model tree, when the source is a Hub id), every conversion and heal in order with its options,
the tokens it was healed with, the evaluation table if one was given, and how to load it (``import
hf_efficient_attn`` first: converted attention modules are not in stock transformers, and a native checkpoint
such as GQA says that stock transformers loads it). The card is documentation: `load` does not check it against
the record, so it can be edited on the Hub freely.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..errors import MissingFileError, OptionError
from .toolkit import CONFIG_RECORD_KEY, conversion_history

__all__ = ["eval_markdown", "heal_tokens", "model_card", "needs_our_package"]

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_LONG_VALUE = 60        # characters: an option value longer than this is shortened in the card's table


def needs_our_package(model) -> bool:
    """Whether `model`'s ``model_type`` is one stock transformers does not know (a converted architecture)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return getattr(model.config, "model_type", None) not in CONFIG_MAPPING_NAMES


def heal_tokens(history: list[dict]) -> int:
    """Training tokens of every heal (distillation) in a conversion record, all stages together."""
    return sum(int(r.get("tokens") or 0) for r in history if isinstance(r, dict) and "distill" in r)


def eval_markdown(eval_table) -> str | None:
    """`save`'s ``eval_table`` as Markdown text: None stays None; a string holding a newline is Markdown already
    (e.g. ``hf_efficient_attn.eval.report.to_markdown(reports)``); a one-line string or a path names a Markdown
    file (the ``report.md`` that ``hfa eval`` writes). Raises `OptionError` for another type, `MissingFileError`
    for a file that does not exist."""
    if eval_table is None:
        return None
    if isinstance(eval_table, str) and "\n" in eval_table:
        return eval_table.strip() + "\n"
    if not isinstance(eval_table, (str, os.PathLike)):
        raise OptionError(f"eval_table takes Markdown text or the path of a Markdown file (e.g. the report.md of "
                          f"`hfa eval`), got a {type(eval_table).__name__}; for reports from "
                          "hf_efficient_attn.eval.evaluate_models pass hf_efficient_attn.eval.report.to_markdown(reports)")
    path = Path(eval_table).expanduser()
    if not path.is_file():
        raise MissingFileError(f"eval_table: no file at {path}. Pass Markdown text (a string of several lines, e.g. "
                               "hf_efficient_attn.eval.report.to_markdown(reports)) or the path of a Markdown file "
                               "(the report.md that `hfa eval` writes)")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise OptionError(f"eval_table: {path} is empty; run the evaluation again or leave eval_table out")
    return text + "\n"


def _base_model(model, history: list[dict]) -> str | None:
    sources = [r.get("source") for r in history if isinstance(r, dict) and r.get("source")]
    return (sources[0] if sources else None) or getattr(model, "name_or_path", None) or None


def _links_to_the_hub(name: str | None) -> bool:
    """Whether `name` is a Hub model id ("user/name", not a local folder) the card's metadata can link to."""
    return bool(name) and _HUB_ID.fullmatch(name) is not None and not Path(name).expanduser().exists()


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) > _LONG_VALUE:
        text = text[:_LONG_VALUE - 1] + "…"
    return text.replace("|", "\\|").replace("\n", " ")


def _steps_table(history: list[dict]) -> list[str]:
    rows = ["| step | what | options and measured facts |", "|---:|---|---|"]
    for i, r in enumerate(history, 1):
        if not isinstance(r, dict):
            rows.append(f"| {i} | {_cell(r)} | |")
            continue
        if "distill" in r:
            what, skip = f"heal: distill ({r['distill']})", ("distill",)
        else:
            what, skip = str(r.get("conversion", "?")), ("conversion", "source")
        options = ", ".join(f"{k}={_cell(v)}" for k, v in r.items() if k not in skip)
        rows.append(f"| {i} | {_cell(what)} | {options} |")
    return rows


def _loading(model, name: str) -> list[str]:
    model_type = model.config.model_type
    lines = ["## How to load it", "",
             "```python",
             "import hf_efficient_attn as hfa   # first: it registers the converted attention with transformers",
             "",
             "# this folder, or its Hub id once uploaded",
             f'model = hfa.load("{name}")',
             "",
             "from transformers import AutoTokenizer, pipeline",
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
             'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
             "```", "",
             "`hfa.load` checks every file against the sha256 that `hfa.json` lists (this card excepted) and gives "
             "back the dtype, attention implementation and buffers the model was saved with, so its logits are "
             "bit-identical to the saved model's.", ""]
    if needs_our_package(model):
        lines += [f"This model ({type(model).__name__}, `model_type: {model_type}`) uses attention modules that "
                  "stock transformers does not have. Without the import, `AutoModelForCausalLM.from_pretrained` "
                  f"stops with \"The checkpoint you are trying to load has model type `{model_type}` but "
                  "Transformers does not recognize this architecture ... out of date\": upgrading transformers does "
                  "not help; `pip install hf_efficient_attn` and `import hf_efficient_attn` do "
                  "(`AutoModelForCausalLM.from_pretrained` and `pipeline(\"text-generation\", model=...)` then work "
                  "too).", ""]
    else:
        lines += [f"This is a native `{model_type}` checkpoint ({type(model).__name__}): stock transformers loads "
                  "it too, without hf_efficient_attn (`AutoModelForCausalLM.from_pretrained`).", ""]
    return lines


def model_card(model, name: str, eval_table: str | None = None):
    """The model card of `model` saved as `name` (the folder name, used in the loading example): a
    ``huggingface_hub.ModelCard`` whose metadata names the library, the base model (when its source is a Hub
    id), the pipeline and tags (``hf_efficient_attn`` and each conversion), and whose text gives the base model,
    each conversion and heal with its options, the heal tokens, `eval_table` (Markdown) if given, and how to load
    it."""
    from huggingface_hub import ModelCard, ModelCardData

    history = conversion_history(model)
    base = _base_model(model, history)
    conversions = [r["conversion"] for r in history if isinstance(r, dict) and r.get("conversion")]
    healed = heal_tokens(history)
    can_generate = bool(getattr(model, "can_generate", lambda: False)())
    data = ModelCardData(
        library_name="transformers", base_model=base if _links_to_the_hub(base) else None,
        pipeline_tag="text-generation" if can_generate else None,
        tags=list(dict.fromkeys(["hf_efficient_attn", *conversions, *(["distillation"] if healed else [])])))
    if _links_to_the_hub(base):
        base_text = f"[`{base}`](https://huggingface.co/{base})"
    else:
        base_text = f"`{base}`" if base else "unknown (the model it came from was not loaded from a named checkpoint)"
    made = " → ".join(conversions) if conversions else "no conversion (saved as it was loaded)"
    lines = [f"# {name}", "",
             f"Efficient attention by hf_efficient_attn (`pip install hf_efficient_attn`): {made}.", "",
             f"- **Base model:** {base_text}",
             f"- **Architecture:** {type(model).__name__} (`model_type: {model.config.model_type}`)",
             f"- **Heal tokens:** {healed:,}" + ("" if healed else " (not healed: the conversion alone)"), ""]
    lines += _loading(model, name)
    if history:
        lines += ["## How it was made", "", *_steps_table(history), "",
                  f"The full record is `{CONFIG_RECORD_KEY}` in `config.json` (it travels with `push_to_hub`), and "
                  "`conversions` in `hfa.json`.", ""]
    if eval_table:
        lines += ["## Evaluation", "", eval_table.strip(), ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
