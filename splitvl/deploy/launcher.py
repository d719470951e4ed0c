"""Runs the planned services as children of this process: start, wait until healthy, print where
to send requests, stop both on Ctrl-C (SIGINT) or SIGTERM.

Each child runs `splitvl encode|language --config FILE` (through splitvl/deploy/child.py) in its
own process group, so a Ctrl-C at the terminal reaches the launcher alone and the launcher stops
the children in order: the language service first (it answers or fails what it is serving), then
the encoder. Their output is copied to ours, each line prefixed with the service's name. Once
both are up, a service that exits is restarted with a back-off while the other keeps serving. Should
the launcher die without cleaning up (SIGKILL), the kernel sends each child SIGTERM, so no
orphan keeps a GPU or a port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import httpx
import yaml

from splitvl.deploy.plan import Plan

_POLL_S = 0.25
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 1.0, 30.0  # restarts of a service that exited
_BACKOFF_RESET_S = 60.0  # a service that ran this long before exiting is restarted quickly again


class StartupError(RuntimeError):
    """A service failed to come up; the message says which and why."""


class _Stopped(Exception):
    """A signal asked us to stop while waiting."""


class Service:
    """One child process and the thread that copies its output to ours."""

    def __init__(self, name: str, argv: list[str], stop_timeout_s: float, out: IO[str], lock: threading.Lock):
        self.name, self.argv, self.stop_timeout_s = name, argv, stop_timeout_s
        self.out, self.lock = out, lock
        self.proc: subprocess.Popen[bytes] | None = None
        self._copier: threading.Thread | None = None
        self.started_at = 0.0
        self.restart_at: float | None = None  # set while a restart is pending
        self.recovering = False  # restarted and not yet healthy
        self._backoff_s = _BACKOFF_FIRST_S

    def next_backoff(self, now: float) -> float:
        """The wait before restarting a service that just exited: short after a long healthy
        run, doubling (up to a cap) while it keeps dying young, so a crash loop does not spin."""
        if now - self.started_at >= _BACKOFF_RESET_S:
            self._backoff_s = _BACKOFF_FIRST_S
        delay = self._backoff_s
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)
        return delay

    def start(self) -> None:
        self.started_at = time.monotonic()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # lines reach the terminal as they are logged
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self._copier = threading.Thread(target=self._copy_output, name=f"{self.name}-output", daemon=True)
        self._copier.start()

    def _copy_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        prefix = f"{self.name:<8} | "
        for raw in self.proc.stdout:
            with self.lock:
                self.out.write(prefix + raw.decode(errors="replace"))
                self.out.flush()

    @property
    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self) -> None:
        """SIGTERM (both services drain on it); SIGKILL to its process group after the timeout."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                _say(
                    self.out,
                    self.lock,
                    f"the {self.name} service did not stop within {self.stop_timeout_s:.0f} s; killing it",
                )
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._copier is not None:
            self._copier.join(5)


def _say(out: IO[str], lock: threading.Lock, message: str) -> None:
    with lock:
        out.write(f"splitvl up: {message}\n")
        out.flush()


