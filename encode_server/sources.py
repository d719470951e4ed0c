"""Where an image's bytes come from: raw bytes in the job, data URLs, http(s) URLs, local files.

This is the part of the service that reaches out on a client's behalf, so every path is
bounded and fenced:
- URLs (SSRF): each hostname is resolved and every address checked at connect time, inside
  httpx's connection layer, so the socket goes to the very address that was checked (no DNS
  rebinding window) and each redirect hop is checked again. Private, loopback, link-local,
  multicast, reserved and other non-global addresses are refused unless a configured network
  allows them. Proxies from the environment are ignored (they would hide the real target).
  Bytes are capped while streaming and a whole fetch has a deadline (slow-drip servers).
- Local paths: only under configured roots, after resolving symlinks and `..`; a path outside
  is refused the same whether or not it exists, so it is not an oracle for the filesystem.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ipaddress
import os
import socket
import stat
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpcore
import httpx

from encode_server.errors import EncodeFailure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_CHUNK = 64 * 1024


def is_public(ip: IPAddress) -> bool:
    """Globally routable unicast: not private, loopback, link-local, multicast, reserved, CGNAT..."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback, whatever its spelling
    return ip.is_global and not ip.is_multicast


class AddressPolicy:
    """Which IP addresses URLs may reach: public ones, plus allow-listed networks."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        self.allow = list(allow)

    def permits(self, ip: IPAddress) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return is_public(ip) or any(ip in net for net in self.allow if net.version == ip.version)


class _Forbidden(Exception):
    """Raised inside the connection layer; passes through httpcore and httpx untouched."""


class _CheckedBackend(httpcore.SyncBackend):
    """Resolves the host itself, refuses it if any address is not permitted, and connects to a
    checked address; TLS still verifies and sends SNI for the hostname, not the address."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        # All or nothing: a name that resolves to a public and a private address would let an
        # attacker pick the private one by racing or failing the public one.
        refused = [ip for ip in addresses if not self.policy.permits(ip)]
        if refused:
            raise _Forbidden(f"{host} resolves to {refused[0]}, which this service may not reach")
        error: Exception | None = None
        for ip in addresses:
            try:
                return super().connect_tcp(str(ip), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
        raise error or httpcore.ConnectError(f"{host} has no addresses")


@contextlib.contextmanager
def _as_httpx_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except httpcore.TimeoutException as exc:
        raise httpx.TimeoutException(str(exc) or "timed out", request=request) from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol) as exc:
        raise httpx.TransportError(str(exc) or type(exc).__name__, request=request) from None


class _Body(httpx.SyncByteStream):
    def __init__(self, stream, request: httpx.Request) -> None:
        self._stream, self._request = stream, request

    def __iter__(self) -> Iterator[bytes]:
        with _as_httpx_errors(self._request):
            yield from self._stream

    def close(self) -> None:
        self._stream.close()


class _CheckedTransport(httpx.BaseTransport):
    """httpx's transport over an httpcore pool whose sockets come from _CheckedBackend.
    (httpx has no public way to give its own transport a network backend.)"""

    def __init__(self, policy: AddressPolicy) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            network_backend=_CheckedBackend(policy),
            max_connections=64,
            keepalive_expiry=5.0,
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(scheme=url.raw_scheme, host=url.raw_host, port=url.port, target=url.raw_path),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        with _as_httpx_errors(request):
            response = self._pool.handle_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_Body(response.stream, request),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()


