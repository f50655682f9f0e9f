"""Healing a converted model by distillation from the original.

    res = distill(student, teacher, texts, tokenizer=tok, max_tokens=200_000, trainable="kv")
    res.model is student      # trained in place (LoRA adapters merged back); res.losses, res.tokens, res.seconds

The same call runs on a CPU, a GPU, or several processes under ``accelerate launch`` (data parallel,
through `accelerate.Accelerator`): each optimizer step takes `batch_size` blocks of `seq_len` tokens
per process, and `max_tokens` is the budget summed over processes, so N processes with batch_size B
take the same steps, on the same blocks, as one process with batch_size N*B. On CPUs, launch several
processes with ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N script.py``
(plain ``--cpu`` starts one process unless MPI is set up).

Stages (`STAGES`, listed below): ``"logits"``: KL(teacher || student) over the vocabulary at every position (at a
temperature), optionally plus the next-token cross-entropy; ``"attention"``: layer-by-layer attention transfer
for the linear-attention students of ``convert(model, "linear")`` and ``convert(model, "mamba2")``
(`linear.attention_transfer_loss`); ``"sparsity"``: the KL plus ``penalty`` x the mean learned reach of an
``adaptive_span`` or ``duo`` student (`span.sparsity_loss`; ``stage_options={"penalty": 0.05}``). A stage's own loss
options go in `stage_options` (checked against its loss's keywords before anything runs). A stage from outside the
package is added with `register_stage`.

What trains (`trainable`; None: `default_trainable` — the selector named after the student's last conversion where
`TRAINABLE` has one, e.g. ``"mla"`` for an MLA model, ``"mamba2"`` for a Mamba-2-form one, else the stage's own
default (``"feature_maps"`` in stage "attention"), else ``"kv"``; `TRAINABLE`, listed below): ``"kv"``
(k/v projections: all that GQA pooling changed), ``"attention"`` (all attention projections), ``"all"``, ``"mla"``
(every attention weight of an MLA model), ``"feature_maps"`` (the feature maps and window mix of linear
attention), ``"mamba2"`` (every parameter of the Mamba-2-form layers: q/k/v/o, norms, decay),
``"adaptive_span"`` / ``"duo"`` (only the spans / gates of a learned-sparsity student), ``"longformer"`` (the
attention projections), ``"lora"`` (LoRA
adapters on every linear layer inside the student's attention modules, whatever the conversion made them: q/k/v/o,
MLA's kv_a_proj/k_rope_proj/kv_b_proj; through peft, merged into the weights at the end), or a callable
``(name, param) -> bool`` (one with a ``for_model(model)`` method is bound to the student first).

Finite checks: teacher and student must have finite weights; every step's loss and gradient norm is checked
before the optimizer applies it, and the first non-finite one stops the run with `NonFiniteError`, leaving the
student with the weights of the last finite step (with LoRA: as it came, the adapters dropped).

Long sequences across processes (ring attention): when the student is patched with ``hfa.patch(student,
backend="ring")`` (under ``torchrun`` / ``accelerate launch``), every process takes the SAME blocks and holds 1/W of
each (zigzag split, `hfa.ring.prepare`); the teacher runs patched the same way for the call; each process's KL
is the mean over its tokens, and the data-parallel gradient mean over processes is then exactly the gradient of
the whole batch's mean. `max_tokens` counts each block once. seq_len must split (a multiple of 2W); the stage is
"logits" with ``ce_weight=0`` (its next-token pairs would cross chunk borders).

Checkpoints: with `checkpoint_dir` and `checkpoint_every`, the trainable weights, optimizer and
scheduler state, step and loss history are written atomically every N steps; calling `distill`
again with the same arguments and the same starting student resumes from the last one and ends in
the same weights as a run that was never interrupted (the data order depends only on `seed`).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..attention import ring as _ring
from ..attention.patch import patched
from ..errors import HFAError, NonFiniteError
from .io import check_finite, token_blocks
from .linear import LINEAR_NEW_MODULES, attention_transfer_loss, check_linear_student
from .mamba2 import MAMBA2_TRAINABLE
from .mla import MLA_TRAINABLE
from .span import SPAN_TRAINABLE, check_sparsity_student, sparsity_loss
from .toolkit import atomic_write, conversion_history, with_provenance

__all__ = ["DistillResult", "DEFAULT_LR", "STAGES", "Stage", "TRAINABLE", "attention_linear_names", "default_trainable",
           "distill",
           "logits_loss", "lr_factor", "register_stage"]

STATE_FILE = "distill_state.pt"


# -- stages: what the student is trained to match ------------------------------------------------------

def logits_loss(student, teacher, input_ids, *, kl_weight: float = 1.0, ce_weight: float = 0.0,
                temperature: float = 1.0):
    """KL(teacher || student) per token (nats, x T^2), plus `ce_weight` x next-token cross-entropy.

    input_ids: (B, T). Returns ``(loss, {"kl": ..., "ce": ...})``."""
    with torch.no_grad():
        t_logits = teacher(input_ids=input_ids, use_cache=False).logits      # (B, T, V)
    s_logits = student(input_ids=input_ids, use_cache=False).logits          # (B, T, V)
    assert s_logits.shape == t_logits.shape, f"student {tuple(s_logits.shape)} != teacher {tuple(t_logits.shape)}"
    t_logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits.float() / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean() * temperature ** 2
    loss, metrics = kl_weight * kl, {"kl": kl.detach()}
    if ce_weight:
        ce = F.cross_entropy(s_logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten())
        loss, metrics["ce"] = loss + ce_weight * ce, ce.detach()
    return loss, metrics


@dataclass(frozen=True)
class Stage:
    """A distillation objective. ``loss(student, teacher, input_ids, **loss_options) -> (loss, metrics)``;
    ``check(student)`` raises ValueError when the stage cannot train that student (None: any model)."""

    name: str
    loss: Callable
    description: str
    check: Callable | None = None
    default_trainable: str = "kv"


STAGES: dict[str, Stage] = {
    "logits": Stage("logits", logits_loss, "KL to the teacher's next-token distribution (+ optional CE)"),
    "attention": Stage("attention", attention_transfer_loss,
                       "per-layer attention-output MSE to the teacher, each layer on the teacher's own inputs",
                       check=check_linear_student, default_trainable="feature_maps"),
    "sparsity": Stage("sparsity", sparsity_loss,
                      "KL to the teacher + penalty x the mean learned reach (adaptive span's spans, duo's gates)",
                      check=check_sparsity_student, default_trainable="adaptive_span"),
}


def register_stage(stage: Stage) -> None:
    """Make `stage` available as ``distill(..., stage=stage.name)`` (for stages defined outside the package)."""
    STAGES[stage.name] = stage


def _stage(name: str, student) -> Stage:
    if name not in STAGES:
        raise HFAError(f"unknown stage {name!r}; the stages are: {', '.join(STAGES)}")
    stage = STAGES[name]
    if stage.check is not None:
        stage.check(student)
    return stage


# -- what trains ---------------------------------------------------------------------------------------

def _modules_named(*names):
    return lambda name, p: any(part in names for part in name.split("."))


TRAINABLE: dict[str, Callable] = {
    "kv": _modules_named("k_proj", "v_proj", "qkv_proj"),      # qkv_proj (Phi3) trains its q rows too
    "attention": _modules_named("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_norm", "k_norm"),
    "all": lambda name, p: True,
    "mla": MLA_TRAINABLE,                                       # `hfa convert --method mla`'s default
    "feature_maps": _modules_named(*LINEAR_NEW_MODULES),       # stage "attention"'s default for linear attention
    "mamba2": MAMBA2_TRAINABLE,                                 # every parameter of the Mamba-2-form layers
    **SPAN_TRAINABLE,                                           # adaptive span's spans / duo's gates only
    # a longformer student: its attention projections learn to do with the window and the global tokens
    "longformer": _modules_named("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_norm", "k_norm"),
}
DEFAULT_LR = {
    "kv": 1e-3, "attention": 1e-4, "all": 3e-5, "lora": 1e-3, "callable": 1e-4,
    # the Gemma 3 recipe's measured setting (5e-4 with a one-step warmup made a short heal worse there)
    "mla": 2e-4,
    # SmolLM2-135M, window 64, 64 steps of 2 x 512 tokens: relative MSE 0.164 at 3e-2 against 0.209 at LoLCATs' 1e-2
    "feature_maps": 3e-2,
    # NOT yet measured (the GQA heal's "kv" setting: pretrained q/k/v/o train with the new decay and norm). A
    # 12-step probe only (SmolLM2-135M, stage "attention", 2 x 256 tokens a step): relative MSE 33.9 -> 6.8 at 1e-3,
    # -> 2.0 at 1e-2
    "mamba2": 1e-3,
    # spans/gates are fractions in [0, 1] that Adam moves by about lr a step: 5e-2 lets a few dozen steps reach any
    # value (the demo's and the recipe's setting; not swept)
    "adaptive_span": 5e-2, "duo": 5e-2,
    "longformer": 1e-4,
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")   # the fallback when no attention module is found


def _is_attention(name: str, module: nn.Module) -> bool:
    return type(module).__name__.endswith("Attention") or name.rsplit(".", 1)[-1] in ("self_attn", "attn", "attention")


def attention_linear_names(model) -> list[str]:
    """Full names of the ``nn.Linear`` layers inside the attention modules of `model`, in model order: the LoRA
    targets of ``trainable="lora"`` (q/k/v/o of softmax and linear attention, MLA's q_proj, kv_a_proj, k_rope_proj,
    kv_b_proj and o_proj, ...). Without a recognisable attention module: the modules named in `LORA_TARGETS`."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if name and _is_attention(name, module):
            for sub, lin in module.named_modules():
                if sub and isinstance(lin, nn.Linear):
                    names[f"{name}.{sub}"] = None
    if not names:
        names = {n: None for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1]
                 in LORA_TARGETS}
    return list(names)


