"""Starts the language service: the engine process, then the HTTP server in this process.

Order matters: the HTTP process binds the engine's output channel first (so EngineReady and
EngineFatal cannot be lost), starts the engine, loads the tokenizer while the engine loads the
model, and serves HTTP only once the engine is ready. The HTTP port is bound before anything loads, so
a busy port is reported at once. On SIGINT/SIGTERM it drains (api/draining_server.py: no new
requests, running ones finish for up to shutdown_timeout_s, the rest end with a clean 503),
then stops uvicorn and the engine; when the engine dies it fails what is in flight and exits 1.
The engine also exits by itself if this process dies without a chance to clean up (killed), so
no orphan keeps a GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
from multiprocessing.process import BaseProcess
from types import FrameType

import uvicorn

from language_server.api.app import create_app
from language_server.api.detokenizer import TokenBytes
from language_server.api.draining_server import DrainingServer
from language_server.api.engine_client import EngineClient, EngineUnavailable
from language_server.api.metrics import Metrics
from language_server.api.model_info import ServedModel
from language_server.api.state import AppState
from language_server.parent_watch import exit_with_parent
from language_server.protocol import EngineReady
from language_server.settings import LanguageSettings

logger = logging.getLogger("splitvl.language")

_ENGINE_STOP_TIMEOUT_S = 10.0


class ServiceError(Exception):
    """The service could not start; the message says why and what to do."""


def serve(settings: LanguageSettings) -> int:
    """Run until a signal (exit 0) or an engine failure (exit 1). Raises ServiceError at startup."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_Service(settings).run())


class _Service:
    def __init__(self, settings: LanguageSettings) -> None:
        self.settings = settings
        self.stopping = False
        self.exit_code = 0

    def _on_signal(self, signum: int, _: FrameType | None) -> None:
        # Startup polls this flag; while serving, uvicorn installs its own handlers and calls
        # this one again once it has shut down (harmless).
        self.stopping = True

    async def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        # The port first: a busy one is reported now, not after the model has loaded.
        listener = _bind(self.settings.host, self.settings.port)
        ipc_dir = tempfile.mkdtemp(prefix="splitvl-language-")
        request_address, output_address = f"ipc://{ipc_dir}/requests", f"ipc://{ipc_dir}/outputs"
        client = EngineClient(request_address, output_address)
        process = multiprocessing.get_context("spawn").Process(
            target=_engine_main,
            name="splitvl-engine",
            daemon=True,
            args=(self.settings.model_dump(), request_address, output_address, os.getpid()),
        )
        with _engine_malloc_env():
            process.start()
        state = None
        try:
            model = await asyncio.to_thread(ServedModel.load, self.settings)
            token_bytes = TokenBytes(model.tokenizer)  # refuses a tokenizer we cannot detokenize, early
            ready = await self._wait_ready(client, process)
            if ready is None:
                return 0
            max_model_len = ready.max_model_len  # the engine caps the setting by its KV cache
            state = AppState(self.settings, model, token_bytes, client, Metrics(), max_model_len, ready.weights)
            # Our own access log (api/access_log.py) records how each request really ended.
            config = uvicorn.Config(
                create_app(state), lifespan="off", log_level="info", access_log=False, timeout_graceful_shutdown=5
            )
            server = DrainingServer(config, state)
            watchdog = asyncio.create_task(self._watch_engine(process, client, server))
            await server.serve(sockets=[listener])
            watchdog.cancel()
            return self.exit_code
        finally:
            listener.close()
            await client.close()
            if state is not None:
                state.workers.shutdown(wait=False, cancel_futures=True)
            _stop_engine(process)
            shutil.rmtree(ipc_dir, ignore_errors=True)

    async def _wait_ready(self, client: EngineClient, process: BaseProcess) -> EngineReady | None:
        """EngineReady, or None if a signal asked us to stop first."""
        ready = asyncio.ensure_future(client.wait_ready())
        try:
            while not ready.done():
                if self.stopping:
                    return None
                if not process.is_alive():
                    # An EngineFatal sent just before the exit may still be in flight.
                    await asyncio.wait({ready}, timeout=1.0)
                    if not ready.done():
                        raise ServiceError(
                            f"the engine process exited with code {process.exitcode} before it "
                            "was ready; see its log above"
                        )
                await asyncio.wait({ready}, timeout=0.1)
            try:
                info = ready.result()
            except EngineUnavailable as exc:
                raise ServiceError(f"the engine failed to start: {exc}") from None
            logger.info(
                "engine ready: %d KV blocks of %d tokens; weights %s; encode results arrive at %s",
                info.num_kv_blocks,
                info.block_size,
                info.weights,
                info.result_address,
            )
            return info
        finally:
            ready.cancel()

    async def _watch_engine(self, process: BaseProcess, client: EngineClient, server: DrainingServer) -> None:
        """An HTTP front without its engine is useless: fail what is in flight and exit non-zero,
        so a supervisor restarts the service."""
        while process.is_alive():
            await asyncio.sleep(0.5)
        if server.should_exit:
            return  # shutting down anyway
        reason = client.dead_reason or f"the engine process exited with code {process.exitcode}"
        logger.error("%s; shutting down", reason)
        client.mark_dead(reason)
        self.exit_code = 1
        server.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    """The HTTP listening socket, bound before anything loads; uvicorn serves on it later."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise ServiceError(
            f"cannot listen on {host}:{port}: {exc.strerror}; another process may be using the port "
            "(stop it, or choose another with --port)"
        ) from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _stop_engine(process: BaseProcess) -> None:
    if process.is_alive():
        process.terminate()
        process.join(_ENGINE_STOP_TIMEOUT_S)
    if process.is_alive():
        logger.warning("the engine did not stop within %.0f s; killing it", _ENGINE_STOP_TIMEOUT_S)
        process.kill()
    process.join()


@contextlib.contextmanager
def _engine_malloc_env():
    """Start the engine with transparent huge pages for large mallocs: zmq receives each encode
    result into a fresh buffer, and faulting it in 4 KiB at a time halved the rate of 256 MiB
    results (zmq at 43% of a raw socket on an H200 host; 63% with this). glibc reads the
    variable at process start, so it is set around the spawn only; other libcs ignore it."""
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [before, "glibc.malloc.hugetlb=1"]))
    try:
        yield
    finally:
        if before is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = before


def _engine_main(settings: dict, request_address: str, output_address: str, parent_pid: int) -> None:
    """Entry of the engine process (spawned: a fresh interpreter, safe with CUDA)."""
    # Out of the terminal's process group: Ctrl+C goes to the launcher alone, which then stops the
    # engine after uvicorn (no race between the two shutting down).
    os.setpgrp()
    exit_with_parent(parent_pid)
    try:
        from language_server.engine.process import run_engine_process

        run_engine_process(settings, request_address, output_address)
    except Exception as exc:
        # Failures before the engine's own error handling (an import error, say) still reach the
        # launcher as a message, not only as an exit code.
        traceback.print_exc()
        _send_fatal(output_address, f"{type(exc).__name__}: {exc}")
        sys.exit(1)


def _send_fatal(output_address: str, message: str) -> None:
    import zmq

    from language_server.protocol import EngineFatal, pack

    context = zmq.Context()
    socket = context.socket(zmq.PUSH)
    socket.connect(output_address)
    socket.send(pack(EngineFatal(message)))
    socket.close(linger=1000)
    context.term()