class SourceReader:
    """Turns an EncodeJob's `source` into image bytes, or raises EncodeFailure. Thread-safe."""

    def __init__(
        self,
        *,
        max_bytes: int,
        allow_networks: Sequence[IPNetwork] = (),
        local_roots: Sequence[str | Path] = (),
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        total_timeout_s: float = 30.0,
        max_redirects: int = 3,
    ) -> None:
        self.max_bytes = max_bytes
        self.local_roots = [Path(root).resolve() for root in local_roots]
        self.total_timeout_s = total_timeout_s
        self.read_timeout_s = read_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_redirects = max_redirects
        self._client = httpx.Client(
            transport=_CheckedTransport(AddressPolicy(allow_networks)),
            timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
            follow_redirects=False,  # followed by hand, each hop checked
            trust_env=False,  # no proxies or netrc from the environment
            # identity: the byte cap counts what we store; a compressed body could inflate past it.
            headers={"user-agent": "splitvl-encoder", "accept": "image/*", "accept-encoding": "identity"},
        )

    def read(self, source: bytes | str, deadline: float | None = None) -> bytes:
        """deadline (time.monotonic()) bounds a URL fetch, redirects included; default: now +
        total_timeout_s. The service passes the job's arrival + total_timeout_s, so time spent
        queued behind other fetches counts too."""
        if isinstance(source, (bytes, bytearray, memoryview)):
            return self._capped(bytes(source))
        scheme = source.split(":", 1)[0].lower() if ":" in source else ""
        if scheme == "data":
            return self._data_url(source)
        if scheme in ("http", "https"):
            return self._fetch(source, deadline if deadline is not None else time.monotonic() + self.total_timeout_s)
        if scheme == "file":
            parsed = urllib.parse.urlsplit(source)
            if parsed.netloc not in ("", "localhost"):
                raise EncodeFailure("forbidden_source", "file:// URLs must name a local file (no host).")
            return self._local(urllib.parse.unquote(parsed.path))
        if source.startswith("/"):
            return self._local(source)
        raise EncodeFailure(
            "invalid_request",
            f"An image source must be a data: URL, an http(s) URL or an absolute local path; got {source[:64]!r}.",
        )

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------ kinds

    def _capped(self, data: bytes) -> bytes:
        if not data:
            raise EncodeFailure("invalid_image", "The image payload is empty.")
        if len(data) > self.max_bytes:
            raise self._too_many_bytes()
        return data

    def _too_many_bytes(self, shown: str | None = None) -> EncodeFailure:
        what = f"The image at {shown}" if shown else "The image"
        return EncodeFailure("image_too_large", f"{what} is larger than {self.max_bytes} bytes, this service's limit.")

    def _data_url(self, url: str) -> bytes:
        meta, comma, payload = url[len("data:") :].partition(",")
        if not comma or not meta.lower().endswith(";base64"):
            raise EncodeFailure("invalid_request", "Data URLs must be base64: data:image/png;base64,<data>.")
        if len(payload) * 3 // 4 > self.max_bytes + 3:  # refuse before decoding
            raise self._too_many_bytes()
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise EncodeFailure("invalid_request", "The data URL's base64 payload is malformed.") from None
        return self._capped(data)

    def _local(self, path_text: str) -> bytes:
        if not self.local_roots:
            raise EncodeFailure("forbidden_source", "This service does not read local files; send the image bytes.")
        path = Path(path_text)
        if not path.is_absolute():
            raise EncodeFailure("invalid_request", f"Local paths must be absolute; got {path_text!r}.")
        resolved = path.resolve()  # follows symlinks and `..` as far as they exist
        if not any(resolved.is_relative_to(root) for root in self.local_roots):
            raise EncodeFailure("forbidden_source", f"{path_text} is outside the directories this service may read.")
        try:
            # O_NONBLOCK: opening a FIFO must not hang a worker; non-regular files are refused below.
            fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise EncodeFailure("fetch_failed", f"{path_text} does not exist.") from None
        except OSError as exc:
            raise EncodeFailure("fetch_failed", f"Cannot open {path_text}: {exc.strerror}.") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise EncodeFailure("fetch_failed", f"{path_text} is not a regular file.")
            if info.st_size > self.max_bytes:
                raise self._too_many_bytes()
            chunks, size = [], 0
            while size <= self.max_bytes and (chunk := os.read(fd, _CHUNK)):
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        return self._capped(b"".join(chunks))

    def _fetch(self, url: str, deadline: float) -> bytes:
        shown = _shown(url)  # errors name the URL the client sent (not where it redirected)
        if time.monotonic() > deadline:
            raise self._too_slow(shown)
        try:
            for _ in range(self.max_redirects + 1):
                request = self._client.build_request("GET", url)
                response = self._client.send(request, stream=True)
                try:
                    if not response.is_redirect:
                        return self._body(response, deadline, shown)
                    url = str(response.url.join(response.headers["location"]))
                finally:
                    response.close()
                if urllib.parse.urlsplit(url).scheme.lower() not in ("http", "https"):
                    raise EncodeFailure("forbidden_source", f"The image URL {shown} redirects to a non-http(s) URL.")
            raise EncodeFailure(
                "fetch_failed", f"The image URL {shown} redirects more than {self.max_redirects} times."
            )
        except _Forbidden as exc:
            raise EncodeFailure(
                "forbidden_source",
                f"The image URL {shown} is not reachable from this service: {exc} "
                "(private, loopback and link-local networks are refused unless the encode service's "
                "url_allow_list setting, encode.url_allow_list in splitvl up, allows them).",
            ) from None
        except httpx.ConnectTimeout:
            raise EncodeFailure(
                "fetch_failed",
                f"The image URL {shown} did not accept a connection within {self.connect_timeout_s:g} s.",
            ) from None
        except httpx.TimeoutException:
            if time.monotonic() > deadline:
                raise self._too_slow(shown) from None
            raise EncodeFailure(
                "fetch_failed", f"The image URL {shown} did not answer within {self.read_timeout_s:g} s."
            ) from None
        except httpx.InvalidURL as exc:
            raise EncodeFailure("invalid_request", f"The image URL {shown} is invalid: {exc}.") from None
        except httpx.HTTPError as exc:
            raise EncodeFailure("fetch_failed", f"Fetching the image URL {shown} failed: {exc}.") from None

    def _too_slow(self, shown: str) -> EncodeFailure:
        return EncodeFailure(
            "fetch_failed",
            f"Fetching the image URL {shown} took over {self.total_timeout_s:g} s, "
            "this service's limit for a download; send the image inline as a data URL instead.",
        )

    def _body(self, response: httpx.Response, deadline: float, shown: str) -> bytes:
        if response.status_code != 200:
            raise EncodeFailure("fetch_failed", f"The image URL {shown} answered HTTP {response.status_code}.")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self._too_many_bytes(shown)
        body = bytearray()
        # Raw: a gzip body must not inflate past the cap. No chunk size: httpx would gather a
        # whole chunk before yielding, so a server dripping a byte at a time would never be
        # checked against the deadline.
        for chunk in response.iter_raw():
            body += chunk
            if len(body) > self.max_bytes:
                raise self._too_many_bytes(shown)
            if time.monotonic() > deadline:
                raise self._too_slow(shown)
        return self._capped(bytes(body))


def _shown(url: str, limit: int = 200) -> str:
    return repr(url if len(url) <= limit else url[:limit] + "...")


def url_host(source: bytes | str) -> str | None:
    """The host of an http(s) source (what fetches are limited per), or None for other kinds."""
    if not isinstance(source, str) or not source[:8].lower().startswith(("http://", "https://")):
        return None
    try:
        return (urllib.parse.urlsplit(source).hostname or "").lower()
    except ValueError:  # a malformed URL: read() answers it with a clear error
        return ""
