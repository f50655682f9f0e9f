"""Kernel tests: without a GPU, Triton kernels run in its interpreter on CPU.

TRITON_INTERPRET must be set before the kernel modules are imported (triton.jit decides then whether
it builds GPU or interpreter kernels), so it is set here, at collection, before any test module of
this folder imports them. Run the whole folder alone with TRITON_INTERPRET=1 in the environment when
other test folders import the kernels first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # The interpreter evaluates exp2 of large arguments with numpy, which warns about the (correct) inf.
    config.addinivalue_line("filterwarnings", "ignore:overflow encountered:RuntimeWarning")
