"""The encode service in this process (over real zmq sockets on loopback): its embeddings equal
transformers' `visual()` from the user's bytes, alone and batched with other images; identical
images in flight are encoded once; admission control; health pings.

The reference path is what a transformers user runs: PIL.Image.open -> exif_transpose ->
AutoImageProcessor (PIL backend) -> model.visual -> cat([pooler_output, *deepstack_features]).
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from prometheus_client import CollectorRegistry

from encode_server.service import EncodeService
from encode_server.settings import load_settings
from tests.net import free_tcp_address
from transfer.content_key import content_key
from transfer.messages import EncodeError, EncodeJob, EncodeResult, HealthPing, HealthPong
from transfer.registry import make_receiver, make_sender


def image_bytes(height: int, width: int, seed: int, fmt: str = "PNG", mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


@pytest.fixture(scope="module")
def reference(vl_ckpt):
    """bytes (+ optional max_pixels) -> (grid, transformers' visual() rows), fp32."""
    from transformers import AutoImageProcessor

    from tests.reference import hf_model

    processor = AutoImageProcessor.from_pretrained(vl_ckpt)
    visual = hf_model(vl_ckpt).model.visual

    @torch.no_grad()
    def encode(data: bytes, max_pixels: int | None = None) -> tuple[tuple[int, int, int], torch.Tensor]:
        image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        kwargs = {"size": {"shortest_edge": 1024, "longest_edge": max_pixels}} if max_pixels else {}
        inputs = processor(images=image, return_tensors="pt", **kwargs)
        out = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        rows = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
        return tuple(inputs["image_grid_thw"][0].tolist()), rows

    return encode


@pytest.fixture
def start(vl_ckpt):
    """start(**settings) -> (service, send(job), receive()); every service is stopped afterwards."""
    running = []

    def _start(**overrides):
        settings = load_settings(
            None,
            {
                "model": vl_ckpt,
                "listen": free_tcp_address(),
                "device": "cpu",
                "dtype": "float32",
                "http_port": 0,
                **overrides,
            },
        )
        service = EncodeService(settings)
        service.start()
        inbox = make_receiver("zmq", free_tcp_address())
        outbox = make_sender("zmq", settings.listen)
        running.append((service, inbox, outbox))

        def send(job_or_ping) -> None:
            outbox.send(job_or_ping, timeout=10)

        def receive():
            msg = inbox.recv(timeout=20)
            assert msg is not None, "no answer from the encode service within 20 s"
            return msg

        return service, inbox.address, send, receive

    yield _start
    for service, inbox, outbox in running:
        service.stop()
        inbox.close()
        outbox.close()


def test_batched_and_single_results_equal_transformers_visual(start, reference):
    service, reply_to, send, receive = start(max_wait_ms=1500, batch_token_budget=100_000)
    registry = service.metrics.registry
    # Different sizes, formats and modes; the 300x300 one is resized down (max_pixels 65536).
    images = [
        image_bytes(40, 40, 0),
        image_bytes(200, 120, 1, "JPEG"),
        image_bytes(300, 300, 2),
        image_bytes(90, 250, 3, mode="L"),
        image_bytes(64, 96, 4, mode="RGBA"),
    ]
    for i, data in enumerate(images):
        send(EncodeJob(f"batched-{i}", f"key-{i}", data, reply_to))
    results = {msg.request_id: msg for msg in (receive() for _ in images)}
    # All five went through one varlen forward together.
    assert metric(registry, "splitvl_encode_batch_images_count") == 1
    assert metric(registry, "splitvl_encode_batch_images_sum") == len(images)

    grids = set()
    for i, data in enumerate(images):
        msg = results[f"batched-{i}"]
        assert isinstance(msg, EncodeResult) and msg.image_key == f"key-{i}"
        grid, expected = reference(data)
        grids.add(grid)
        assert msg.grid_thw == grid
        assert msg.embeddings.dtype == torch.float32 and msg.embeddings.shape == expected.shape
        torch.testing.assert_close(msg.embeddings, expected, atol=1e-5, rtol=0)
    assert len(grids) == len(images)  # really of different sizes

    # One image alone in its forward, with a per-request pixel budget.
    data = image_bytes(200, 300, 5)
    send(EncodeJob("single", "key-single", data, reply_to, {"max_pixels": 4096}))
    msg = receive()
    grid, expected = reference(data, max_pixels=4096)
    assert metric(registry, "splitvl_encode_batch_images_sum") == len(images) + 1
    assert msg.grid_thw == grid == (1, 2, 4)
    torch.testing.assert_close(msg.embeddings, expected, atol=1e-5, rtol=0)


def test_identical_images_in_flight_are_encoded_once(start):
    service, reply_to, send, receive = start(max_wait_ms=1000)
    registry = service.metrics.registry
    data = image_bytes(100, 100, 7)
    for i in range(5):
        send(EncodeJob(f"same-{i}", f"key-{i}", data, reply_to))
    answers = [receive() for _ in range(5)]
    assert sorted(a.request_id for a in answers) == [f"same-{i}" for i in range(5)]
    assert all(isinstance(a, EncodeResult) for a in answers)
    assert all(torch.equal(a.embeddings, answers[0].embeddings) for a in answers)
    assert {a.request_id: a.image_key for a in answers} == {f"same-{i}": f"key-{i}" for i in range(5)}
    assert metric(registry, "splitvl_encode_batch_images_sum") == 1  # one image through the tower
    assert metric(registry, "splitvl_encode_cache_misses_total") == 1
    assert (
        metric(registry, "splitvl_encode_cache_joins_total") + metric(registry, "splitvl_encode_cache_hits_total")
    ) == 4


def test_results_report_the_content_key_of_the_bytes_read(start, tmp_path):
    """Bytes, a data URL and a file of the same image are one cache entry, and every answer names
    its content key, the identity the language side keys its prefix cache with; the job's own
    image_key is echoed untouched."""
    service, reply_to, send, receive = start(allowed_local_roots=[str(tmp_path)])
    data = image_bytes(24, 36, 8)  # small: a data URL string must fit the wire's 8192 characters
    (tmp_path / "image.png").write_bytes(data)
    sources = [data, "data:image/png;base64," + base64.b64encode(data).decode(), str(tmp_path / "image.png")]
    for i, source in enumerate(sources):
        send(EncodeJob(f"kind-{i}", f"echo-{i}", source, reply_to, {"max_pixels": 4096}))
        msg = receive()
        assert isinstance(msg, EncodeResult), msg
        assert (msg.image_key, msg.content_key) == (f"echo-{i}", content_key(data, {"max_pixels": 4096}))
    assert metric(service.metrics.registry, "splitvl_encode_cache_misses_total") == 1
    send(EncodeJob("other-options", "echo", data, reply_to, {"max_pixels": 8192}))
    assert receive().content_key == content_key(data, {"max_pixels": 8192})


def test_jobs_past_the_pending_limit_are_refused_as_overloaded(start):
    service, reply_to, send, receive = start(max_pending_jobs=2, max_wait_ms=1500)
    for i in range(3):
        send(EncodeJob(f"job-{i}", f"key-{i}", image_bytes(64, 64, 10 + i), reply_to))
    first = receive()  # the refusal comes at once; the two admitted jobs wait for their batch
    assert isinstance(first, EncodeError) and first.code == "overloaded" and first.request_id == "job-2"
    assert "retry" in first.message
    rest = [receive(), receive()]
    assert sorted(m.request_id for m in rest) == ["job-0", "job-1"]
    assert all(isinstance(m, EncodeResult) for m in rest)
    assert service.metrics.registry.get_sample_value("splitvl_encode_jobs_total", {"outcome": "overloaded"}) == 1


def test_health_ping_is_answered_with_load(start):
    service, reply_to, send, receive = start()
    send(HealthPing(reply_to, 7, 12.5))
    pong = receive()
    assert isinstance(pong, HealthPong)
    assert (pong.seq, pong.sent_at, pong.ready, pong.service_id) == (7, 12.5, True, service.service_id)
    assert (pong.queued, pong.running) == (0, 0)


def refused(service, reason: str) -> float:
    return service.metrics.registry.get_sample_value("splitvl_encode_refused_total", {"reason": reason}) or 0.0


def wait_refused(service, reason: str, count: int) -> None:
    deadline = time.monotonic() + 5
    while refused(service, reason) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert refused(service, reason) == count


def test_reply_addresses_outside_the_allow_list_get_no_connection(start):
    """A job or ping whose reply_to is not allowed is dropped (counted and logged), the service
    never connects there, and allowed clients are served as usual."""
    service, reply_to, send, receive = start(reply_to_allow_list=["tcp://127.0.0.1:*"])
    refused_to = "tcp://127.0.0.2:" + reply_to.rsplit(":", 1)[1]  # same port, another host
    send(EncodeJob("refused", "k-refused", image_bytes(32, 32, 1), refused_to))
    send(HealthPing(refused_to, 1, 0.0))
    send(EncodeJob("allowed", "k-allowed", image_bytes(32, 32, 2), reply_to))
    answer = receive()
    assert isinstance(answer, EncodeResult) and answer.request_id == "allowed"
    wait_refused(service, "reply_to", 2)
    assert refused_to not in service.outboxes.addresses()


def test_by_default_only_this_hosts_addresses_are_trusted(start):
    service, reply_to, send, receive = start()
    for remote in ("tcp://10.9.9.9:5700", "tcp://evil.example:80", "tcp://0.0.0.0:5700"):
        send(EncodeJob("remote", "k-remote", image_bytes(32, 32, 1), remote))
    send(EncodeJob("local", "k-local", image_bytes(32, 32, 2), reply_to))
    assert receive().request_id == "local"
    wait_refused(service, "reply_to", 3)
    assert service.outboxes.addresses() == [reply_to]


def test_with_a_job_token_only_jobs_that_carry_it_are_answered(start):
    service, reply_to, send, receive = start(job_token="s3cret")
    send(EncodeJob("none", "k-none", image_bytes(32, 32, 1), reply_to))
    send(EncodeJob("wrong", "k-wrong", image_bytes(32, 32, 1), reply_to, token="guess"))
    send(HealthPing(reply_to, 1, 0.0))
    send(EncodeJob("right", "k-right", image_bytes(32, 32, 2), reply_to, token="s3cret"))
    send(HealthPing(reply_to, 2, 0.0, token="s3cret"))
    answers = {type(m).__name__: m for m in (receive(), receive())}
    assert answers["EncodeResult"].request_id == "right" and answers["HealthPong"].seq == 2
    wait_refused(service, "token", 3)


class _DripServer:
    """An HTTP server that sends image bytes one per 0.2 s, noting when each download starts."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.started: list[float] = []  # time.monotonic() of each download's start
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    outer.started.append(time.monotonic())
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    for _ in range(1000):
                        self.wfile.write(b"\0")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the service hung up at its deadline

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/slow.png"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_slow_urls_never_hold_back_inline_images_and_fail_as_the_clients_error(start):
    """Slow-drip URLs on one host: at most fetch_per_host downloads from it at once, each job
    failed at its arrival + fetch_total_timeout_s with a message naming the URL and the limit,
    while an inline image sent after them is answered at once (one worker, so it would wait
    behind them if downloads ran on the workers)."""
    drip = _DripServer()
    try:
        service, reply_to, send, receive = start(
            workers=1, fetch_workers=4, fetch_per_host=1, fetch_total_timeout_s=2.0, url_allow_list=["127.0.0.1/32"]
        )
        sent = time.monotonic()
        for i in range(3):
            send(EncodeJob(f"slow-{i}", f"k-slow-{i}", f"{drip.url}?{i}", reply_to))
        send(EncodeJob("inline", "k-inline", image_bytes(32, 32, 3), reply_to))
        first = receive()
        assert isinstance(first, EncodeResult) and first.request_id == "inline"
        assert time.monotonic() - sent < 1.5
        failures = [receive() for _ in range(3)]
        assert time.monotonic() - sent < 4  # each at its arrival + 2 s, queueing included
        for failure in failures:
            assert isinstance(failure, EncodeError) and failure.code == "fetch_failed"
            assert drip.url in failure.message and "took over 2 s" in failure.message
        # One download at a time from the host: before the first one's deadline, only it had started.
        assert len([t for t in drip.started if t < sent + 1.5]) == 1
    finally:
        drip.close()
