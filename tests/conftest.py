"""Project-wide test conventions: seeding, NaN-poisoned torch.empty for kernel tests, markers, tolerances."""

import os
import random

import pytest
import torch

# Every test starts from the same random state.
@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _poison_empty(request, monkeypatch):
    """Kernel tests: torch.empty / empty_like return NaN-filled floats so unwritten outputs show."""
    if "kernels" not in str(request.node.fspath):
        yield
        return
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (platform limit: none on this machine)"))
        if "triton_interpret" in item.keywords and not (has_gpu or interpret):
            item.add_marker(pytest.mark.skip(reason="Triton needs a CUDA GPU or TRITON_INTERPRET=1"))
