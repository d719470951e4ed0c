"""Transports by name, so a deployment config says `transport: zmq` and never imports a backend:
zmq (tcp:// across hosts or ipc:// on one host; the default everywhere) and cuda_ipc (GPU to GPU
on one node). Backends are imported only when asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # settings validate names through this module without importing torch
    from transfer.base import Receiver, Sender

_BACKENDS: dict[str, tuple[str, str]] = {  # name -> ("module:Sender class", "module:Receiver class")
    "zmq": ("transfer.zmq_transport:ZmqSender", "transfer.zmq_transport:ZmqReceiver"),
    "cuda_ipc": ("transfer.cuda_ipc_sender:CudaIpcSender", "transfer.cuda_ipc_receiver:CudaIpcReceiver"),
}


def transport_names() -> list[str]:
    return sorted(_BACKENDS)


def check_transport(name: str) -> str:
    """`name` if it is a transport; else a ValueError that lists the valid names."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown transport {name!r}; choose one of {transport_names()}")
    return name


def _load(path: str) -> Any:
    module, cls = path.split(":")
    return getattr(importlib.import_module(module), cls)


def make_sender(name: str, address: str, **options: Any) -> Sender:
    """A sender of transport `name` connected to `address` (options are the backend's)."""
    return _load(_BACKENDS[check_transport(name)][0])(address, **options)


def make_receiver(name: str, address: str, **options: Any) -> Receiver:
    """A receiver of transport `name` bound to `address` (options are the backend's)."""
    return _load(_BACKENDS[check_transport(name)][1])(address, **options)