def _bound(select, model):
    """`select` bound to `model` where it needs to see the model (``select.for_model(model)``: e.g. "mamba2" selects
    only the converted layers' q/k/v/o, not those of the layers kept softmax); else `select` itself."""
    bind = getattr(select, "for_model", None)
    return bind(model) if callable(bind) else select


def _select_trainable(student, trainable, lora_rank, lora_alpha, lora_targets):
    """Set requires_grad for the chosen parameters; returns the model to train (a PeftModel for "lora")."""
    if trainable == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as e:
            raise ImportError("trainable='lora' needs peft: pip install 'peft>=0.12' "
                              "(or pip install 'hf_efficient_attn[train]')") from e
        targets = list(lora_targets or attention_linear_names(student))
        if not targets:
            raise HFAError(f"trainable='lora' found no linear layer inside an attention module of "
                           f"{type(student).__name__}: pass lora_targets=[module names]")
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0)
        return get_peft_model(student, cfg)
    if callable(trainable):
        select = _bound(trainable, student)
    elif trainable in TRAINABLE:
        select = _bound(TRAINABLE[trainable], student)
    else:
        raise HFAError(f"unknown trainable={trainable!r}; use one of {', '.join([*TRAINABLE, 'lora'])} "
                       "or a callable (name, param) -> bool")
    chosen = 0
    for name, p in student.named_parameters():
        p.requires_grad_(bool(select(name, p)))
        chosen += p.requires_grad
    if not chosen:
        raise HFAError(f"trainable={trainable!r} selects no parameter of {type(student).__name__}; "
                       f"use 'all', 'lora' or a callable")
    return student


