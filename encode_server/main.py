"""The encode service as a process: logging, the HTTP side port, signals, start and drain."""

from __future__ import annotations

import logging
import signal
import threading

from encode_server.service import EncodeService
from encode_server.settings import EncodeSettings
from encode_server.side_port import SidePort

log = logging.getLogger("encode_server")


def serve(settings: EncodeSettings) -> int:
    """Run until SIGTERM or SIGINT, then finish the jobs in flight. Returns the exit status."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = EncodeService(settings)
    # The side port comes up first so /health answers `loading` (503) while weights load.
    side_port = SidePort(settings.http_host, settings.http_port, service.health, service.metrics.registry)
    side_port.start()
    log.info("health and metrics at http://%s:%d/", settings.http_host, side_port.port)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service.start()
    except Exception as exc:  # noqa: BLE001 - any startup failure ends the process with its reason
        log.error("encode service failed to start: %s", exc, exc_info=settings.log_level == "debug")
        side_port.close()
        return 1
    while not stop.wait(0.5):  # a timed wait, so signal handlers run promptly
        pass
    log.info("stopping: finishing jobs in flight (at most %gs)", settings.shutdown_timeout_s)
    service.stop()
    side_port.close()
    return 0
