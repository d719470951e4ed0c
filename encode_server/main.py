"""The encode service as a process: logging, the HTTP side port, signals, start and drain."""

from __future__ import annotations

import logging
import signal
import time

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

    # A plain flag, not a threading.Event: the handler runs in the main thread between two
    # bytecodes, possibly while that thread holds the Event's lock inside wait(), and Event.set()
    # would then wait for that lock forever (seen: SIGTERM left the service hung).
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        service.start()
    except Exception as exc:  # any startup failure ends the process with its reason
        log.error("encode service failed to start: %s", exc, exc_info=settings.log_level == "debug")
        side_port.close()
        return 1
    while not stop:
        time.sleep(0.2)  # a signal interrupts the sleep and its handler runs at once
    log.info("stopping: finishing jobs in flight (at most %gs)", settings.shutdown_timeout_s)
    service.stop()
    side_port.close()
    return 0