def default_trainable(student, stage: str = "logits") -> str:
    """What heals when `distill` is given no `trainable`, in any stage: the selector `TRAINABLE` lists under the name
    of the student's latest conversion that it has one for and that selects a parameter (``"mla"``: every attention
    weight of an MLA model, whose k/v projections no longer exist; ``"mamba2"``: every parameter of the Mamba-2-form
    layers); else the stage's own default (stage "attention": ``"feature_maps"``, the feature maps of linear
    attention); else ``"kv"`` (what GQA pooling changed)."""
    inner = getattr(student, "module", student)
    for record in reversed(conversion_history(inner)):
        name = record.get("conversion") if isinstance(record, dict) else None
        if name in TRAINABLE:
            select = _bound(TRAINABLE[name], student)
            if any(select(n, p) for n, p in student.named_parameters()):
                return name
    return STAGES[stage].default_trainable if stage in STAGES else "kv"


def lr_factor(step: int, steps: int, warmup: float) -> float:
    """The learning rate at `step` (0-based) of `steps`, as a fraction of the peak: a linear ramp over the first
    ``ceil(warmup * steps)`` steps (at least one) that starts at 1/(ramp + 1) of the peak, never at the peak
    itself (Adam's first step moves every weight by about lr whatever its gradient: at full lr a short heal
    spikes the loss), then a cosine decay to 10 %."""
    warm = max(1, math.ceil(warmup * steps))
    if step < warm:
        return (step + 1) / (warm + 1)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


