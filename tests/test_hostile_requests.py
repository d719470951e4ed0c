"""Hostile requests against the real split (`splitvl encode` + `splitvl language` processes on
loopback, the tiny VL checkpoint): each one gets a 4xx in OpenAI's error shape with a message
that says what is wrong, within seconds, and after each the service is healthy; a normal text
and image chat still work at the end. Odd but valid images (1x1, CMYK, 16-bit, alpha, palette,
animated) are answered with 200, as transformers would read them.

The encoder runs with `splitvl encode`'s defaults except two things a test needs:
- `url_allow_list: [127.0.0.2/32]`: 127.0.0.2 stands for a public image host (the tests reach
  no internet). Every other loopback spelling stays refused, as by default, and a live image
  server on 127.0.0.1 makes sure a broken fence would show up as a 200, not as a lucky error.
- fetch timeouts of 1 s (silence) and 2 s (whole download) instead of 5 s and 10 s, so the
  slow-server cases take seconds.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import yaml
from PIL import Image

from tests.services import EncodeService, LanguageService, data_url, png

MODEL = "tiny-vl"
CLIENT_TIMEOUT_S = 30.0  # no request may hang: the client gives up here...
ANSWER_WITHIN_S = 10.0  # ...and each must answer well within it (the slowest case takes ~2 s)
HEALTH_STALL_S = 2.0  # /health answers in milliseconds; this long means the event loop is stuck
PHOTO = png(40, 32, seed=7)
IMAGE_PART = "messages[0].content[0].image_url"


# ----------------------------------------------------------------------------- image host


class _ImageHandler(BaseHTTPRequestHandler):
    """Routes an image URL may point at; the same on the allowed and the forbidden address."""

    def do_GET(self) -> None:
        routes: dict[str, Callable[[], None]] = {
            "/photo.png": lambda: self._send(200, PHOTO, "image/png"),
            "/page.html": lambda: self._send(200, b"<!doctype html><title>not an image</title>", "text/html"),
            "/empty.png": lambda: self._send(200, b"", "image/png"),
            "/missing.png": lambda: self._send(404, b"not found", "text/plain"),
            "/declares-1GB.png": lambda: self._send(200, PHOTO, "image/png", length=10**9),
            "/endless.png": self._endless,
            "/silent.png": self._silent,
            "/drip.png": self._drip,
            "/to-loopback": lambda: self._redirect(f"http://127.0.0.1:{self.server.loopback_port}/photo.png"),
            "/to-metadata": lambda: self._redirect("http://169.254.169.254/latest/meta-data/"),
            "/to-file": lambda: self._redirect("file:///etc/passwd"),
            "/loop": lambda: self._redirect("/loop"),
        }
        routes.get(self.path, lambda: self._send(404, b"no such route", "text/plain"))()

    def _send(self, status: int, body: bytes, kind: str, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        try:
            self.wfile.write(body)
        except OSError:
            pass  # the encoder hung up on a declared length it refuses, as it should

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _endless(self) -> None:  # no Content-Length: only the streaming byte cap can stop it
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(1024):  # 64 MiB, twice the encoder's 32 MiB cap
                self.wfile.write(b"\0" * 65536)
        except OSError:
            pass

    def _silent(self) -> None:  # headers, then nothing: the read timeout must end it
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.flush()
        time.sleep(4)

    def _drip(self) -> None:  # a byte every 0.2 s, each within the read timeout: only the deadline ends it
        self.send_response(200)
        self.send_header("Content-Length", str(len(PHOTO)))
        self.end_headers()
        try:
            for byte in PHOTO[:40]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Hosts:
    allowed: str  # http://127.0.0.2:PORT, allow-listed: a public image host
    loopback: str  # http://127.0.0.1:PORT, a live image server the encoder must never reach
    loopback_port: int


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    servers = [ThreadingHTTPServer((address, 0), _ImageHandler) for address in ("127.0.0.2", "127.0.0.1")]
    for server in servers:
        server.daemon_threads = True
        server.loopback_port = servers[1].server_address[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
    allowed, loopback = (f"http://{s.server_address[0]}:{s.server_address[1]}" for s in servers)
    yield Hosts(allowed, loopback, servers[1].server_address[1])
    for server in servers:
        server.shutdown()
        server.server_close()


# ------------------------------------------------------------------------------- services


@pytest.fixture(scope="module")
def encoder(vl_ckpt, tmp_path_factory) -> Iterator[EncodeService]:
    tmp = tmp_path_factory.mktemp("hostile_encode")
    config = tmp / "encode.yaml"
    config.write_text(
        yaml.safe_dump({"url_allow_list": ["127.0.0.2/32"], "fetch_read_timeout_s": 1.0, "fetch_total_timeout_s": 2.0})
    )
    service = EncodeService(vl_ckpt, tmp, "--config", str(config)).wait_ready()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def service(vl_ckpt, encoder, tmp_path_factory) -> Iterator[LanguageService]:
    service = LanguageService(
        tmp_path_factory.mktemp("hostile_language"), vl_ckpt, "--encoder", encoder.listen, "--served-model-name", MODEL
    )
    try:
        service.wait_healthy()
        service.wait_encoder()
        yield service
    finally:
        service.stop()


def assert_healthy(service: LanguageService, encoder: EncodeService) -> None:
    """Both services up: the language service's /health (which the load balancer sees) and the
    encoder's own (its pings would only miss after seconds, so a crashed encoder shows here first)."""
    health = httpx.get(f"{service.url}/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert encoder.proc.poll() is None, f"the encoder exited:\n{encoder.log.read_text()[-3000:]}"
    encoder_health = httpx.get(f"http://127.0.0.1:{encoder.http_port}/health", timeout=10)
    assert encoder_health.json().get("status") == "ready", encoder_health.text


def assert_openai_error(response: httpx.Response) -> dict:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and len(error["message"]) > 10, error
    assert not any(leak in error["message"] for leak in ("Traceback", 'File "', "site-packages")), error
    assert error["type"] == ("invalid_request_error" if response.status_code != 404 else "not_found_error"), error
    return error


# ------------------------------------------------------------------------------ builders


def chat(content: str | list | int | None = "Hi.", **fields: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


def image_chat(url: str, **image_fields: object) -> dict:
    return chat([{"type": "image_url", "image_url": {"url": url, **image_fields}}, {"type": "text", "text": "What?"}])


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return buf.getvalue()


def as_data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_canvas(width: int, height: int, pixels: bool) -> bytes:
    """A 1-bit grayscale PNG declaring width x height; with `pixels`, real all-black rows
    (30000 x 30000 compresses to ~110 KB: a decompression bomb), else the header alone."""
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    if pixels:
        z, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)
        out += _png_chunk(b"IDAT", b"".join(z.compress(row) for _ in range(height)) + z.flush())
    return out + _png_chunk(b"IEND", b"")


def gif_declaring_a_huge_screen() -> bytes:
    data = bytearray(encoded(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # the logical screen: 4.3 G pixels
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("P", (40, 40), color) for color in (1, 50, 200)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_png(transparent: bool) -> bytes:
    image = Image.open(io.BytesIO(PHOTO)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(image, "PNG", **({"transparency": 0} if transparent else {}))


def nested(depth: int) -> bytes:
    """A valid request whose `metadata` nests `depth` objects deep."""
    return (
        b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi."}], "metadata": '
        + b'{"a": ' * depth
        + b"1"
        + b"}" * depth
        + b"}"
    )


# ---------------------------------------------------------------------------------- cases


Body = bytes | dict


@dataclass(frozen=True)
class Hostile:
    id: str
    body: Body | Callable[[Hosts], Body]
    status: int | tuple[int, ...]  # 200 only for odd but valid images
    code: str | None = None  # the error code, where one is specific
    says: str = ""  # a phrase the message must hold (case-insensitive): what is wrong
    param: str | None = None  # the parameter the error must name, where it is known
    content_type: str = "application/json"


def refused_url(url: str) -> Callable[[Hosts], Body]:
    """An image URL on the live loopback image server (port filled in), which must be refused."""
    return lambda h: image_chat(url.format(port=h.loopback_port))


FORBIDDEN = {"status": 400, "code": "forbidden_source", "says": "not reachable from this service"}

CASES = [
    # --- the body itself
    Hostile("malformed_json", b'{"model": "tiny-vl", "messages": [', 400, "invalid_json", "not valid JSON"),
    Hostile("body_is_a_list", b'[{"model": "tiny-vl"}]', 400, "invalid_json", "JSON object"),
    Hostile("body_is_a_string", b'"hello"', 400, "invalid_json", "JSON object"),
    Hostile("body_is_a_number", b"42", 400, "invalid_json", "JSON object"),
    Hostile("empty_body", b"", 400, "invalid_json", "not valid JSON"),
    Hostile(
        "form_encoded_body",
        b"model=tiny-vl&messages=hi",
        400,
        "invalid_json",
        "not valid JSON",
        content_type="application/x-www-form-urlencoded",
    ),
    Hostile("text_plain_body", b"please say hi", 400, "invalid_json", "not valid JSON", content_type="text/plain"),
    Hostile("utf16_body", json.dumps(chat()).encode("utf-16"), 400, "invalid_json", "not valid JSON"),
    Hostile(
        "non_utf8_bytes",
        b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "\xff\xfe\xc0"}]}',
        400,
        "invalid_json",
        "not valid JSON",
    ),
    Hostile(
        "lone_surrogate_escape",
        b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "\\ud800"}]}',
        400,
        "invalid_json",
        "not valid JSON",
    ),
    Hostile("nested_100k_brackets", b"[" * 100_000, 400, "invalid_json", "not valid JSON"),
    Hostile("nested_100k_objects_in_metadata", nested(100_000), 400, "invalid_json", "not valid JSON"),
    # --- parameters
    Hostile(
        "max_tokens_1e30", chat(max_tokens=10**30), 400, "context_length_exceeded", "max_tokens", param="max_tokens"
    ),
    Hostile(
        "max_tokens_4000_digits",
        b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi."}], "max_tokens": 1' + b"0" * 4000 + b"}",
        400,
        "context_length_exceeded",
        "max_tokens",
        "max_tokens",
    ),
    Hostile(
        "max_tokens_negative", chat(max_tokens=-5), 400, "invalid_value", "greater than or equal to 1", "max_tokens"
    ),
    Hostile("max_tokens_zero", chat(max_tokens=0), 400, "invalid_value", "greater than or equal to 1", "max_tokens"),
    Hostile("max_tokens_float", chat(max_tokens=2.5), 400, "invalid_type", "integer", "max_tokens"),
    Hostile("temperature_as_string", chat(temperature="0.5"), 400, "invalid_type", "number", "temperature"),
    Hostile(
        "temperature_nan",
        b'{"model": "tiny-vl", "messages": [{"role": "user", "content": "Hi."}], "temperature": NaN}',
        400,
        None,
        "temperature",
    ),
    Hostile("n_1e6", chat(n=10**6), 400, "invalid_value", "less than or equal to 128", "n"),
    Hostile(
        "top_logprobs_1e6",
        chat(logprobs=True, top_logprobs=10**6),
        400,
        "invalid_value",
        "less than or equal to 20",
        "top_logprobs",
    ),
    # OpenAI refuses more than 4 stop sequences; any limit works, none lets a request make the
    # HTTP process match thousands of strings after every token (see the stall test below).
    Hostile("stop_1000_strings", chat(stop=[f"~stop{i}~" for i in range(1000)]), 400, None, "stop", "stop"),
    # top_k has no upper bound: past 2**64 it cannot be packed for the engine.
    Hostile("top_k_2_pow_64", chat(top_k=2**64), 400, None, "top_k", "top_k"),
    Hostile("seed_1e30", chat(seed=10**30), 400, "invalid_value", "seed", "seed"),
    Hostile("stop_token_id_1e30", chat(stop_token_ids=[10**30]), 400, None, "vocabulary", "stop_token_ids"),
    Hostile("unknown_parameter", chat(temprature=0.5), 400, "unsupported_parameter", "temprature", "temprature"),
    Hostile(
        "audio_output_not_served",
        chat(audio={"voice": "alloy", "format": "wav"}),
        400,
        "unsupported_parameter",
        "audio",
        "audio",
    ),
    # docs/api.md answers an unknown model in a chat with 400, OpenAI with 404; both name it.
    Hostile("model_does_not_exist", {**chat(), "model": "gpt-4o"}, (400, 404), "model_not_found", "gpt-4o", "model"),
    # --- messages
    Hostile("messages_not_a_list", {"model": MODEL, "messages": "Hi."}, 400, "invalid_type", "array", "messages"),
    Hostile("messages_empty", {"model": MODEL, "messages": []}, 400, "invalid_value", "at least 1", "messages"),
    Hostile(
        "message_without_role",
        {"model": MODEL, "messages": [{"content": "Hi."}]},
        400,
        None,
        "role",
        "messages[0].role",
    ),
    Hostile(
        "unknown_role",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "Hi."}]},
        400,
        "invalid_value",
        "role",
        "messages[0].role",
    ),
    Hostile("content_is_a_number", chat(42), 400, "invalid_type", "content", "messages[0].content"),
    Hostile("user_content_null", chat(None), 400, None, "content is required", "messages[0].content"),
    Hostile(
        "content_part_of_unknown_type",
        chat([{"type": "video_url", "video_url": {"url": "x"}}]),
        400,
        "invalid_value",
        "video_url",
        "messages[0].content[0]",
    ),
    Hostile(
        "image_url_without_url", chat([{"type": "image_url", "image_url": {}}]), 400, None, "url", f"{IMAGE_PART}.url"
    ),
    Hostile(
        "image_url_is_a_string",
        chat([{"type": "image_url", "image_url": "http://x/a.png"}]),
        400,
        "invalid_type",
        "object",
        IMAGE_PART,
    ),
    Hostile(
        "image_placeholder_in_text",
        chat("Look: <|vision_start|><|image_pad|><|vision_end|>"),
        400,
        None,
        "placeholder",
        "messages",
    ),
    Hostile(
        "nine_images",
        chat([{"type": "image_url", "image_url": {"url": data_url(png(32, 32, i))}} for i in range(9)]),
        400,
        "too_many_images",
        "limit is 8",
        "messages",
    ),
    Hostile(
        "image_in_an_assistant_message",
        {
            "model": MODEL,
            "max_tokens": 2,
            "messages": [
                {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(PHOTO)}}]},
                {"role": "user", "content": "Hi."},
            ],
        },
        400,
        None,
        "only in user messages",
        IMAGE_PART,
    ),
    Hostile(
        "min_pixels_over_max_pixels",
        image_chat(data_url(PHOTO), min_pixels=5000, max_pixels=1000),
        400,
        None,
        "must not exceed",
        IMAGE_PART,
    ),
    Hostile("max_pixels_2_pow_40", image_chat(data_url(PHOTO), max_pixels=2**40), 400, "invalid_request", "max_pixels"),
    # min_pixels/max_pixels have no upper bound: past 2**64 they cannot be packed for the engine.
    Hostile("min_pixels_2_pow_64", image_chat(data_url(PHOTO), min_pixels=2**64), 400, None, "min_pixels"),
    # --- image URLs: sources the service must never read
    Hostile(
        "file_etc_passwd",
        image_chat("file:///etc/passwd"),
        400,
        "invalid_image_url",
        "local image paths are not allowed",
        IMAGE_PART,
    ),
    Hostile(
        "absolute_path_etc_passwd",
        image_chat("/etc/passwd"),
        400,
        "invalid_image_url",
        "local image paths are not allowed",
        IMAGE_PART,
    ),
    Hostile("url_127_0_0_1", refused_url("http://127.0.0.1:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_localhost", refused_url("http://localhost:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_ipv6_loopback", refused_url("http://[::1]:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_ipv4_mapped_ipv6", refused_url("http://[::ffff:127.0.0.1]:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_hex_0x7f000001", refused_url("http://0x7f000001:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_decimal_2130706433", refused_url("http://2130706433:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_0_0_0_0", refused_url("http://0.0.0.0:{port}/photo.png"), **FORBIDDEN),
    Hostile("url_cloud_metadata", image_chat("http://169.254.169.254/latest/meta-data/"), **FORBIDDEN),
    Hostile(
        "url_gopher",
        refused_url("gopher://127.0.0.1:{port}/_GET%20/"),
        400,
        "invalid_image_url",
        "http(s) URL",
        IMAGE_PART,
    ),
    Hostile("url_ftp", image_chat("ftp://ftp.example.com/a.png"), 400, "invalid_image_url", "http(s) URL", IMAGE_PART),
    Hostile("url_malformed", image_chat("http://[::1/a.png"), 400, "invalid_request", "invalid"),
    Hostile(
        "url_over_8192_chars",
        image_chat("https://example.com/" + "a" * 9000),
        400,
        "invalid_image_url",
        "8192",
        IMAGE_PART,
    ),
    # --- image URLs on an allowed host that misbehaves
    Hostile("redirect_to_loopback", lambda h: image_chat(f"{h.allowed}/to-loopback"), **FORBIDDEN),
    Hostile("redirect_to_cloud_metadata", lambda h: image_chat(f"{h.allowed}/to-metadata"), **FORBIDDEN),
    Hostile(
        "redirect_to_file_url", lambda h: image_chat(f"{h.allowed}/to-file"), 400, "forbidden_source", "non-http(s)"
    ),
    Hostile("redirect_loop", lambda h: image_chat(f"{h.allowed}/loop"), 400, "fetch_failed", "redirects more than"),
    Hostile("url_answers_404", lambda h: image_chat(f"{h.allowed}/missing.png"), 400, "fetch_failed", "HTTP 404"),
    Hostile("url_answers_html", lambda h: image_chat(f"{h.allowed}/page.html"), 400, "invalid_image", "not an image"),
    Hostile("url_answers_zero_bytes", lambda h: image_chat(f"{h.allowed}/empty.png"), 400, "invalid_image", "empty"),
    Hostile(
        "url_declares_1GB", lambda h: image_chat(f"{h.allowed}/declares-1GB.png"), 413, "image_too_large", "larger than"
    ),
    Hostile(
        "url_streams_without_end",
        lambda h: image_chat(f"{h.allowed}/endless.png"),
        413,
        "image_too_large",
        "larger than",
    ),
    Hostile(
        "url_goes_silent", lambda h: image_chat(f"{h.allowed}/silent.png"), 400, "fetch_failed", "did not answer within"
    ),
    Hostile("url_drips_bytes", lambda h: image_chat(f"{h.allowed}/drip.png"), 400, "fetch_failed", "took over"),
    # A stream waits for its first token before the headers, so the encoder's refusal keeps its status.
    Hostile(
        "stream_with_unreachable_image",
        lambda h: {**image_chat(f"http://127.0.0.1:{h.loopback_port}/photo.png"), "stream": True},
        **FORBIDDEN,
    ),
    # --- data URLs and image bytes
    Hostile(
        "data_url_invalid_base64",
        image_chat("data:image/png;base64,@@not*base64@@"),
        400,
        "invalid_image_url",
        "not valid base64",
        IMAGE_PART,
    ),
    Hostile(
        "data_url_text_mime",
        image_chat(as_data_url(b"hello", "text/plain")),
        400,
        "invalid_image_url",
        "data:image/",
        IMAGE_PART,
    ),
    Hostile(
        "data_url_not_base64", image_chat("data:image/png,rawbytes"), 400, "invalid_image_url", "base64", IMAGE_PART
    ),
    Hostile(
        "data_url_zero_bytes",
        image_chat("data:image/png;base64,"),
        400,
        "invalid_image_url",
        "no image data",
        IMAGE_PART,
    ),
    Hostile(
        "svg_image",
        image_chat(as_data_url(b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', "image/svg+xml")),
        400,
        "invalid_image",
        "not an image",
    ),
    Hostile(
        "tiff_image",
        image_chat(as_data_url(encoded(Image.new("RGB", (40, 40)), "TIFF"), "image/tiff")),
        400,
        "unsupported_format",
        "TIFF",
    ),
    Hostile("truncated_png", image_chat(data_url(PHOTO[: len(PHOTO) // 2])), 400, "invalid_image", "truncated"),
    Hostile(
        "png_header_without_pixels",
        image_chat(data_url(png_canvas(640, 480, pixels=False))),
        400,
        "invalid_image",
        "corrupt",
    ),
    Hostile(
        "png_bomb_30000x30000",
        lambda _: image_chat(data_url(png_canvas(30000, 30000, pixels=True))),
        413,
        "image_too_large",
        "pixels",
    ),
    Hostile(
        "png_header_declaring_100000x100000",
        image_chat(data_url(png_canvas(100000, 100000, pixels=False))),
        413,
        "image_too_large",
        "pixels",
    ),
    Hostile(
        "gif_declaring_65535x65535",
        image_chat(as_data_url(gif_declaring_a_huge_screen(), "image/gif")),
        413,
        "image_too_large",
        "pixels",
    ),
    # Qwen's smart_resize refuses an aspect ratio over 200 (transformers raises the same).
    Hostile(
        "image_1x4000", image_chat(data_url(png(1, 4000, seed=1))), 400, "unsupported_aspect_ratio", "aspect ratio"
    ),
    # --- odd but valid images: each is read as transformers reads it, so each is answered
    Hostile("image_1x1", image_chat(data_url(png(1, 1, seed=2))), 200),  # upscaled to min_pixels
    Hostile("image_4x800_at_the_200_ratio", image_chat(data_url(png(4, 800, seed=3))), 200),
    Hostile("animated_gif", image_chat(as_data_url(animated_gif(), "image/gif")), 200),  # its first frame
    Hostile(
        "cmyk_jpeg",
        image_chat(as_data_url(encoded(Image.new("CMYK", (48, 32), (10, 200, 30, 5)), "JPEG"), "image/jpeg")),
        200,
    ),
    Hostile("png_16_bit_gray", image_chat(data_url(encoded(Image.new("I;16", (40, 40), 40000), "PNG"))), 200),
    Hostile(
        "png_with_alpha", image_chat(data_url(encoded(Image.new("RGBA", (40, 40), (200, 10, 10, 60)), "PNG"))), 200
    ),
    Hostile("palette_png", image_chat(data_url(palette_png(transparent=False))), 200),
    Hostile("palette_png_with_transparency", image_chat(data_url(palette_png(transparent=True))), 200),
    Hostile("jpeg_sent_as_image_png", image_chat(data_url(encoded(Image.open(io.BytesIO(PHOTO)), "JPEG"))), 200),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_request_gets_a_client_error_and_the_service_stays_healthy(case: Hostile, service, encoder, hosts):
    body = case.body(hosts) if callable(case.body) else case.body
    start = time.monotonic()
    response = httpx.post(
        f"{service.url}/v1/chat/completions",
        timeout=CLIENT_TIMEOUT_S,
        headers={"content-type": case.content_type},
        content=body if isinstance(body, bytes) else None,
        json=None if isinstance(body, bytes) else body,
    )
    took = time.monotonic() - start
    assert response.status_code < 500, f"{response.status_code}: {response.text}"
    assert took < ANSWER_WITHIN_S, f"took {took:.1f} s"
    statuses = case.status if isinstance(case.status, tuple) else (case.status,)
    assert response.status_code in statuses, f"{response.status_code}: {response.text[:2000]}"
    if response.status_code == 200:
        answer = response.json()
        assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "length", answer
        assert answer["usage"]["completion_tokens"] == 2, answer
    else:
        error = assert_openai_error(response)
        if case.code is not None:
            assert error["code"] == case.code, error
        assert case.says.lower() in error["message"].lower(), error
        if case.param is not None:
            assert error["param"] == case.param, error
        assert "root:" not in error["message"], error  # nothing of /etc/passwd comes back
    assert_healthy(service, encoder)


# ---------------------------------------------------------------- beyond one request's reply


def _watch_health(url: str, busy: threading.Thread, limit_s: float, stop_at_first: bool = False) -> list[str]:
    """Polls /health while `busy` runs; every answer slower than limit_s or not 200 is a problem."""
    problems: list[str] = []
    while busy.is_alive():
        start = time.monotonic()
        try:
            status = httpx.get(f"{url}/health", timeout=limit_s).status_code
            took = time.monotonic() - start
            if status != 200 or took > limit_s:
                problems.append(f"/health answered {status} after {took:.1f} s")
        except httpx.TimeoutException:
            problems.append(f"/health did not answer within {limit_s:g} s")
        if problems and stop_at_first:
            break
        time.sleep(0.1)
    return problems


def _post_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def send() -> None:
        start = time.monotonic()
        try:
            result["response"] = httpx.post(url, json=body, timeout=CLIENT_TIMEOUT_S)
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["took"] = time.monotonic() - start

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, result


def _refused_or_served(result: dict) -> None:
    assert "error" not in result, f"no answer: {result['error']!r} after {result['took']:.1f} s"
    response = result["response"]
    assert response.status_code < 500, response.text[:2000]
    if response.status_code != 200:
        assert_openai_error(response)


def test_many_stop_strings_do_not_stall_the_service(service, encoder):
    # 500,000 stop strings (6 MB, far under the body limit) are matched after every token on the
    # HTTP process's event loop; /health and every other stream wait meanwhile. Refusing them
    # (a 4xx) or matching them off the loop are both fine; a frozen service is not.
    body = chat(stop=[f"~zq{i}~" for i in range(500_000)], max_tokens=8, ignore_eos=True)
    busy, result = _post_in_background(f"{service.url}/v1/chat/completions", body)
    problems = _watch_health(service.url, busy, HEALTH_STALL_S)
    busy.join(CLIENT_TIMEOUT_S + 5)
    _refused_or_served(result)
    assert not problems, problems
    assert_healthy(service, encoder)


def test_one_completions_request_cannot_fan_out_without_bound(vl_ckpt, tmp_path):
    # A 10 KB /v1/completions body with 1,000 prompts and n=128 starts 128,000 engine requests
    # (admission counts it as one of max_queued_requests): the service answers /health with 503
    # for about a minute. Its own service, so whatever happens cannot touch the others.
    service = LanguageService(tmp_path, vl_ckpt, "--served-model-name", MODEL, config={"shutdown_timeout_s": 1})
    result: dict = {}
    try:
        service.wait_healthy()
        body = {"model": MODEL, "prompt": ["Hi."] * 1000, "n": 128, "max_tokens": 1}
        busy, result = _post_in_background(f"{service.url}/v1/completions", body)
        problems = _watch_health(service.url, busy, HEALTH_STALL_S, stop_at_first=True)
        assert not problems, problems
        busy.join(CLIENT_TIMEOUT_S + 5)
        _refused_or_served(result)
    finally:
        if "response" not in result and service.proc.poll() is None:
            os.killpg(service.proc.pid, signal.SIGKILL)  # still flooded: SIGTERM would wait out 30 s
            service.proc.wait(30)
        service.stop()


def test_a_declared_oversized_body_is_refused_unread(service, encoder):
    # A client that announces a terabyte must not be waited for: 413 before any byte is read.
    host, port = service.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n\r\n{"
        )
        reply = http.client.HTTPResponse(sock)
        reply.begin()
        error = json.loads(reply.read())["error"]
    assert reply.status == 413, error
    assert error["code"] == "request_too_large" and "limit" in error["message"], error
    assert_healthy(service, encoder)


def test_the_service_still_serves_after_the_hostile_requests(service, encoder, hosts):
    # Last in the file: after every hostile request above, ordinary requests still work.
    client = service.client(timeout=CLIENT_TIMEOUT_S)
    text = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is shown?"}], max_tokens=4, temperature=0
    )
    assert text.choices[0].finish_reason == "length" and text.usage.completion_tokens == 4
    for url in (data_url(png(64, 48, seed=11)), f"{hosts.allowed}/photo.png"):
        image = client.chat.completions.create(
            model=MODEL,
            max_tokens=4,
            temperature=0,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "What is shown?"},
                    ],
                }
            ],
        )
        assert image.choices[0].finish_reason == "length" and image.usage.completion_tokens == 4
        # The same text plus <|vision_start|>, <|vision_end|> and at least one image token.
        assert image.usage.prompt_tokens >= text.usage.prompt_tokens + 3, (image.usage, text.usage)
    assert_healthy(service, encoder)
