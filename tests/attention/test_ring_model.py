"""hfa.patch(model, backend="ring") on tiny models, 2 and 3 gloo processes: logits, loss and gradients on a
zigzag-sharded, left-padded batch equal the single-process model's; distributed greedy decoding equals
transformers' generate; positions that do not follow the layout are refused. (W=2 also runs under the oldest
transformers we support: `make test-min-transformers`.)"""

import pytest
import torch

import hf_efficient_attn as hfa
from hf_efficient_attn.kernels.ring import run_distributed

from ..tiny_models import make_model
from . import ring_workers


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_ring_forward_backward_equals_single_process(world):
    families = ["llama", "qwen3", "gemma3"]   # GQA, qk-norm, sliding-window + full layers
    for rank, res in enumerate(run_distributed(ring_workers.forward_backward, world, args=(families, 20))):
        for fam, r in res.items():
            where = f"W={world} rank {rank} {fam}"
            assert r["logits"] <= 1e-4, f"{where}: logits differ by {r['logits']:.2e}"
            assert r["loss"] <= 1e-5, f"{where}: loss differs by {r['loss']:.2e}"
            assert r["grads"] <= 1e-4, f"{where}: parameter gradients differ (rel {r['grads']:.2e})"
            assert r["restored"], where
            assert r["refused"] is not None and "hfa.ring.prepare" in r["refused"], where


def test_ring_generate_equals_single_process_greedy():
    for rank, res in enumerate(run_distributed(ring_workers.greedy, 2, args=(["llama", "qwen3"], 6))):
        for fam, r in res.items():
            assert r["same"], f"rank {rank} {fam}: ring {r['got']} vs single-process {r['ref']}"


def test_patch_ring_outside_a_process_group_names_torchrun():
    model = make_model("llama")
    with pytest.raises(RuntimeError, match="torchrun"):
        hfa.patch(model, backend="ring")
    assert model.config._attn_implementation == "eager"


def test_prepare_needs_a_group_and_unknown_ring_options_fail():
    with pytest.raises(RuntimeError, match="torchrun"):
        hfa.ring.prepare(torch.zeros(1, 8, dtype=torch.long))
    model = make_model("llama")
    with pytest.raises(ValueError, match="ring_mode"):
        hfa.patch(model, backend="ring", ring_mode="tree")
