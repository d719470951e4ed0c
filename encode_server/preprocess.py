"""Qwen2-VL/Qwen3-VL image preprocessing: smart resize, rescale, normalise, patchify.

The reference is transformers' `Qwen2VLImageProcessorPil` (5.x): PIL resize in uint8, then
`float64(x) * rescale_factor -> float32`, then `(x - mean) / std` in float32, then the
merge-friendly patch order. We reproduce those exact float operations (through a 256-entry
lookup table per channel), so our pixel values are bit-identical, not merely close.

Legend: C channels (3), T temporal patch, P patch size, M merge size, N patches (gh * gw).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from encode_server.images import ImageError, to_rgb

# transformers' Qwen2VLImageProcessor defaults, used for keys a config leaves out.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class PreprocessSettings:
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple[float, float, float] = _CLIP_MEAN
    image_std: tuple[float, float, float] = _CLIP_STD
    do_resize: bool = True
    resample: int = int(Image.Resampling.BICUBIC)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True

    def __post_init__(self) -> None:
        for name in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels"):
            value = getattr(self, name)
            if value < 1:
                raise ImageError("invalid_settings", f"{name} must be positive, got {value}.")
        if self.max_pixels < self.min_pixels:
            raise ImageError(
                "invalid_settings",
                f"max_pixels ({self.max_pixels}) must be at least min_pixels ({self.min_pixels}).",
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or 0 in self.image_std:
            raise ImageError(
                "invalid_settings",
                f"image_mean/image_std need 3 values and a non-zero std, got {self.image_mean} / {self.image_std}.",
            )
        if self.resample not in {int(r) for r in Image.Resampling}:
            raise ImageError("invalid_settings", f"resample {self.resample} is not a PIL filter.")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> PreprocessSettings:
        """Read an image processor config (the contents of preprocessor_config.json).

        Pixel bounds come from `size.shortest_edge/longest_edge` (Qwen3-VL, transformers 5.x) or
        the older top-level `min_pixels/max_pixels` (Qwen2-VL), which win when both are present,
        as in transformers' `Qwen2VLImageProcessor.__init__`.
        """
        size = config.get("size") or {}
        defaults = cls()

        def pick(name: str, *fallbacks: Any) -> Any:
            return _first(config.get(name), *fallbacks, getattr(defaults, name))

        return cls(
            patch_size=int(pick("patch_size")),
            temporal_patch_size=int(pick("temporal_patch_size")),
            merge_size=int(pick("merge_size")),
            min_pixels=int(pick("min_pixels", size.get("shortest_edge"), size.get("min_pixels"))),
            max_pixels=int(pick("max_pixels", size.get("longest_edge"), size.get("max_pixels"))),
            image_mean=_three(pick("image_mean")),
            image_std=_three(pick("image_std")),
            do_resize=bool(pick("do_resize")),
            resample=int(pick("resample")),
            do_rescale=bool(pick("do_rescale")),
            rescale_factor=float(pick("rescale_factor")),
            do_normalize=bool(pick("do_normalize")),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> PreprocessSettings:
        """Read a checkpoint directory: preprocessor_config.json (Hub checkpoints), else the
        `image_processor` entry of processor_config.json (what transformers 5.x saves)."""
        model_dir = Path(model_dir)
        legacy = model_dir / "preprocessor_config.json"
        unified = model_dir / "processor_config.json"
        if legacy.is_file():
            return cls.from_dict(json.loads(legacy.read_text()))
        if unified.is_file():
            config = json.loads(unified.read_text())
            if isinstance(config.get("image_processor"), dict):
                return cls.from_dict(config["image_processor"])
        raise FileNotFoundError(
            f"{model_dir} has no preprocessor_config.json and no processor_config.json with an "
            "'image_processor' entry; copy the one from the model's Hub repository."
        )

    def with_overrides(self, overrides: Mapping[str, int], *, max_pixels_limit: int) -> PreprocessSettings:
        """A request's `min_pixels`/`max_pixels`, checked against the server's pixel limit.

        Only the pixel bounds are per request: patch, merge and normalisation belong to the model.
        """
        unknown = set(overrides) - {"min_pixels", "max_pixels"}
        if unknown:
            raise ImageError(
                "invalid_settings",
                f"Unknown preprocessing options {sorted(unknown)}; a request may set only min_pixels and max_pixels.",
            )
        values = {k: overrides[k] for k in ("min_pixels", "max_pixels") if k in overrides}
        for name, value in values.items():
            is_int = isinstance(value, int) and not isinstance(value, bool)
            if not is_int or not 1 <= value <= max_pixels_limit:
                raise ImageError(
                    "invalid_settings",
                    f"{name} must be an integer from 1 to {max_pixels_limit}, got {value!r}.",
                )
        return dataclasses.replace(self, **values)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, about [min_pixels, max_pixels] pixels, same
    aspect ratio. A line-for-line copy of transformers' Qwen2-VL `smart_resize`, including its
    Python `round` (ties to even: 80 / 32 = 2.5 rounds to 2) and its aspect-ratio refusal.
    For ratios near 200 the result can exceed max_pixels, as in transformers."""
    if height < 1 or width < 1:
        raise ImageError("invalid_image", f"The image is {width}x{height}; sides must be >= 1.")
    ratio = max(height, width) / min(height, width)
    if ratio > _MAX_ASPECT_RATIO:
        raise ImageError(
            "unsupported_aspect_ratio",
            f"absolute aspect ratio must be smaller than {_MAX_ASPECT_RATIO}, got {ratio} "
            f"({width}x{height}); crop or pad the image.",
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def preprocess(image: Image.Image, settings: PreprocessSettings) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image to (pixel_values [N, C*T*P*P] float32, grid_thw (1, gh, gw)) in patches.

    Rows are ordered merge-group by merge-group (the M x M patches one merged token covers are
    adjacent), and a still image fills all T temporal slots with the same frame, as transformers
    does.
    """
    if image.mode != "RGB":
        image = to_rgb(image)
    factor = settings.factor
    if settings.do_resize:
        height, width = smart_resize(image.height, image.width, factor, settings.min_pixels, settings.max_pixels)
        image = image.resize((width, height), resample=settings.resample)
    elif image.height % factor or image.width % factor:
        raise ImageError(
            "invalid_image",
            f"do_resize is off, so both sides must be multiples of {factor}; got {image.width}x{image.height}.",
        )

    pixels = np.asarray(image)  # [H, W, C] uint8
    values = torch.from_numpy(_lookup_table(settings)[np.arange(3), pixels])  # [H, W, C] float32

    p, m, t = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    gh, gw = image.height // p, image.width // p
    patches = values.view(gh // m, m, p, gw // m, m, p, 3)
    patches = patches.permute(0, 3, 1, 4, 6, 2, 5)  # [gh/M, gw/M, M, M, C, P, P]
    patches = patches.unsqueeze(5).expand(*patches.shape[:5], t, p, p)  # [..., C, T, P, P]
    return patches.reshape(gh * gw, 3 * t * p * p), (1, gh, gw)


@functools.lru_cache(maxsize=32)
def _lookup_table(settings: PreprocessSettings) -> np.ndarray:
    """[C, 256] float32: each uint8 value after transformers' rescale and normalise, done with the
    same dtypes in the same order so every entry is bit-identical to theirs."""
    values = np.arange(256, dtype=np.uint8)
    if settings.do_rescale:  # transformers upcasts to float64, scales, then downcasts
        values = (values.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    else:
        values = values.astype(np.float32)
    if not settings.do_normalize:
        return np.stack([values] * 3)
    mean = np.asarray(settings.image_mean, dtype=np.float32)[:, None]
    std = np.asarray(settings.image_std, dtype=np.float32)[:, None]
    return (values[None, :] - mean) / std


def _first(*values: Any) -> Any:
    """The first value that is not None (config keys may be present with null)."""
    return next(v for v in values if v is not None)


def _three(value: float | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """transformers accepts one number for all channels or one per channel."""
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    return tuple(float(v) for v in value)  # type: ignore[return-value]