# -- data order ----------------------------------------------------------------------------------------

def _block_order(num_blocks: int, needed: int, seed: int) -> torch.Tensor:
    """`needed` block indices: a seeded permutation per epoch, concatenated. Depends only on the arguments."""
    epochs = math.ceil(needed / num_blocks)
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randperm(num_blocks, generator=gen) for _ in range(epochs)])[:needed]


# -- checkpoints ---------------------------------------------------------------------------------------

def _save_state(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))   # a crash leaves the previous checkpoint intact


def _check_fingerprint(saved: dict, now: dict, path: Path) -> None:
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        listed = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise HFAError(f"the checkpoint at {path} is from a different run ({listed}). Pass the same arguments "
                       "to resume, resume=False to start over, or another checkpoint_dir")


# transformers 5.x renames gradient_checkpointing_* to activation_checkpointing_* (the old names warn)
def _is_checkpointing(model) -> bool:
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(getattr(model, "is_activation_checkpointing" if new else "is_gradient_checkpointing", False))


def _set_checkpointing(model, on: bool) -> None:
    if not on:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    elif hasattr(model, "activation_checkpointing_enable"):   # non-reentrant: works with frozen inputs, under DDP
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _stopped(step: int, steps: int, what: str, value: float, lr, lora: bool) -> str:
    kept = ("the student is as it came (the LoRA adapters are dropped)" if lora else
            "the student keeps its weights as they came" if step == 0 else
            f"the student keeps the weights of step {step}, the last finite one")
    hint = ("the teacher's or the student's outputs on this data are not finite (an fp16/bf16 overflow?): check "
            "them, or train in float32" if step == 0 else
            f"lower the learning rate (it peaked at {lr:g}), keep gradient clipping on, or train without bf16")
    return (f"distillation stopped at step {step + 1} of {steps}: the {what} is {value} (not finite), and nothing of "
            f"this step was applied: {kept}. Fix: {hint}")


@dataclass
class DistillResult:
    model: torch.nn.Module
    losses: list[float] = field(default_factory=list)   # per step, mean over processes, since step 0
    tokens: int = 0                                      # tokens trained on, all processes, since step 0
    steps: int = 0
    seconds: float = 0.0                                 # wall time of this call
    resumed_from: int = 0                                # the step this call started at


