"""The one backend-selection rule of every attention module (softmax, MLA, linear, and what comes next).

Every module has a ``backend`` (``hfa.patch(model, backend=...)`` sets the softmax layers' through the
attention registry and every converted module's attribute):

* ``"reference"``: plain PyTorch only (the module's exact reference form);
* ``"triton"``: our Triton kernels, or a ValueError naming why they cannot serve the call — never a silent
  switch to something else;
* ``"auto"``: Triton on CUDA where the kernels serve the call, else the exact PyTorch path; a CUDA fallback is
  logged once per reason.

:func:`use_triton` is that rule; the modules only supply what "can the kernels serve this call" means for them.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ..kernels.triton_utils import triton_unavailable_reason

__all__ = ["BACKENDS", "log_once", "triton_can_run", "use_triton"]

logger = logging.getLogger("hf_efficient_attn")

BACKENDS = ("auto", "triton", "reference")

_logged_once: set[str] = set()


def log_once(message: str) -> None:
    """Log a fallback once per distinct message, not once per layer and call.

    Not while ``torch.compile`` traces: Dynamo cannot trace a logging call (it would break the graph), so a
    compiled model's fallbacks are logged by an eager call of the same model (every fallback is exact)."""
    if torch.compiler.is_compiling():
        return
    if message not in _logged_once:
        _logged_once.add(message)
        logger.warning(message)


def triton_can_run(device) -> str | None:
    """None when Triton kernels can run on tensors of `device`; else the reason (the kernels' own rule)."""
    reason = triton_unavailable_reason(device)
    if reason is None:
        return None
    return (f"{reason}: Triton kernels need a CUDA GPU, or the interpreter (TRITON_INTERPRET=1 set before "
            f"the kernels are imported)")


def check_backend(backend: str, choices: tuple[str, ...] = BACKENDS) -> str:
    """`backend` itself, or a ValueError listing the choices."""
    if backend not in choices:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(choices)}")
    return backend


def use_triton(backend: str, device, why_not: Callable[[], str | None], what: str,
               choices: tuple[str, ...] = BACKENDS) -> bool:
    """Whether this call runs on the Triton kernels (see the module for the rule).

    why_not() -> None when the kernels serve the call, else the reason (called only when it matters; it may import
    triton). what: the call, for messages ("this attention call", "MLA decode in layer 3"). choices: the backends
    the module accepts (a module may add PyTorch forms of its own, which never use Triton)."""
    check_backend(backend, choices)
    if backend == "triton":
        reason = why_not()
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run {what}: {reason}. Use backend='auto' to fall back to an "
                             "exact path, or backend='reference'.")
        return True
    if backend != "auto" or torch.device(device).type != "cuda":
        return False
    reason = why_not()
    if reason is not None:
        log_once(f"hf_efficient_attn: Triton cannot serve {what} ({reason}); using an exact fallback")
        return False
    return True
