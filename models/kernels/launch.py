"""Cheaper Triton launches: reuse the compiled kernel instead of Triton's per-call Python path.

`kernel[grid](...)` binds every argument, derives its specialization (pointer alignment, integer
divisibility), hashes a cache key and looks the compiled kernel up on every call: ~45-70 us of host
time per launch on the H100 host here, against ~9 us for a torch op (benchmarks/profile_gpu.py).
Decode replays CUDA graphs and never pays it, but an eager prefill launches 6-8 Triton kernels
per layer, which made a 1k-token prefill host-bound (docs/kernels.md).

`cached_launch(kernel)` returns a launcher that keys the compiled kernel on a key at least as
fine as Triton's own specialization (every tensor's dtype and 16-byte alignment, every integer's
==0 / ==1 / divisible-by-16 / 32-bit-range properties, all constexprs and launch options), so a
call that Triton would compile differently never reuses the wrong binary. The first call of
each key goes through Triton as usual. Under the Triton interpreter it always does.

Calls look like Triton's: `launch(grid, *runtime_args, num_warps=..., num_stages=..., **constexprs)`,
runtime arguments positional and in signature order, constexprs (which follow them in the
signature) by name.
"""

from __future__ import annotations

from typing import Any

import torch

from models.kernels.availability import INTERPRET


def _spec(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % 16 == 0)
    if isinstance(arg, bool):
        return ("b", arg)
    if isinstance(arg, int):
        return ("i", arg == 0, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31)
    if isinstance(arg, float):
        return ("f",)
    return (type(arg).__name__, arg)


class CachedLaunch:
    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        params = getattr(kernel, "params", None)  # an interpreted kernel has none: it never gets here
        self._constexprs = [p.name for p in params if p.is_constexpr] if params is not None else []
        self._compiled: dict[tuple, Any] = {}

    def __call__(
        self, grid: tuple[int, ...], *args: Any, num_warps: int = 4, num_stages: int = 3, **constexprs: Any
    ) -> None:
        if INTERPRET or not args or not isinstance(args[0], torch.Tensor) or not args[0].is_cuda:
            self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return
        device = args[0].device
        values = [constexprs[name] for name in self._constexprs]
        key = (device.index, tuple(map(_spec, args)), tuple(values), num_warps, num_stages)
        compiled = self._compiled.get(key)
        if compiled is None:
            self._compiled[key] = self.kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
            return
        grid3 = (*grid, 1, 1)[:3]
        compiled[grid3](*args, *values, stream=torch.cuda.current_stream(device).cuda_stream)


def cached_launch(kernel: Any) -> CachedLaunch:
    return CachedLaunch(kernel)