def _check_pair(student, teacher, stage: str, checkpoint_dir, checkpoint_every) -> Stage:
    """Refuse a student/teacher pair or settings distill cannot train with, before any work; returns the stage."""
    if student is teacher:
        raise HFAError("student and teacher are the same object: distill a converted copy (hfa.convert returns one)")
    stage_obj = _stage(stage, student)
    if student.config.vocab_size != teacher.config.vocab_size:
        raise HFAError(f"student and teacher vocabularies differ ({student.config.vocab_size} vs "
                       f"{teacher.config.vocab_size}): distillation compares their next-token distributions")
    if checkpoint_every is not None and checkpoint_dir is None:
        raise HFAError("checkpoint_every needs checkpoint_dir=<folder>")
    check_finite(teacher, "the teacher", "Distilling from it would train the student toward NaN: reload the teacher")
    check_finite(student, "the student", "Convert it again from a finite model (hfa.convert checks its input)")
    return stage_obj


def _check_stage_options(stage: Stage, options) -> dict:
    """`options` ({} for None) when stage `stage`'s loss takes each of them as a keyword, else an HFAError listing
    what it takes (the KL weights have their own distill arguments)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise HFAError(f"stage_options must be a dict of stage {stage.name!r}'s loss options, got "
                       f"{type(options).__name__}")
    params = inspect.signature(stage.loss).parameters
    own = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
           and n not in ("kl_weight", "ce_weight", "temperature")]
    unknown = [k for k in options if k not in own]
    if unknown:
        raise HFAError(f"stage {stage.name!r} takes no option {', '.join(map(repr, unknown))} in stage_options; it "
                       f"takes: {', '.join(own) or 'none'} (kl_weight, ce_weight and temperature are distill's own "
                       "arguments)")
    return dict(options)


def _ring_settings(student, stage: str, seq_len: int, ce_weight: float):
    """The student's ring settings when it is patched with backend="ring" (sequence parallel), else None."""
    from ..attention.registry import IMPL_NAMES
    if student.config._attn_implementation != IMPL_NAMES["ring"]:
        return None
    ring = _ring.settings(student)
    world, _ = _ring.group_info(ring.group)
    if stage != "logits":
        raise HFAError(f"stage={stage!r} does not run with ring attention; use stage='logits'")
    if ce_weight:
        raise HFAError("ce_weight > 0 does not run with ring attention (next-token pairs cross the chunks of the "
                       "split); use the KL alone (ce_weight=0)")
    parts = 2 * world if ring.layout == "zigzag" else world
    if seq_len % parts:
        raise HFAError(f"seq_len={seq_len} does not split over {world} ring processes ({ring.layout}: a multiple "
                       f"of {parts}); pick seq_len={seq_len + (-seq_len % parts)}")
    return ring


class _RingInputs(nn.Module):
    """The stage sees a model; this one feeds it the rank's share of each block with the matching positions."""

    def __init__(self, model, ring):
        super().__init__()
        self.model, self.ring = model, ring

    def forward(self, input_ids, **kwargs):
        batch = _ring.prepare(input_ids, group=self.ring.group, layout=self.ring.layout)
        return self.model(**batch, **kwargs)


