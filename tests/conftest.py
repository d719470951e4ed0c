"""Shared fixtures: tiny random checkpoints written once per test session (offline, < 1 s each)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    # GPU tests carry @pytest.mark.gpu and skip (visibly, with a reason) on machines without CUDA.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """Skips grouped by reason, so a green run says plainly what it did not run and why."""
    skipped = terminalreporter.stats.get("skipped", [])
    reasons = Counter(
        str(r.longrepr[2]).removeprefix("Skipped: ") if isinstance(r.longrepr, tuple) else "?" for r in skipped
    )
    if reasons:
        terminalreporter.write_sep("-", f"{len(skipped)} skipped (not run, not counted as passed), by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:4d}  {reason}")


def _tiny(tmp_path_factory, name: str, **kwargs):
    from models.tiny_checkpoint import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def vl_ckpt(tmp_path_factory):
    """Qwen3-VL-MoE, Hub layout, k = 3 DeepStack levels at vision blocks [1, 2, 3]."""
    return _tiny(tmp_path_factory, "vl", seed=0)


@pytest.fixture(scope="session")
def vl_ckpt_k2(tmp_path_factory):
    """Qwen3-VL-MoE with k = 2 DeepStack levels at other vision blocks [0, 3]."""
    return _tiny(tmp_path_factory, "vl_k2", seed=1, deepstack_visual_indexes=[0, 3])


@pytest.fixture(scope="session")
def qwen3_text_ckpt(tmp_path_factory):
    """Text-only Qwen3-MoE with per-expert tensors, as on the Hub."""
    return _tiny(tmp_path_factory, "qwen3", seed=2, arch="qwen3_moe")


@pytest.fixture(scope="session")
def qwen2_text_ckpt(tmp_path_factory):
    """Text-only Qwen2-MoE: shared expert with a sigmoid gate, qkv bias, no q/k norm."""
    return _tiny(tmp_path_factory, "qwen2", seed=3, arch="qwen2_moe")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """Every torch.empty / empty_like during the test comes back poisoned (NaN, or -2**30 for
    integers), so a kernel output element that is never written cannot pass."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-(2**30))

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(scope="session")
def fp8_vl_ckpt(tmp_path_factory):
    """Qwen3-VL-MoE in Qwen's block-wise FP8 layout (`make-tiny --fp8`): float8 language linears
    with weight_scale_inv grids, experts one by one, the rest fp32."""
    return _tiny(tmp_path_factory, "vl_fp8", seed=0, quantize_fp8=True)


@pytest.fixture(scope="session")
def fp8_vl_plain(fp8_vl_ckpt, tmp_path_factory):
    """The same weights dequantized into a plain fp32 checkpoint: transformers' reference input."""
    from tests.reference import write_dequantized_copy

    return write_dequantized_copy(fp8_vl_ckpt, tmp_path_factory.mktemp("vl_fp8_plain") / "ckpt")
