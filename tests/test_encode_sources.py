"""Image sources: raw bytes, data URLs, http(s) URLs with SSRF fences, local files under roots.

The http tests run a server on 127.0.0.1 and allow-list exactly that address; 127.0.0.2 (also
loopback on Linux, not allow-listed) stands for every address the service must refuse.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from encode_server.errors import EncodeFailure
from encode_server.sources import SourceReader, is_public

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4  # the reader never decodes; any bytes do
LOCALHOST_ONLY = [ipaddress.ip_network("127.0.0.1/32")]


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        port = self.server.server_address[1]
        routes = {
            "/img": lambda: self._send(200, IMAGE),
            "/redirect": lambda: self._redirect("/img"),
            "/redirect-loop": lambda: self._redirect("/redirect-loop"),
            "/redirect-private": lambda: self._redirect(f"http://127.0.0.2:{port}/img"),
            "/redirect-file": lambda: self._redirect("file:///etc/passwd"),
            "/missing": lambda: self._send(404, b"no"),
            "/declared-huge": lambda: self._send(200, IMAGE, length=10**9),
            "/streamed-huge": self._stream_forever,
            "/slow": self._slow,
            "/drip": self._drip,
        }
        routes.get(self.path, lambda: self._send(404, b"no"))()

    def _send(self, status: int, body: bytes, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _stream_forever(self) -> None:  # no Content-Length: only the streaming cap can stop it
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for _ in range(1000):
                self.wfile.write(b"\0" * 65536)
        except OSError:
            pass  # the reader hung up once it had enough

    def _slow(self) -> None:
        time.sleep(1.5)
        try:
            self._send(200, IMAGE)
        except OSError:
            pass  # the reader gave up long ago, as it should

    def _drip(self) -> None:  # a byte at a time, each well within the read timeout: slowloris
        self.send_response(200)
        self.send_header("Content-Length", str(len(IMAGE)))
        self.end_headers()
        try:
            for byte in IMAGE:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def reader(**kwargs) -> SourceReader:
    defaults = dict(max_bytes=64 * 1024, allow_networks=LOCALHOST_ONLY, read_timeout_s=0.5, total_timeout_s=5)
    return SourceReader(**{**defaults, **kwargs})


def failure(fn, *args) -> EncodeFailure:
    with pytest.raises(EncodeFailure) as info:
        fn(*args)
    return info.value


# ------------------------------------------------------------------------ bytes and data URLs


def test_raw_bytes_pass_through_under_the_cap():
    assert reader().read(IMAGE) == IMAGE
    err = failure(reader(max_bytes=100).read, IMAGE)
    assert err.code == "image_too_large" and "100 bytes" in err.message


def test_data_urls():
    url = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert reader().read(url) == IMAGE
    assert failure(reader().read, "data:image/png,rawtext").code == "invalid_request"
    assert failure(reader().read, "data:image/png;base64,@@@not base64@@@").code == "invalid_request"
    assert failure(reader(max_bytes=100).read, url).code == "image_too_large"


def test_unknown_source_kinds_are_invalid_requests():
    for source in ("ftp://example.com/a.png", "relative/path.png", "gopher://x"):
        err = failure(reader().read, source)
        assert err.code == "invalid_request" and "data: URL" in err.message


# -------------------------------------------------------------------------------- http(s)


def test_allow_listed_loopback_is_fetched(server):
    assert reader().read(f"{server}/img") == IMAGE


def test_loopback_is_refused_unless_allow_listed(server):
    port = server.rsplit(":", 1)[1]
    closed = reader(allow_networks=[])
    for url in (f"{server}/img", f"http://localhost:{port}/img", f"http://[::ffff:127.0.0.1]:{port}/img"):
        err = failure(closed.read, url)
        assert err.code == "forbidden_source", url
    # 127.0.0.2 is loopback too, but outside the allowed 127.0.0.1/32.
    err = failure(reader().read, f"http://127.0.0.2:{port}/img")
    assert err.code == "forbidden_source" and "127.0.0.2" in err.message and "url_allow_list" in err.message


def test_redirects_are_followed_and_each_hop_is_checked(server):
    assert reader().read(f"{server}/redirect") == IMAGE
    assert failure(reader().read, f"{server}/redirect-private").code == "forbidden_source"
    assert failure(reader().read, f"{server}/redirect-file").code == "forbidden_source"
    err = failure(reader(max_redirects=3).read, f"{server}/redirect-loop")
    assert err.code == "fetch_failed" and "more than 3" in err.message


def test_http_errors_and_timeouts_are_fetch_failed(server):
    err = failure(reader().read, f"{server}/missing")
    assert err.code == "fetch_failed" and "404" in err.message
    started = time.monotonic()
    err = failure(reader(read_timeout_s=0.3).read, f"{server}/slow")
    assert err.code == "fetch_failed" and f"{server}/slow' did not answer within 0.3 s" in err.message
    assert time.monotonic() - started < 1.4  # gave up at the read timeout, not the server's pace


def test_a_slow_drip_download_stops_at_the_total_limit_and_names_the_url(server):
    started = time.monotonic()
    err = failure(reader(total_timeout_s=1).read, f"{server}/drip")
    assert time.monotonic() - started < 1.6
    assert err.code == "fetch_failed" and f"{server}/drip'" in err.message and "took over 1 s" in err.message


def test_the_deadline_given_counts_time_spent_before_the_fetch(server):
    """The service passes the job's arrival + total: a fetch that waited its time out in the
    queue fails at once instead of starting a fresh allowance."""
    err = failure(reader(total_timeout_s=5).read, f"{server}/img", time.monotonic() - 0.1)
    assert err.code == "fetch_failed" and "took over 5 s" in err.message


def test_byte_cap_holds_for_declared_and_streamed_bodies(server):
    assert failure(reader().read, f"{server}/declared-huge").code == "image_too_large"
    started = time.monotonic()
    assert failure(reader().read, f"{server}/streamed-huge").code == "image_too_large"
    assert time.monotonic() - started < 2  # stopped at the cap, not after the server's 64 MB


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "fc00::1",
        "ff02::1",
        "::ffff:10.0.0.1",
        "::",
    ],
)
def test_non_public_addresses(address):
    assert not is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses(address):
    assert is_public(ipaddress.ip_address(address))


# ---------------------------------------------------------------------------- local files


@pytest.fixture
def roots(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.png").write_bytes(IMAGE)
    (outside / "secret.png").write_bytes(b"secret")
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "inside-link.png").symlink_to(root / "sub" / "a.png")
    return root, outside


def test_local_files_under_a_root(roots):
    root, _ = roots
    r = reader(local_roots=[root])
    assert r.read(str(root / "sub" / "a.png")) == IMAGE
    assert r.read(f"file://{root}/sub/a.png") == IMAGE
    assert r.read(str(root / "inside-link.png")) == IMAGE  # a symlink that stays inside is fine


def test_local_files_outside_the_roots_are_refused(roots):
    root, outside = roots
    r = reader(local_roots=[root])
    for path in (
        outside / "secret.png",
        root / ".." / "outside" / "secret.png",
        root / "escape.png",
        outside / "does-not-exist.png",
    ):
        err = failure(r.read, str(path))
        assert err.code == "forbidden_source", path
        assert "outside" in err.message
    assert failure(r.read, "file://otherhost/etc/passwd").code == "forbidden_source"


def test_local_files_need_configured_roots(roots):
    root, _ = roots
    err = failure(reader().read, str(root / "sub" / "a.png"))
    assert err.code == "forbidden_source" and "does not read local files" in err.message


def test_missing_and_special_local_files(roots):
    root, _ = roots
    os.mkfifo(root / "fifo")
    r = reader(local_roots=[root], max_bytes=100)
    assert failure(r.read, str(root / "nope.png")).code == "fetch_failed"
    assert failure(r.read, str(root / "fifo")).code == "fetch_failed"  # and it did not hang
    assert failure(r.read, str(root / "sub")).code == "fetch_failed"
    assert failure(r.read, str(root / "sub" / "a.png")).code == "image_too_large"