class Launcher:
    def __init__(self, plan: Plan, startup_timeout_s: float, out: IO[str] = sys.stdout):
        self.plan, self.startup_timeout_s, self.out = plan, startup_timeout_s, out
        self.lock = threading.Lock()
        # A plain flag set by the signal handler, not a threading.Event: the handler runs in the
        # main thread, possibly while it holds the Event's lock inside wait(), and Event.set()
        # would then wait for that lock forever (seen: Ctrl-C left `splitvl up` hung).
        self.stop_requested = False

    def _on_signal(self, *_: object) -> None:
        self.stop_requested = True

    def run(self, banner: str) -> int:
        """0 after a requested stop, 1 if a service failed to start."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        with tempfile.TemporaryDirectory(prefix="splitvl-up-") as run_dir:
            services = self._services(Path(run_dir))
            try:
                self._start(services)
                with self.lock:
                    self.out.write(banner)
                    self.out.flush()
                return self._supervise(services)
            except _Stopped:
                return 0
            except StartupError as exc:
                _say(self.out, self.lock, str(exc))
                return 1
            finally:
                if self.stop_requested:
                    _say(self.out, self.lock, "stopping")
                for service in reversed(services):  # language first, then the encoder it uses
                    service.stop()

    def _services(self, run_dir: Path) -> list[Service]:
        """The children's commands; each reads its settings from a file written here."""
        services = []
        for name, settings in (("encode", self.plan.encode), ("language", self.plan.language)):
            if settings is None:
                continue
            path = run_dir / f"{name}.yaml"
            path.write_text(yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False))
            # Each drains for up to its shutdown_timeout_s; the language service then stops uvicorn
            # (5 s) and its engine (10 s).
            stop_s = settings.shutdown_timeout_s + (15 if name == "encode" else 20)
            argv = [sys.executable, "-m", "splitvl.deploy.child", str(os.getpid()), name, "--config", str(path)]
            services.append(Service(name, argv, stop_s, self.out, self.lock))
        return services

    def _start(self, services: list[Service]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        ready = {"encode": self._encode_ready, "language": self._language_ready}
        # Both at once, unless they share a GPU (see make_plan): then the encoder first.
        batches = [[service] for service in services] if self.plan.sequential else [services]
        started: list[Service] = []
        for batch in batches:
            for service in batch:
                service.start()
                started.append(service)
            for service in batch:
                self._wait(service, ready[service.name], started, deadline)

    def _wait(self, service: Service, ready: Callable[[], bool], started: list[Service], deadline: float) -> None:
        while not ready():
            if self.stop_requested:
                raise _Stopped
            for other in started:
                if other.exit_code is not None:
                    raise StartupError(
                        f"the {other.name} service exited with code {other.exit_code} while starting; its log is above"
                    )
            if time.monotonic() > deadline:
                raise StartupError(
                    f"the {service.name} service was not healthy after {self.startup_timeout_s:.0f} s "
                    "(startup_timeout_s); its log is above"
                )
            time.sleep(_POLL_S)

    def _encode_ready(self) -> bool:
        return _get(self.plan.encode_health_url) is not None

    def _language_ready(self) -> bool:
        """Healthy, and linked to the encoder started beside it, so the first image request
        already succeeds. (With --only language, encoders elsewhere may come up later.)"""
        health = _get(self.plan.language_url + "/health")
        linked = self.plan.encode is None or (health or {}).get("encoders_healthy", 0) >= 1
        return health is not None and linked

    def _supervise(self, services: list[Service]) -> int:
        """Until a stop is requested: a service that exits is started again after a back-off
        (1 s, doubling to 30 s while it keeps dying young), and the other keeps serving meanwhile:
        text requests need no encoder, and the language service re-links to a restarted encoder
        on its own. Returns 0 (a requested stop)."""
        ready = {"encode": self._encode_ready, "language": self._language_ready}
        while True:
            time.sleep(_POLL_S)  # a signal interrupts the sleep and its handler runs at once
            if self.stop_requested:
                return 0
            now = time.monotonic()
            for service in services:
                if service.exit_code is not None and service.restart_at is None:
                    delay = service.next_backoff(now)
                    _say(
                        self.out,
                        self.lock,
                        f"the {service.name} service {_how_it_ended(service.exit_code)}; "
                        f"restarting it in {delay:.0f} s"
                        + ("" if len(services) == 1 else " (the other service keeps serving)"),
                    )
                    service.restart_at = now + delay
                elif service.restart_at is not None and now >= service.restart_at:
                    service.restart_at = None
                    service.start()
                    service.recovering = True
                elif service.recovering and service.exit_code is None and ready[service.name]():
                    service.recovering = False
                    _say(
                        self.out,
                        self.lock,
                        f"the {service.name} service is back ({now - service.started_at:.1f} s after its restart)",
                    )


def _how_it_ended(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _get(url: str) -> dict | None:
    """The JSON body of a 200 answer, or None (not up yet, or not healthy)."""
    try:
        response = httpx.get(url, timeout=2.0)
        return response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):  # ValueError: not JSON, so not our service
        return None