def _resume(state_path: Path | None, fingerprint: dict, named, optimizer, scheduler) -> tuple[int, list[float]]:
    """(step to start at, losses so far) from the checkpoint at `state_path`, loaded into the trainable weights,
    optimizer and scheduler; (0, []) without one."""
    if state_path is None or not state_path.exists():
        return 0, []
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    _check_fingerprint(state["fingerprint"], fingerprint, state_path)
    with torch.no_grad():
        for n, p in named:
            p.copy_(state["trainable"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], list(state["losses"])


def _optimizer_step(accelerator, loss, params, grad_clip, optimizer, scheduler, stopped: Callable[[str, float], str]):
    """Backward, clip, step: but first the loss (mean over processes) and then the gradient norm must be finite,
    else `NonFiniteError` with ``stopped(what, value)`` and nothing applied. Returns the step's loss."""
    step_loss = accelerator.reduce(loss.detach().float(), "mean").item()     # the same on every process
    if not math.isfinite(step_loss):
        raise NonFiniteError(stopped("loss", step_loss))
    accelerator.backward(loss)
    if grad_clip is not None:
        norm = accelerator.clip_grad_norm_(params, grad_clip)
    else:
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.zeros(())
    if not math.isfinite(float(norm)):
        raise NonFiniteError(stopped("gradient norm", float(norm)))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _hand_back(student, model, finished: bool, stop_checkpointing: bool, flags: dict, was_training: bool) -> None:
    """The student as it came, trained if `finished`: LoRA merged into it (or dropped if interrupted),
    requires_grad, activation checkpointing and training mode restored."""
    if model is not student:                                               # the PeftModel of "lora"
        model = model.merge_and_unload() if finished else model.unload()
        assert model is student, "peft returned a different module than the student it wrapped"
    if stop_checkpointing:
        _set_checkpointing(student, False)
    for n, p in student.named_parameters():
        p.requires_grad_(flags.get(n, True))
    student.train(was_training)


def distill(student, teacher, data, *, tokenizer=None, stage: str = "logits", max_tokens: int = 100_000,
            seq_len: int = 512, batch_size: int = 4, trainable=None, lr: float | None = None,
            weight_decay: float = 0.0, warmup: float = 0.05, grad_clip: float | None = 1.0,
            kl_weight: float = 1.0, ce_weight: float = 0.0, temperature: float = 1.0,
            stage_options: dict | None = None, lora_rank: int = 8, lora_alpha: int = 16, lora_targets=None,
            bf16: bool | None = None, gradient_checkpointing: bool = False,
            checkpoint_dir=None, checkpoint_every: int | None = None, resume: bool = True,
            seed: int = 0, progress: bool = True, on_step: Callable | None = None) -> DistillResult:
    """Train `student` (in place) to match `teacher` on `data`; returns a `DistillResult`.

    data: text (see `io.text_documents`) with its `tokenizer`, or token ids ``(n, seq_len)``.
    max_tokens: total training tokens over all processes; steps = max_tokens // (seq_len x batch_size x
    processes). lr: peak learning rate (default by `trainable`, `DEFAULT_LR`), linear warmup over the
    first `warmup` fraction of steps, cosine decay to 10%. bf16: autocast to bfloat16 (None: as
    ``accelerate launch --mixed_precision`` says). gradient_checkpointing: recompute activations in
    the backward pass (less memory, more time). on_step(step, metrics): called after every step, on
    every process. The teacher is moved to the accelerator's device and used in eval mode, never trained.
    """
    from accelerate import Accelerator

    stage_obj = _check_pair(student, teacher, stage, checkpoint_dir, checkpoint_every)
    stage_options = _check_stage_options(stage_obj, stage_options)
    trainable = default_trainable(student, stage) if trainable is None else trainable
    ring = _ring_settings(student, stage, seq_len, ce_weight)
    accelerator = Accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    processes = world
    if ring is not None:  # one batch for all processes, split along the sequence
        ring_world, _ = _ring.group_info(ring.group)
        if ring_world != world:  # gradients would not be summed over the ring: a silently wrong heal
            raise HFAError(
                f"the student runs ring attention over {ring_world} processes but accelerate sees {world}: the "
                f"gradients of each sequence's parts must be combined over exactly the ring's processes. Launch "
                f"with `accelerate launch --num_processes {ring_world} ...` (on CPUs: ACCELERATE_USE_CPU=1 ... "
                f"--multi_gpu), with the ring over all processes (group=None)")
        world, rank = 1, 0
    tokens_per_step = seq_len * batch_size * world
    steps = max_tokens // tokens_per_step
    if steps < 1:
        raise HFAError(f"max_tokens={max_tokens} is less than one step ({seq_len} tokens x batch_size {batch_size} "
                       f"x {world} process(es) = {tokens_per_step}); raise max_tokens or lower seq_len/batch_size")
    blocks = token_blocks(tokenizer, data, seq_len, max_tokens)                # (n, seq_len)
    if blocks.shape[1] != seq_len:
        raise HFAError(f"the token ids have length {blocks.shape[1]}, not seq_len={seq_len}")
    order = _block_order(len(blocks), steps * batch_size * world, seed)
    use_bf16 = accelerator.mixed_precision == "bf16" if bf16 is None else bf16
    autocast = (lambda: torch.autocast(accelerator.device.type, dtype=torch.bfloat16)) if use_bf16 else nullcontext

    # -- what trains, and how; everything changed here is undone in `finally`, even on an interruption
    was_training, was_checkpointing = student.training, _is_checkpointing(student)
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    kind = "callable" if callable(trainable) else trainable
    lr = DEFAULT_LR[kind] if lr is None and kind in DEFAULT_LR else lr
    model, finished, undo = student, False, ExitStack()
    try:
        model = _select_trainable(student, trainable, lora_rank, lora_alpha, lora_targets)
        if gradient_checkpointing:
            _set_checkpointing(model, True)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
        teacher.to(accelerator.device).eval()
        model.train()
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        teacher_in = teacher
        if ring is not None:  # the teacher runs ring attention too, for the call only
            undo.enter_context(patched(teacher, backend="ring", group=ring.group, ring_mode=ring.mode,
                                       ring_layout=ring.layout))
            wrapped, teacher_in = _RingInputs(wrapped, ring), _RingInputs(teacher, ring)

        # -- resume
        fingerprint = {"stage": stage, "max_tokens": max_tokens, "seq_len": seq_len, "batch_size": batch_size,
                       "processes": processes, "trainable": kind, "lr": lr, "seed": seed, "kl_weight": kl_weight,
                       "ce_weight": ce_weight, "temperature": temperature, **stage_options,
                       "parameters": [(n, tuple(p.shape)) for n, p in named],
                       "data": hashlib.sha256(blocks.numpy().tobytes()).hexdigest()}
        state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
        start, losses = _resume(state_path if resume else None, fingerprint, named, optimizer, scheduler)

        # -- train
        loss_options = {"kl_weight": kl_weight, "ce_weight": ce_weight, "temperature": temperature,
                        **stage_options}
        bar = tqdm(total=steps, initial=start, desc=f"distill ({stage})", unit="step",
                   disable=not (progress and accelerator.is_local_main_process))
        t0 = time.perf_counter()
        for step in range(start, steps):
            mine = order[(step * world + rank) * batch_size:(step * world + rank + 1) * batch_size]
            input_ids = blocks[mine].to(accelerator.device)                    # (B, seq_len)
            with autocast():
                loss, metrics = stage_obj.loss(wrapped, teacher_in, input_ids, **loss_options)
            stopped = lambda what, value: _stopped(step, steps, what, value, lr, model is not student)
            losses.append(_optimizer_step(accelerator, loss, params, grad_clip, optimizer, scheduler, stopped))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1
            if state_path is not None and checkpoint_every and (done % checkpoint_every == 0 or done == steps):
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    _save_state(state_path, {"step": done, "fingerprint": fingerprint, "losses": losses,
                                             "trainable": {n: p.detach().cpu() for n, p in named},
                                             "optimizer": optimizer.state_dict(),
                                             "scheduler": scheduler.state_dict()})
                accelerator.wait_for_everyone()
            if on_step is not None:
                on_step(done, {"loss": losses[-1], **{k: float(v) for k, v in metrics.items()}})
        bar.close()
        seconds = time.perf_counter() - t0
        finished = True
    finally:
        undo.close()
        _hand_back(student, model, finished, gradient_checkpointing and not was_checkpointing, flags, was_training)
        accelerator.free_memory()

    with_provenance(student, student, {
        "distill": stage, "tokens": steps * tokens_per_step, "trainable": kind, "lr": lr, "seq_len": seq_len,
        "batch_size": batch_size, "processes": processes, "kl_weight": kl_weight, "ce_weight": ce_weight,
        "temperature": temperature, **stage_options, "bf16": use_bf16, "seed": seed,
        **({"sequence_parallel": f"ring x{processes}"} if ring is not None else {})})
    return DistillResult(student, losses, steps * tokens_per_step, steps, seconds, start)
