"""Which device a service runs on, from a setting: "auto", "cpu", "cuda" or "cuda:N"."""

from __future__ import annotations

import torch


def resolve_device(spec: str) -> torch.device:
    """The torch device for `spec`, made current when it is a GPU.

    "auto" is the current GPU where there is one, else the CPU. A bare "cuda" means the current
    GPU, given its index here: torch.cuda.set_device refuses a device without one, and kernels,
    streams and graph capture must land on the GPU the weights live on (cuda:1 in a two-GPU
    deployment), which only making it current guarantees.
    """
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r}: no CUDA GPU is visible to this process")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device
