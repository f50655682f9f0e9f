"""A patched model under ``torch.compile(fullgraph=True)``: compiling fails on any graph break, and the stock models
compile whole (transformers' own code does not break the graph here), so passing means no break in our code; the
compiled model gives the logits and gradients of eager."""

import copy

import pytest
import torch

import hf_efficient_attn as hfa
from tests.tiny_models import make_model, outputs
from tests.tolerances import assert_close_rms


# Dynamo (which finds graph breaks) is the same whatever backend; "aot_eager" also traces the graph with fake tensors
# through AOT autograd (functionalization, the custom ops' fake functions and autograd) but skips Inductor's C++
# code generation, which takes tens of seconds per graph on 2 CPU cores. One test runs Inductor for real.
COMPILE = dict(fullgraph=True, backend="aot_eager")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(padded=True):
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0  # left padding: the key-padding path of the mask
    return ids, mask


# llama: GQA + causal + padding (SDPA on CPU); mistral: a sliding window (the mask function transformers builds
# inside the graph is recognised while tracing); gemma2: softcap + window (the blockwise reference)
@pytest.mark.parametrize("family,backend", [pytest.param("llama", "inductor", marks=pytest.mark.slow),  # ~30 s cold
                                            ("llama", "aot_eager"), ("mistral", "aot_eager"), ("gemma2", "aot_eager")])
def test_compiled_patched_model_matches_eager(family, backend):
    model = make_model(family)
    ids, mask = _batch()
    with torch.no_grad():
        ref = outputs(model, input_ids=ids, attention_mask=mask)
        hfa.patch(model)
        patched = outputs(model, input_ids=ids, attention_mask=mask)
        compiled = outputs(torch.compile(model, fullgraph=True, backend=backend), input_ids=ids, attention_mask=mask)
    assert_close_rms(compiled, patched, name="compiled vs patched eager")
    valid = mask.bool()  # stock eager gives padded query rows a uniform softmax; ours gives them 0
    assert_close_rms(compiled[valid], ref[valid], name="compiled vs stock eager")


def test_compiled_training_step_matches_eager():
    model = make_model("llama").train()
    ids, mask = _batch(padded=False)

    def loss_and_grads(m):
        model.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ref_loss, ref_grads = loss_and_grads(model)
    hfa.patch(model)
    loss, grads = loss_and_grads(torch.compile(model, **COMPILE))
    assert_close_rms(loss, ref_loss, name="loss")
    for g, r in zip(grads, ref_grads):
        assert_close_rms(g, r, name="gradient")


def test_compiled_mask_keeps_its_structure():
    """Under compile the mask is a plain tensor carrying its structure; the attention function reads it (the
    kernels get causal + key padding, no S x S mask), and the dense form equals the eager one."""
    from transformers.masking_utils import causal_mask_function

    from hf_efficient_attn.attention.registry import hfa_mask, mask_info
    padding = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    eager = hfa_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=padding)

    def build(padding):
        m = hfa_mask(2, 4, 4, mask_function=causal_mask_function, attention_mask=padding)
        info = mask_info(m)
        return m, info.padding, torch.tensor(info.causal and info.structured and info.window is None)

    dense, kept_padding, structured = torch.compile(build, **COMPILE)(padding)
    assert torch.equal(dense, eager.dense()) and torch.equal(kept_padding, padding) and bool(structured)


@pytest.mark.triton_interpret
def test_compiled_triton_backend_matches_eager():
    """backend="triton" compiled (the kernels as custom ops): a prefill and a decode step with a cache."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model("llama").to(device)
    ids, mask = (t.to(device) for t in _batch())
    hfa.patch(model, backend="triton")
    compiled = torch.compile(model, **COMPILE)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, use_cache=True)
        assert_close_rms(compiled(input_ids=ids, attention_mask=mask).logits, first.logits, name="prefill")
        nxt = first.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        want = model(input_ids=nxt, attention_mask=mask, past_key_values=copy.deepcopy(first.past_key_values))
        got = compiled(input_ids=nxt, attention_mask=mask, past_key_values=copy.deepcopy(first.past_key_values))
    assert_close_rms(got.logits, want.logits, name="decode step")


@pytest.mark.triton_interpret
def test_compiled_sparse_pattern_on_the_triton_backend_matches_eager():
    """A block-sparse pattern on backend="triton" compiles whole: the kernel is one graph node (the layout's visit
    lists go in as tensors), and the result is eager's."""
    from torch._dynamo.testing import CompileCounterWithBackend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = make_model("llama").to(device)
    ids = torch.randint(3, 97, (2, 40), device=device)
    hfa.patch(model, backend="triton", sparse=hfa.sparse.streaming(3, 17, block=16))
    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        want = outputs(model, input_ids=ids)
        got = outputs(torch.compile(model, fullgraph=True, backend=counter), input_ids=ids)
    ops = {str(node.target) for graph in counter.graphs for node in graph.graph.nodes}
    assert any("hfa.block_sparse" in op for op in ops), sorted(ops)
    assert_close_rms(got, want, name="compiled vs eager")
