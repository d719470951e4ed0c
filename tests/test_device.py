"""Device settings: "auto", "cpu", "cuda" and "cuda:N" resolve to a usable torch device."""

from __future__ import annotations

import pytest
import torch

from models.device import resolve_device


def test_cpu_and_auto_without_gpu():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")


@pytest.mark.gpu
def test_bare_cuda_gets_the_current_index_and_is_made_current():
    # A bare "cuda" (the default the benchmarks and "auto" produce) once crashed set_device.
    last = torch.cuda.device_count() - 1
    torch.cuda.set_device(last)
    assert resolve_device("cuda") == torch.device("cuda", last)
    assert resolve_device("auto") == torch.device("cuda", last)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert torch.cuda.current_device() == 0
