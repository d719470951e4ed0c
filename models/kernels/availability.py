"""When the Triton kernels run, and when the torch references stand in for them.

A kernel runs on CUDA tensors when triton imports, and on CPU tensors only under the Triton
interpreter. Everywhere else the public functions fall back to torch.
"""

from __future__ import annotations

import os

import torch

try:
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU installs without the `gpu` extra
    HAS_TRITON = False


def _interpreter_active() -> bool:
    """TRITON_INTERPRET=1, and it was set before triton was first imported: triton fixes each
    function's mode when the function is defined, and the interpreter cannot run triton's own
    library functions (tl.zeros, ...) defined in compiled mode."""
    if not HAS_TRITON or os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "on"):
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(tl.zeros, InterpretedFunction)


INTERPRET = _interpreter_active()


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on tensors living where `t` lives."""
    return HAS_TRITON and (t.is_cuda or (INTERPRET and t.device.type == "cpu"))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a nominal H100 count elsewhere (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132
