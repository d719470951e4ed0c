"""The HTTP side port: GET /health and GET /metrics (Prometheus text format).

The standard library's threading server is enough for two read-only endpoints, and it keeps
the encode service free of a web framework (GPU images must bring every wheel they need).
It runs in its own daemon thread from before the weights load, so /health can say `loading`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class SidePort:
    """`health()` returns (ready, body): 200 with the body when ready, else 503."""

    def __init__(
        self, host: str, port: int, health: Callable[[], tuple[bool, dict[str, Any]]], registry: CollectorRegistry
    ) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # http.server's naming
                path = self.path.split("?", 1)[0]
                if path == "/health":
                    ready, body = health()
                    self._reply(200 if ready else 503, "application/json", json.dumps(body).encode())
                elif path == "/metrics":
                    self._reply(200, CONTENT_TYPE_LATEST, generate_latest(registry))
                else:
                    self._reply(404, "application/json", b'{"error": "not found; try /health or /metrics"}')

            def _reply(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # base signature
                log.debug("http %s: " + format, self.address_string(), *args)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http side port", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
