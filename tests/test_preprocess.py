"""Preprocessing parity with transformers' Qwen2-VL image processor (PIL backend).

The reference user path: PIL.Image.open -> ImageOps.exif_transpose -> the image processor
(which converts the mode itself). Ours: decode_image -> preprocess.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from transformers import AutoImageProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from encode_server.images import ImageError, decode_image
from encode_server.preprocess import PreprocessSettings, preprocess, smart_resize
from transfer.content_key import content_key, is_content_key

QWEN3_VL = {  # Qwen3-VL's preprocessor_config.json
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "size": {"shortest_edge": 65536, "longest_edge": 16777216},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
TINY = {**QWEN3_VL, "size": {"shortest_edge": 1024, "longest_edge": 65536}}
# Qwen2-VL style: top-level pixel bounds, CLIP mean/std, patch 14.
QWEN2_VL = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}
CONFIGS = {"qwen3_vl": QWEN3_VL, "tiny": TINY, "qwen2_vl": QWEN2_VL}
LIMIT = 64 * 1024 * 1024


def _write(tmp: Path, config: dict) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "preprocessor_config.json").write_text(json.dumps(config))
    return tmp


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """name -> (our settings, transformers' processor), both read from the same checkpoint dir."""
    cache: dict[str, tuple[PreprocessSettings, object]] = {}

    def get(name: str):
        if name not in cache:
            path = _write(tmp_path_factory.mktemp(name), CONFIGS[name])
            reference = AutoImageProcessor.from_pretrained(path)
            assert reference.backend == "pil"  # the reference we claim to match
            cache[name] = (PreprocessSettings.from_pretrained(path), reference)
        return cache[name]

    return get


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: gradients plus noise, so resampling and channel mix-ups show."""
    rng = np.random.default_rng(seed)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    ramps = (rows * 255 // max(h - 1, 1), cols * 255 // max(w - 1, 1), rows + cols)
    base = np.stack([r.astype(np.uint8) for r in np.broadcast_arrays(*ramps)], -1)
    return base + rng.integers(0, 64, (h, w, 3), dtype=np.uint8)  # uint8 wraps around, on purpose


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _assert_same(ours: tuple[torch.Tensor, tuple[int, int, int]], reference, image: Image.Image) -> None:
    pixel_values, grid = ours
    expected = reference(image, return_tensors="pt")
    assert list(grid) == expected["image_grid_thw"][0].tolist()
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == expected["pixel_values"].shape
    assert (pixel_values - expected["pixel_values"]).abs().max().item() <= 1e-6


SIZES = [  # (config, height, width)
    ("tiny", 1, 1),  # upscaled to min_pixels
    ("tiny", 5, 7),
    ("tiny", 31, 33),
    ("tiny", 32, 32),  # already a multiple of 32
    ("tiny", 48, 80),  # 1.5 and 2.5 patches: Python's round goes to even (2 and 2)
    ("tiny", 100, 37),
    ("tiny", 257, 300),  # just over max_pixels: resized down
    ("tiny", 1000, 800),  # huge for these limits
    ("tiny", 3, 600),  # aspect ratio exactly 200 is allowed
    ("tiny", 600, 3),
    ("tiny", 10, 1990),
    ("tiny", 213, 97),
    ("qwen3_vl", 1, 1),
    ("qwen3_vl", 17, 23),
    ("qwen3_vl", 255, 257),
    ("qwen3_vl", 480, 640),
    ("qwen3_vl", 333, 999),
    ("qwen3_vl", 1234, 567),
    ("qwen3_vl", 2, 400),
    ("qwen3_vl", 4112, 4096),  # 16.8M pixels, just over max_pixels: resized down
    ("qwen2_vl", 45, 61),
    ("qwen2_vl", 720, 1279),
]


@pytest.mark.parametrize(("config", "height", "width"), SIZES)
def test_pixel_values_match_transformers(pair, config: str, height: int, width: int) -> None:
    settings, reference = pair(config)
    image = Image.fromarray(_noise(height, width, seed=height * 7919 + width))
    _assert_same(preprocess(image, settings), reference, image)


@pytest.mark.parametrize(("height", "width"), [(1, 201), (201, 1), (2, 401), (1000, 4)])
@pytest.mark.parametrize("config", ["tiny", "qwen3_vl"])
def test_extreme_aspect_ratios_are_refused_like_transformers(pair, config: str, height: int, width: int) -> None:
    settings, reference = pair(config)
    image = Image.fromarray(_noise(height, width))
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        reference(image)
    with pytest.raises(ImageError, match="aspect ratio must be smaller than 200") as info:
        preprocess(image, settings)
    assert info.value.code == "unsupported_aspect_ratio"


def test_smart_resize_matches_transformers_on_random_sizes() -> None:
    rng = random.Random(0)
    for _ in range(5000):
        height, width = (int(10 ** rng.uniform(0, 4.3)) for _ in range(2))
        factor = rng.choice([28, 32])
        min_pixels = rng.choice([1024, 3136, 65536])
        max_pixels = rng.choice([65536, 1003520, 16777216])
        try:
            expected = hf_smart_resize(height, width, factor, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(ImageError):
                smart_resize(height, width, factor, min_pixels, max_pixels)
            continue
        assert smart_resize(height, width, factor, min_pixels, max_pixels) == expected, (height, width)


def _rgba(h: int, w: int) -> Image.Image:
    alpha = np.tile(np.linspace(0, 255, w, dtype=np.uint8), (h, 1))  # transparent to opaque
    return Image.fromarray(np.dstack([_noise(h, w, seed=3), alpha]))


def _palette(h: int, w: int, transparency: int | None) -> Image.Image:
    image = Image.fromarray(_noise(h, w, seed=4)).quantize(64)
    if transparency is not None:
        image.info["transparency"] = transparency
    return image


MODES = {
    "L": lambda h, w: Image.fromarray(_noise(h, w, seed=2)).convert("L"),
    "RGBA": _rgba,
    "LA": lambda h, w: _rgba(h, w).convert("LA"),
    "P": lambda h, w: _palette(h, w, None),
    "P+transparency": lambda h, w: _palette(h, w, 7),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", ["tiny", "qwen3_vl"])
def test_modes_match_transformers(pair, config: str, mode: str) -> None:
    settings, reference = pair(config)
    data = _encode(MODES[mode](97, 131))
    user_image = Image.open(io.BytesIO(data))
    assert user_image.mode == mode.split("+")[0]
    ours = preprocess(decode_image(data, max_pixels_decoded=LIMIT), settings)
    _assert_same(ours, reference, user_image)


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_exif_rotated_jpegs_match_transformers(pair, orientation: int) -> None:
    settings, reference = pair("tiny")
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(_noise(90, 150, seed=orientation)), "JPEG", quality=92, exif=exif)
    user_image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    ours = preprocess(decode_image(data, max_pixels_decoded=LIMIT), settings)
    assert ours[1] == ((1, 10, 6) if orientation >= 5 else (1, 6, 10))  # sideways grids swap
    _assert_same(ours, reference, user_image)


def test_qwen3_vl_config_reads_as_expected(pair) -> None:
    settings, _ = pair("qwen3_vl")
    assert (settings.patch_size, settings.temporal_patch_size, settings.merge_size) == (16, 2, 2)
    assert (settings.min_pixels, settings.max_pixels) == (65536, 16777216)
    assert settings.image_mean == settings.image_std == (0.5, 0.5, 0.5)
    assert settings.resample == Image.Resampling.BICUBIC and settings.rescale_factor == 1 / 255


def test_top_level_pixel_bounds_win_over_size_like_transformers(tmp_path) -> None:
    config = {**QWEN3_VL, "min_pixels": 2048, "max_pixels": 4096}
    reference = AutoImageProcessor.from_pretrained(_write(tmp_path, config))
    settings = PreprocessSettings.from_dict(config)
    assert (settings.min_pixels, settings.max_pixels) == (2048, 4096)
    assert (reference.size.shortest_edge, reference.size.longest_edge) == (2048, 4096)


def test_unified_processor_config_is_read(tmp_path) -> None:
    """transformers 5.x save_pretrained writes processor_config.json with an image_processor entry."""
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": TINY}))
    assert PreprocessSettings.from_pretrained(tmp_path) == PreprocessSettings.from_dict(TINY)


def test_missing_config_says_what_to_do(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        PreprocessSettings.from_pretrained(tmp_path)


def test_request_overrides_change_the_grid_within_the_limit(pair) -> None:
    settings, _ = pair("qwen3_vl")
    image = Image.fromarray(_noise(480, 640))
    smaller = settings.with_overrides({"max_pixels": 65536}, max_pixels_limit=settings.max_pixels)
    assert preprocess(image, smaller)[1] == (1, 12, 18)  # 192 x 288 pixels
    assert preprocess(image, settings)[1] == (1, 30, 40)


@pytest.mark.parametrize(
    "overrides",
    [
        {"max_pixels": 16777217},  # above the server's limit
        {"min_pixels": 0},
        {"min_pixels": 100000, "max_pixels": 70000},
        {"patch_size": 14},  # belongs to the model, not the request
    ],
)
def test_request_overrides_outside_the_limits_are_refused(pair, overrides: dict) -> None:
    settings, _ = pair("qwen3_vl")
    with pytest.raises(ImageError) as info:
        settings.with_overrides(overrides, max_pixels_limit=settings.max_pixels)
    assert info.value.code == "invalid_settings"


def test_content_key_covers_bytes_and_options() -> None:
    data = _encode(Image.fromarray(_noise(8, 8)))
    key = content_key(data, {})
    assert is_content_key(key) and not is_content_key("unkeyed")
    assert content_key(bytes(data), {}) == key and content_key(memoryview(data), {}) == key
    assert content_key(data + b"\0", {}) != key
    assert content_key(data, {"max_pixels": 65536}) != key
    assert content_key(data, {"max_pixels": 65536, "min_pixels": 4096}) == content_key(
        data, {"min_pixels": 4096, "max_pixels": 65536}
    )  # order does not matter
    assert content_key(data, {"min_pixels": 65536}) != content_key(data, {"max_pixels": 65536})
