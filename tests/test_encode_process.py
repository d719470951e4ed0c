"""`splitvl encode` as a real process, driven over zmq as the language service drives it:
readiness and metrics on the side port, 50 concurrent jobs from every kind of source, cache hits
shown by counters, an error result for every kind of bad input while good jobs keep flowing,
and a SIGTERM that still answers the jobs in flight.

Everything listens on 127.0.0.1; the http image server is allow-listed as 127.0.0.1/32 only,
so URLs to 127.0.0.2 (loopback, not allow-listed) must be refused.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from encode_server.images import decode_image
from encode_server.preprocess import PreprocessSettings, preprocess
from models.loader import load_model
from tests.net import free_port
from transfer.messages import EncodeError, EncodeJob, EncodeResult
from transfer.registry import make_receiver, make_sender

REPO = Path(__file__).resolve().parents[1]
MAX_IMAGE_BYTES = 200_000
MAX_DECODED_PIXELS = 4_000_000


def image_bytes(height: int, width: int, seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def smooth_image(height: int, width: int, seed: int, fmt: str) -> bytes:
    """Waves that JPEG and WebP compress to a few KB: small enough for a data URL, whose
    string form the wire caps at 8192 characters."""
    fy, fx, phase = np.random.default_rng(seed).uniform(0.02, 0.2, 3)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([127 + 120 * np.sin(fy * y * (c + 1) + fx * x + phase * c) for c in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


class EncodeProcess:
    """One `python -m splitvl encode` subprocess on ephemeral ports."""

    def __init__(self, model: Path, tmp: Path, *flags: str, config: dict | None = None) -> None:
        self.listen = f"tcp://127.0.0.1:{free_port()}"
        self.http = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / f"encode-{free_port()}.log"
        args = [
            sys.executable,
            "-m",
            "splitvl",
            "encode",
            "--model",
            str(model),
            "--listen",
            self.listen,
            "--http-port",
            self.http.rsplit(":", 1)[1],
            "--device",
            "cpu",
            "--dtype",
            "float32",
            *flags,
        ]
        if config is not None:
            path = tmp / "encode.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            args += ["--config", str(path)]
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"encode service exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.http}/health", timeout=1) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        pytest.fail(f"encode service not ready after {timeout}s:\n{self.log_path.read_text()}")

    def metrics(self) -> dict[tuple[str, tuple], float]:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Client:
    """A language-side stand-in: a receiver at the reply address, one sender per thread."""

    def __init__(self, listen: str) -> None:
        self.listen = listen
        self.inbox = make_receiver("zmq", f"tcp://127.0.0.1:{free_port()}")
        self.reply_to = self.inbox.address

    def send(self, jobs: list[EncodeJob]) -> None:
        with make_sender("zmq", self.listen) as sender:
            for job in jobs:
                sender.send(job, timeout=10)
            time.sleep(0.3)  # the sender closes with linger 0: let the last frames leave

    def receive(self, count: int, timeout: float = 30) -> dict[str, EncodeResult | EncodeError]:
        answers = {}
        deadline = time.monotonic() + timeout
        while len(answers) < count:
            msg = self.inbox.recv(timeout=max(0.0, deadline - time.monotonic()))
            assert msg is not None, f"only {len(answers)} of {count} answers arrived"
            assert msg.request_id not in answers, f"{msg.request_id} answered twice"
            answers[msg.request_id] = msg
        return answers

    def job(self, request_id: str, source: bytes | str, **options) -> EncodeJob:
        return EncodeJob(request_id, f"key-{request_id}", source, self.reply_to, options)


class _Images(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def web():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(image_bytes(64, 64, 99))
    return root, outside


@pytest.fixture(scope="module")
def service(vl_ckpt, dirs, tmp_path_factory):
    root, _ = dirs
    config = {
        "url_allow_list": ["127.0.0.1"],
        "allowed_local_roots": [str(root)],
        "workers": 4,
        "max_wait_ms": 20,
        "max_image_bytes": MAX_IMAGE_BYTES,
        "max_decoded_pixels": MAX_DECODED_PIXELS,
    }
    proc = EncodeProcess(vl_ckpt, tmp_path_factory.mktemp("encode"), config=config)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.close()


@pytest.fixture(scope="module")
def reference(vl_ckpt):
    """bytes -> (grid, rows) from our vision tower in this process, one image per forward."""
    model = load_model(vl_ckpt, part="vision", dtype=torch.float32).model
    settings = PreprocessSettings.from_pretrained(vl_ckpt)

    @torch.no_grad()
    def encode(data: bytes):
        pixel_values, grid = preprocess(decode_image(data, max_pixels_decoded=MAX_DECODED_PIXELS), settings)
        return grid, model(pixel_values, [grid])

    return encode


def test_health_and_metrics(service):
    health = service.wait_ready()
    assert health["status"] == "ready" and health["dtype"] == "float32" and health["listen"] == service.listen
    names = {name for name, _ in service.metrics()}
    for name in (
        "splitvl_encode_queue_depth",
        "splitvl_encode_batch_images_count",
        "splitvl_encode_latency_seconds_count",
        "splitvl_encode_cache_hits_total",
        "splitvl_encode_cache_misses_total",
        "splitvl_encode_bytes_sent_total",
    ):
        assert name in names
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{service.http}/nope", timeout=5)
    assert info.value.code == 404


def test_fifty_concurrent_jobs_from_every_source(service, reference, dirs, web):
    root, _ = dirs
    distinct = [smooth_image(32 + 16 * i, 200 - 12 * i, seed=i, fmt="JPEG" if i % 2 else "WEBP") for i in range(10)]
    for i, data in enumerate(distinct):
        (root / f"img{i}.png").write_bytes(data)
        _Images.files[f"/img{i}"] = data
    client = Client(service.listen)

    def source(i: int, kind: int):
        return [
            distinct[i],
            "data:image/png;base64," + base64.b64encode(distinct[i]).decode(),
            f"http://127.0.0.1:{web}/img{i}",
            str(root / f"img{i}.png"),
            f"file://{root}/img{i}.png",
        ][kind]

    jobs = [[client.job(f"t{t}-{i}", source(i, t)) for i in range(10)] for t in range(5)]
    bytes_before = service.metrics()[("splitvl_encode_bytes_sent_total", ())]
    with ThreadPoolExecutor(len(jobs)) as pool:  # five language-side senders at once
        sent = [pool.submit(client.send, batch) for batch in jobs]
        answers = client.receive(50)
        for future in sent:
            future.result()

    expected = [reference(data) for data in distinct]
    for t in range(5):
        for i in range(10):
            msg = answers[f"t{t}-{i}"]
            assert isinstance(msg, EncodeResult), msg
            assert msg.image_key == f"key-t{t}-{i}" and msg.grid_thw == expected[i][0]
            torch.testing.assert_close(msg.embeddings, expected[i][1], atol=1e-5, rtol=0)
    payload = sum(m.embeddings.numel() * 4 for m in answers.values())
    assert service.metrics()[("splitvl_encode_bytes_sent_total", ())] - bytes_before == payload


def test_a_repeated_image_is_a_cache_hit(service, web):
    data = image_bytes(96, 80, seed=123)
    _Images.files["/repeat"] = data
    client = Client(service.listen)
    client.send([client.job("first", data)])
    first = client.receive(1)["first"]
    before = service.metrics()
    # Same bytes again, then the same bytes by URL: the key is the content, not the source.
    client.send([client.job("again", data)])
    again = client.receive(1)["again"]
    client.send([client.job("by-url", f"http://127.0.0.1:{web}/repeat")])
    by_url = client.receive(1)["by-url"]
    after = service.metrics()
    hits = ("splitvl_encode_cache_hits_total", ())
    misses = ("splitvl_encode_cache_misses_total", ())
    forwards = ("splitvl_encode_batch_images_sum", ())
    assert after[hits] - before[hits] == 2
    assert after[misses] == before[misses]
    assert after[forwards] == before[forwards]  # the tower never saw them
    assert torch.equal(again.embeddings, first.embeddings) and torch.equal(by_url.embeddings, first.embeddings)
    # Other preprocessing settings are another key: a miss.
    client.send([client.job("smaller", data, max_pixels=2048)])
    assert client.receive(1)["smaller"].grid_thw != first.grid_thw
    assert service.metrics()[misses] == before[misses] + 1


def _bomb() -> bytes:
    """A small PNG whose header promises 25 megapixels."""
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_bad_input_gets_an_error_result_while_others_are_served(service, reference, dirs, web):
    root, outside = dirs
    png = image_bytes(64, 64, seed=5)
    tiff = io.BytesIO()
    Image.new("RGB", (64, 64)).save(tiff, format="TIFF")
    bad = {  # request id -> (source, options, code, a phrase the client should see)
        "not-image": (b"this is not an image", {}, "invalid_image", "not an image"),
        "truncated": (png[: len(png) // 2], {}, "invalid_image", "truncated"),
        "tiff": (tiff.getvalue(), {}, "unsupported_format", "JPEG, PNG"),
        "too-many-bytes": (os.urandom(MAX_IMAGE_BYTES + 1), {}, "image_too_large", f"{MAX_IMAGE_BYTES} bytes"),
        "bomb": (_bomb(), {}, "image_too_large", "5000x5000"),
        "aspect": (image_bytes(1, 300, seed=6), {}, "unsupported_aspect_ratio", "aspect ratio"),
        "option-type": (png, {"max_pixels": "lots"}, "invalid_request", "max_pixels"),
        "option-unknown": (png, {"resample": 2}, "invalid_request", "min_pixels and max_pixels"),
        "option-limit": (png, {"max_pixels": 10**9}, "invalid_request", "65536"),
        "scheme": ("ftp://example.com/a.png", {}, "invalid_request", "http(s) URL"),
        "data-url": ("data:image/png;base64,%%%", {}, "invalid_request", "base64"),
        "loopback": (f"http://127.0.0.2:{web}/img0", {}, "forbidden_source", "127.0.0.2"),
        "http-404": (f"http://127.0.0.1:{web}/missing", {}, "fetch_failed", "404"),
        "outside-root": (str(outside / "secret.png"), {}, "forbidden_source", "outside"),
        "dot-dot": (f"{root}/../{outside.name}/secret.png", {}, "forbidden_source", "outside"),
        "missing-file": (str(root / "nope.png"), {}, "fetch_failed", "does not exist"),
        "relative": ("images/a.png", {}, "invalid_request", "absolute"),
    }
    good = {f"good-{i}": image_bytes(48 + 8 * i, 64, seed=200 + i) for i in range(len(bad))}
    client = Client(service.listen)
    jobs = []
    for (bad_id, (source, options, _, _)), (good_id, data) in zip(bad.items(), good.items()):
        jobs += [client.job(bad_id, source, **options), client.job(good_id, data)]
    client.send(jobs)
    answers = client.receive(len(jobs))

    for request_id, (_, _, code, phrase) in bad.items():
        msg = answers[request_id]
        assert isinstance(msg, EncodeError), f"{request_id}: {msg}"
        assert (msg.code, msg.image_key) == (code, f"key-{request_id}"), f"{request_id}: {msg}"
        assert phrase in msg.message, f"{request_id}: {msg.message!r}"
        assert "Traceback" not in msg.message
    for request_id, data in good.items():
        msg = answers[request_id]
        assert isinstance(msg, EncodeResult), f"{request_id}: {msg}"
        torch.testing.assert_close(msg.embeddings, reference(data)[1], atol=1e-5, rtol=0)
    assert service.wait_ready()["status"] == "ready"
    errors = {
        labels: value for (name, labels), value in service.metrics().items() if name == "splitvl_encode_jobs_total"
    }
    assert errors[(("outcome", "forbidden_source"),)] >= 3


def test_sigterm_answers_jobs_in_flight_then_exits(vl_ckpt, tmp_path):
    # A long batching wait holds the jobs inside the service when the signal comes.
    proc = EncodeProcess(vl_ckpt, tmp_path, "--max-wait-ms", "20000")
    try:
        proc.wait_ready()
        client = Client(proc.listen)
        client.send([client.job(f"j{i}", image_bytes(64, 64 + 16 * i, seed=300 + i)) for i in range(6)])
        deadline = time.monotonic() + 20
        while proc.metrics()[("splitvl_encode_queue_depth", ())] < 6:
            assert time.monotonic() < deadline, "the jobs never reached the batcher"
            time.sleep(0.05)
        signalled = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        answers = client.receive(6, timeout=15)
        assert all(isinstance(m, EncodeResult) for m in answers.values())
        assert proc.proc.wait(15) == 0
        assert time.monotonic() - signalled < 10  # drained at once, not after the 20 s wait
    finally:
        proc.close()
