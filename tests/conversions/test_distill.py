"""Distillation on tiny models: it heals, it trains what it is told, it resumes exactly, it runs on 2 processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_efficient_attn.conversions import convert, distill
from hf_efficient_attn.conversions.distill import _is_checkpointing, logits_loss
from tests.conversions.conftest import TEXTS, char_tokenizer, random_ids
from tests.tiny_models import make_model

SEQ = 16
REPO = Path(__file__).resolve().parents[2]


def pair(family="llama"):
    teacher = make_model(family)
    return convert(teacher, "gqa", num_kv_heads=1, method="mean"), teacher


def train_ids():
    return random_ids(64, SEQ, seed=11)


def held_out_kl(student, teacher):
    with torch.no_grad():
        return logits_loss(student, teacher, random_ids(8, SEQ, seed=99))[1]["kl"].item()


def run_tiny(batch_size=4, steps=6, **kw):
    """6 steps of 4 x 16 tokens (over all processes) on a fresh tiny MQA student; the 2-process worker uses it."""
    student, teacher = pair()
    kw = {"max_tokens": steps * 4 * SEQ, "seq_len": SEQ, "batch_size": batch_size, "lr": 3e-3, "progress": False, **kw}
    return distill(student, teacher, train_ids(), **kw)


def test_distillation_reduces_the_kl_to_the_teacher():
    student, teacher = pair()
    before = held_out_kl(student, teacher)
    res = distill(student, teacher, train_ids(), max_tokens=40 * 4 * SEQ, seq_len=SEQ, batch_size=4, lr=3e-3,
                  progress=False)
    assert res.model is student and res.steps == 40 and res.tokens == 40 * 4 * SEQ
    assert held_out_kl(student, teacher) < 0.7 * before
    assert sum(res.losses[-5:]) < sum(res.losses[:5])
    assert student.hfa_conversions[-1]["distill"] == "logits" and not student.training


def test_text_data_and_cross_entropy():
    student, teacher = pair()
    res = distill(student, teacher, TEXTS, tokenizer=char_tokenizer(), max_tokens=4 * 2 * 32, seq_len=32,
                  batch_size=2, ce_weight=0.5, progress=False)
    assert res.steps == 4 and all(torch.isfinite(torch.tensor(res.losses)))


@pytest.mark.parametrize("trainable", ["kv", "attention", "all", "lora", "callable"])
def test_only_the_chosen_parameters_change(trainable):
    student, teacher = pair("qwen2")
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    choice = (lambda name, p: "mlp.down_proj" in name) if trainable == "callable" else trainable
    distill(student, teacher, train_ids(), max_tokens=3 * 4 * SEQ, seq_len=SEQ, trainable=choice, lr=1e-2,
            progress=False)
    after = dict(student.named_parameters())
    assert sorted(after) == sorted(before), "parameters were added or removed (LoRA not merged?)"
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expect = {
        "kv": lambda n: ".k_proj." in n or ".v_proj." in n,
        "attention": lambda n: ".self_attn." in n,
        "all": lambda n: True,
        "lora": lambda n: any(f".{m}.weight" in n for m in ("q_proj", "k_proj", "v_proj", "o_proj")),
        "callable": lambda n: "mlp.down_proj" in n,
    }[trainable]
    assert changed and all(expect(n) for n in changed), sorted(changed)
    if trainable in ("kv", "lora"):
        assert changed == {n for n in before if expect(n)}
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags, "requires_grad not restored"


def test_resume_continues_exactly(tmp_path):
    uninterrupted = run_tiny()

    def crash(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    student, teacher = pair()
    kw = {"max_tokens": 6 * 4 * SEQ, "seq_len": SEQ, "batch_size": 4, "lr": 3e-3, "progress": False,
          "checkpoint_dir": tmp_path, "checkpoint_every": 2}
    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, train_ids(), on_step=crash, **kw)
    assert all(p.requires_grad for p in student.parameters()), "requires_grad not restored after the interruption"
    resumed = distill(student, teacher, train_ids(), **kw)            # the interrupted student, as is
    assert resumed.resumed_from == 2
    assert resumed.losses == uninterrupted.losses
    for (n, a), b in zip(uninterrupted.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="different run .*lr: checkpoint 0.003, now 0.001"):
        distill(*pair(), train_ids(), **{**kw, "lr": 1e-3})


def test_lora_resume_after_interruption(tmp_path):
    kw = {"max_tokens": 4 * 4 * SEQ, "seq_len": SEQ, "lr": 1e-2, "progress": False, "trainable": "lora",
          "checkpoint_dir": tmp_path, "checkpoint_every": 1}
    reference = distill(*pair(), train_ids(), **{**kw, "checkpoint_dir": tmp_path / "ref"})
    student, teacher = pair()
    original = {n: p.detach().clone() for n, p in student.named_parameters()}

    def crash(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(student, teacher, train_ids(), on_step=crash, **kw)
    assert all(torch.equal(p, original[n]) for n, p in student.named_parameters()), "adapters left in the student"
    resumed = distill(student, teacher, train_ids(), **kw)
    assert resumed.resumed_from == 2 and resumed.losses == reference.losses
    for (n, a), b in zip(reference.model.state_dict().items(), student.state_dict().values()):
        assert torch.equal(a, b), n


def test_bf16_autocast_and_gradient_checkpointing():
    plain = run_tiny(steps=3)
    ckpt = run_tiny(steps=3, gradient_checkpointing=True)
    assert torch.allclose(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-5)
    assert not _is_checkpointing(ckpt.model)
    bf16 = run_tiny(steps=3, bf16=True)
    assert bf16.model.hfa_conversions[-1]["bf16"] is True
    assert next(bf16.model.parameters()).dtype == torch.float32
    assert torch.allclose(torch.tensor(bf16.losses), torch.tensor(plain.losses), rtol=0.1)


def test_errors_name_the_fix():
    student, teacher = pair()
    with pytest.raises(ValueError, match="stage='attention' is layer-by-layer attention transfer.*stage='logits'"):
        distill(student, teacher, train_ids(), stage="attention", seq_len=SEQ)
    with pytest.raises(ValueError, match="unknown stage 'logit'; the stages are: logits"):
        distill(student, teacher, train_ids(), stage="logit", seq_len=SEQ)
    with pytest.raises(ValueError, match="same object"):
        distill(teacher, teacher, train_ids(), seq_len=SEQ)
    with pytest.raises(ValueError, match="less than one step"):
        distill(student, teacher, train_ids(), seq_len=SEQ, max_tokens=10)
    with pytest.raises(ValueError, match="unknown trainable='qk'"):
        distill(student, teacher, train_ids(), seq_len=SEQ, max_tokens=64, trainable="qk")
    with pytest.raises(ValueError, match="selects no parameter"):
        distill(student, teacher, train_ids(), seq_len=SEQ, max_tokens=64, trainable=lambda n, p: False)
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(ValueError, match="length 16, not seq_len=32"):
        distill(student, teacher, train_ids(), seq_len=32, max_tokens=512)


@pytest.mark.slow
def test_two_processes_under_accelerate_launch_match_one_process_with_twice_the_batch(tmp_path):
    out = tmp_path / "two.pt"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "tests" / "conversions" / "distill_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out)
    assert two["processes"] == 2 and two["ranks_agree"] and two["tokens"] == 6 * 4 * SEQ
    one = run_tiny(batch_size=4)                    # the same 6 steps over the same blocks, in one process
    assert torch.allclose(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=1e-4)
    for n, p in one.model.state_dict().items():
        assert torch.allclose(two["weights"][n], p, atol=1e-5, rtol=1e-4), n


def test_the_schedule_never_starts_at_the_peak():
    from hf_efficient_attn.conversions.distill import lr_factor

    for steps in (1, 2, 12, 100, 1000):
        factors = [lr_factor(s, steps, 0.05) for s in range(steps)]
        assert 0 < factors[0] <= 0.5 and max(factors) <= 1.0 and min(factors) > 0, (steps, factors[:3])
    ramp = [lr_factor(s, 100, 0.05) for s in range(8)]
    assert ramp[:5] == sorted(ramp[:5]) and ramp[4] == pytest.approx(5 / 6) and ramp[5] == pytest.approx(1.0)
    assert lr_factor(99, 100, 0.05) == pytest.approx(0.1, abs=2e-3)


@pytest.mark.slow
def test_ring_attention_distill_on_two_processes_matches_one_process():
    """A student patched with backend="ring": both processes train on the same blocks, each on half of every
    sequence, and end where one process training on whole sequences ends."""
    from hf_efficient_attn.kernels.ring import run_distributed
    from tests.conversions.distill_worker import ring_distill

    one = run_tiny(steps=3)
    ranks = run_distributed(ring_distill, 2, args=(3,))
    for r in ranks:
        assert r["tokens"] == one.tokens and r["teacher_restored"]
        assert "accelerate sees 1" in r["refused"] and "ACCELERATE_USE_CPU" in r["refused"]
        assert r["record"]["sequence_parallel"] == "ring x2" and r["record"]["processes"] == 2
        assert torch.allclose(torch.tensor(r["losses"]), torch.tensor(one.losses), rtol=1e-4, atol=1e-7)
        for n, w in one.model.state_dict().items():
            assert torch.allclose(r["weights"][n], w, atol=1e-5, rtol=1e-4), n


def test_ring_distill_refuses_what_it_cannot_split():
    from hf_efficient_attn.conversions.distill import _ring_settings
    student, _ = pair()
    assert _ring_settings(student, "logits", SEQ, 0.0) is None   # not ring-patched: plain data parallel


def test_the_default_trainable_follows_the_conversion():
    """distill() without `trainable` heals what the conversion changed: "mla" on an MLA model (whose k/v projections
    are gone: the stage default "kv" would select nothing), "kv" after GQA, the feature maps in stage "attention"."""
    from hf_efficient_attn.conversions import default_trainable
    teacher = make_model("llama")
    mla = convert(teacher, "mla", kv_lora_rank=8, rope_dim=4, method="weights")
    assert default_trainable(mla) == "mla" and default_trainable(pair()[0]) == "kv" and default_trainable(teacher) == "kv"
    assert default_trainable(convert(teacher, "linear", window=4), "attention") == "feature_maps"
    before = {n: p.detach().clone() for n, p in mla.named_parameters()}
    res = distill(mla, teacher, train_ids(), max_tokens=2 * 4 * SEQ, seq_len=SEQ, batch_size=4, progress=False)
    assert res.steps == 2 and mla.hfa_conversions[-1]["trainable"] == "mla"
    changed = {n for n, p in mla.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("self_attn" in n for n in changed)
