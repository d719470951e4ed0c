"""Transports by name, so a deployment config says `transport: zmq` and never imports a backend.

Backends are imported only when asked for: an optional one (nixl) costs nothing, and fails with
its own clear message, unless a config names it.
"""

from __future__ import annotations

import importlib
from typing import Any

from transfer.base import Receiver, Sender

# name -> (module, sender class, receiver class)
_BACKENDS: dict[str, tuple[str, str, str]] = {
    "zmq": ("transfer.zmq_transport", "ZmqSender", "ZmqReceiver"),
    "shm": ("transfer.shm", "ShmSender", "ShmReceiver"),
    "cuda_ipc": ("transfer.cuda_ipc", "CudaIpcSender", "CudaIpcReceiver"),
    "nixl": ("transfer.nixl_transport", "NixlSender", "NixlReceiver"),
}


def transport_names() -> list[str]:
    return sorted(_BACKENDS)


def _backend(name: str) -> tuple[Any, str, str]:
    if name not in _BACKENDS:
        raise ValueError(f"unknown transport {name!r}; choose one of {transport_names()}")
    module, sender, receiver = _BACKENDS[name]
    return importlib.import_module(module), sender, receiver


def make_sender(name: str, address: str, **options: Any) -> Sender:
    """A sender of transport `name` connected to `address` (options are the backend's)."""
    module, sender, _ = _backend(name)
    return getattr(module, sender)(address, **options)


def make_receiver(name: str, address: str, **options: Any) -> Receiver:
    """A receiver of transport `name` bound to `address` (options are the backend's)."""
    module, _, receiver = _backend(name)
    return getattr(module, receiver)(address, **options)
