"""decode_image on untrusted bytes: formats, first frame, EXIF, mode conversion, and refusals."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from transformers.image_transforms import convert_to_rgb

from encode_server.images import ImageError, decode_image

LIMIT = 64 * 1024 * 1024


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: gradients plus noise, so resampling and channel mix-ups show."""
    rng = np.random.default_rng(seed)
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    ramps = (rows * 255 // max(h - 1, 1), cols * 255 // max(w - 1, 1), rows + cols)
    base = np.stack([r.astype(np.uint8) for r in np.broadcast_arrays(*ramps)], -1)
    return base + rng.integers(0, 64, (h, w, 3), dtype=np.uint8)  # uint8 wraps around, on purpose


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature + IHDR claiming width x height RGB, and no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _decode_error(data: bytes, limit: int = LIMIT) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels_decoded=limit)
    return info.value


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "WEBP"])
def test_lossless_formats_decode_to_the_same_pixels(fmt: str) -> None:
    pixels = _noise(37, 53)
    extra = {"lossless": True} if fmt == "WEBP" else {}
    image = decode_image(_encode(Image.fromarray(pixels), fmt, **extra), max_pixels_decoded=LIMIT)
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_jpeg_decodes_to_what_pil_decodes() -> None:
    data = _encode(Image.fromarray(_noise(40, 64)), "JPEG", quality=90)
    image = decode_image(data, max_pixels_decoded=LIMIT)
    assert image.mode == "RGB" and image.size == (64, 40)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data))))


def test_gif_gives_the_first_frame() -> None:
    red, blue = (Image.new("RGB", (20, 10), c).convert("P") for c in ((255, 0, 0), (0, 0, 255)))
    data = _encode(red, "GIF", save_all=True, append_images=[blue], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    image = decode_image(data, max_pixels_decoded=LIMIT)
    assert image.mode == "RGB" and image.size == (20, 10)
    assert (np.asarray(image) == (255, 0, 0)).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation: int) -> None:
    source = Image.fromarray(_noise(30, 50))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(source, "JPEG", quality=95, exif=exif)
    image = decode_image(data, max_pixels_decoded=LIMIT)
    assert image.size == ((30, 50) if orientation in (6, 8) else (50, 30))
    turn = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}
    upright = Image.open(io.BytesIO(data)).transpose(turn[orientation])
    np.testing.assert_array_equal(np.asarray(image), np.asarray(upright))


def _rgba() -> Image.Image:
    pixels = np.dstack([_noise(16, 24), np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (16, 1))])
    return Image.fromarray(pixels)  # alpha runs 0..255 left to right


def _palette_with_transparency() -> Image.Image:
    image = Image.fromarray(_noise(16, 24)).quantize(32)
    image.info["transparency"] = 5
    return image


@pytest.mark.parametrize(
    "make",
    [
        _rgba,
        lambda: _rgba().convert("LA"),
        _palette_with_transparency,
        lambda: Image.fromarray(_noise(16, 24)).quantize(32),
        lambda: Image.fromarray(_noise(16, 24)).convert("L"),
        lambda: Image.fromarray(_noise(16, 24)).convert("1"),
    ],
    ids=["RGBA", "LA", "P+transparency", "P", "L", "1"],
)
def test_modes_convert_like_transformers(make) -> None:
    """Transparency is composited onto white, exactly as transformers' convert_to_rgb does."""
    source = make()
    data = _encode(source, "PNG")
    ours = np.asarray(decode_image(data, max_pixels_decoded=LIMIT))
    theirs = convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
    np.testing.assert_array_equal(ours, theirs)


def test_fully_transparent_pixels_become_white() -> None:
    pixels = np.zeros((4, 4, 4), np.uint8)  # black, alpha 0
    image = decode_image(_encode(Image.fromarray(pixels), "PNG"), max_pixels_decoded=LIMIT)
    assert (np.asarray(image) == 255).all()


def test_cmyk_jpeg_converts_to_rgb() -> None:
    data = _encode(Image.fromarray(_noise(16, 16)).convert("CMYK"), "JPEG", quality=95)
    ours = np.asarray(decode_image(data, max_pixels_decoded=LIMIT))
    np.testing.assert_array_equal(ours, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    """PIL's convert('RGB') clips 16-bit values to 255 (an all-white image); we scale."""
    raw = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.frombytes("I;16", (4, 1), raw.tobytes()), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = decode_image(data, max_pixels_decoded=LIMIT)
    assert np.asarray(image)[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_bytes_are_invalid(fmt: str) -> None:
    data = _encode(Image.fromarray(_noise(64, 64)), fmt)
    assert _decode_error(data[: len(data) // 2]).code == "invalid_image"


def test_random_bytes_are_invalid() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    assert _decode_error(data).code == "invalid_image"


def test_empty_payload_is_invalid() -> None:
    assert _decode_error(b"").code == "invalid_image"


def test_other_formats_are_unsupported() -> None:
    err = _decode_error(_encode(Image.fromarray(_noise(8, 8)), "TIFF"))
    assert err.code == "unsupported_format" and "TIFF" in err.message


def test_size_is_checked_from_the_header_before_decoding(monkeypatch) -> None:
    def no_decoding(self):
        raise AssertionError("pixels were decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    err = _decode_error(_png_header_only(3000, 2000), limit=1_000_000)
    assert err.code == "image_too_large" and "3000x2000" in err.message


@pytest.mark.parametrize("side", [10_000, 100_000])
def test_decompression_bombs_are_refused_even_with_warnings_as_errors(side: int) -> None:
    """10k^2 trips PIL's DecompressionBombWarning, 100k^2 its DecompressionBombError."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _decode_error(_png_header_only(side, side), limit=LIMIT).code == "image_too_large"


def test_image_at_the_limit_is_accepted() -> None:
    data = _encode(Image.fromarray(_noise(10, 20)), "PNG")
    assert decode_image(data, max_pixels_decoded=200).size == (20, 10)
    assert _decode_error(data, limit=199).code == "image_too_large"
