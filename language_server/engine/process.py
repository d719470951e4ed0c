"""The engine process: a loop that never waits on HTTP work.

Each turn drains requests from the HTTP process (non-blocking while there is work to run),
collects encode results that arrived and grammars that finished compiling, runs one model step,
and pushes the outputs back. When there is nothing to run it sleeps in a short poll so new
requests, encode results and compiled grammars are picked up within milliseconds.
"""

from __future__ import annotations

import logging
import signal
import sys
import traceback

import zmq

from language_server.protocol import (
    AbortRequest,
    EngineFatal,
    EngineReady,
    GenerateRequest,
    Message,
    StatsRequest,
    pack,
    unpack,
)
from language_server.settings import LanguageSettings

log = logging.getLogger(__name__)

# Idle, the loop wakes this often: encodes and grammar compiles in flight are not step work
# (has_work is False while only they are pending), and are picked up on the next wake.
_IDLE_POLL_MS = 2


def run_engine_process(settings: dict, request_address: str, output_address: str) -> None:
    """Entry point of the engine process (settings = LanguageSettings.model_dump())."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine %(levelname)s %(message)s")
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 1000)
    out.connect(output_address)
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.LINGER, 0)
    try:
        inbox.bind(request_address)
        from language_server.engine.core import EngineCore  # torch import after the sockets exist

        core = EngineCore(LanguageSettings(**settings))
    except Exception as exc:  # report any start-up failure to the HTTP process
        log.error("engine failed to start: %s", traceback.format_exc())
        out.send(pack(EngineFatal(message=f"{type(exc).__name__}: {exc}")))
        out.close()
        sys.exit(1)

    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    out.send(
        pack(
            EngineReady(
                num_kv_blocks=core.blocks.num_blocks,
                block_size=core.blocks.block_size,
                result_address=core.encoders.result_address,
                max_model_len=core.max_model_len,
                weights=core.runner.weights,
            )
        )
    )
    log.info(
        "engine ready: %d KV blocks of %d tokens, encode results at %s",
        core.blocks.num_blocks,
        core.blocks.block_size,
        core.encoders.result_address,
    )
    try:
        while not stopping:
            timeout = 0 if core.has_work() else _IDLE_POLL_MS
            if inbox.poll(timeout, zmq.POLLIN):
                while True:
                    try:
                        raw = inbox.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    _send_all(out, _handle(core, unpack(raw)))
            _send_all(out, core.poll_encoders())
            _send_all(out, core.poll_grammars())
            if core.has_work():
                _send_all(out, core.step())
    except Exception as exc:  # tell the HTTP process why we are going away
        log.error("engine loop failed: %s", traceback.format_exc())
        out.send(pack(EngineFatal(message=f"{type(exc).__name__}: {exc}")))
        raise
    finally:
        core.close()
        inbox.close()
        out.close()


def _handle(core, msg: Message) -> list:
    if isinstance(msg, GenerateRequest):
        return core.add_request(msg)
    if isinstance(msg, AbortRequest):
        return core.abort(msg.request_id)
    if isinstance(msg, StatsRequest):
        return [core.stats(msg.nonce)]
    log.warning("ignored an unexpected %s from the HTTP process", type(msg).__name__)
    return []


def _send_all(sock: zmq.Socket, messages: list) -> None:
    for msg in messages:
        sock.send(pack(msg))
