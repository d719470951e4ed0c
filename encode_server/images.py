"""Decoding untrusted image bytes into an upright RGB PIL image.

The pixels we hand to preprocessing must equal what a transformers user gets from
`PIL.Image.open` -> `ImageOps.exif_transpose` -> the image processor's `convert_to_rgb`
(transparency composited onto white). The one deliberate difference: 16-bit grayscale is
scaled to 8 bits, where PIL's `convert("RGB")` (and so transformers) clips it to 255.
"""

from __future__ import annotations

import io
import warnings
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageErrorCode = Literal[
    "invalid_image",  # not an image, truncated or corrupt
    "unsupported_format",  # a real image in a format we do not accept
    "image_too_large",  # more pixels than the server accepts
    "unsupported_aspect_ratio",  # longer side more than 200x the shorter (Qwen's limit)
    "invalid_settings",  # preprocessing settings out of range
]

# PIL's names for the formats we accept. MPO is how PIL names the JPEGs most phones write
# (a JPEG with extra preview frames); its first frame is the photo.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP"})


class ImageError(ValueError):
    """An image a client sent cannot be used. `code` is for machines, the message for people.

    A ValueError so code written against transformers (which raises ValueError for the same
    conditions) still catches it.
    """

    def __init__(self, code: ImageErrorCode, message: str) -> None:
        super().__init__(message)
        self.code: ImageErrorCode = code
        self.message = message


def decode_image(data: bytes, *, max_pixels_decoded: int) -> Image.Image:
    """Decode one image (first frame of an animation) to an upright RGB image.

    The pixel count is checked from the header before any pixel is decoded, so a small file
    that claims a huge canvas costs nothing.
    """
    if not data:
        raise ImageError("invalid_image", "The image payload is empty.")
    # PIL reports its own bomb guard as a warning (or an error past twice its limit). Our
    # limit below is the one that decides; keep PIL's from printing or, under -W error, raising.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))  # lazy: reads the header only
        except Image.DecompressionBombError:
            # PIL refuses past twice its MAX_IMAGE_PIXELS, which may be below our limit.
            raise _too_large(None, min(max_pixels_decoded, 2 * Image.MAX_IMAGE_PIXELS)) from None
        except UnidentifiedImageError:
            raise ImageError("invalid_image", "The payload is not an image PIL can identify.") from None
        except Exception as e:  # header parsers raise many types on bad bytes
            raise ImageError("invalid_image", f"Could not read the image header: {e}") from None

        if image.format not in SUPPORTED_FORMATS:
            raise ImageError(
                "unsupported_format",
                f"{image.format} images are not supported; send JPEG, PNG, WebP, GIF or BMP.",
            )
        width, height = image.size
        if width * height > max_pixels_decoded:
            raise _too_large((width, height), max_pixels_decoded)

        try:
            image.load()  # first frame only; later frames of GIF/WebP/MPO are never decoded
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
        except Exception as e:  # decoders raise OSError, SyntaxError, ValueError...
            raise ImageError("invalid_image", f"The image data is truncated or corrupt: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any mode to RGB the way transformers' `convert_to_rgb` does.

    Anything with transparency (an alpha band, or a `transparency` entry as in palette GIFs
    and PNGs with tRNS) is composited onto opaque white with `Image.alpha_composite`.
    """
    if image.mode.startswith("I"):
        image = _sixteen_bit_to_la(image)
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_la(image: Image.Image) -> Image.Image:
    """16-bit grayscale (PNG 'I;16') to 8-bit, rounding v*255/65535; a tRNS value becomes alpha."""
    raw = np.asarray(image).astype(np.int64).clip(0, 65535)
    gray = ((raw * 255 + 32767) // 65535).astype(np.uint8)
    transparent = image.info.get("transparency")
    if transparent is None:
        return Image.fromarray(gray)  # 2-D uint8 is mode L
    alpha = np.where(raw == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray, alpha], axis=-1))  # 2 uint8 bands is mode LA


def _too_large(size: tuple[int, int] | None, limit: int) -> ImageError:
    what = f"{size[0]}x{size[1]} pixels" if size else "more pixels than the decoder allows"
    return ImageError(
        "image_too_large",
        f"The image has {what}; this server decodes at most {limit} pixels. Send a smaller image.",
    )
