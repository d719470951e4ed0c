"""Real service processes for tests: `splitvl language` and `splitvl encode` subprocesses on
loopback, ephemeral ports, log files, clean shutdown checks, and test images."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import yaml
from PIL import Image

from tests.net import free_port


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def descendants(pid: int) -> list[int]:
    """Children, their children, and so on (an engine's tensor-parallel ranks are grandchildren)."""
    found, frontier = [], [pid]
    while frontier:
        kids = [k for p in frontier for k in children(p)]
        found.extend(kids)
        frontier = kids
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, timeout: float = 10.0) -> set[int]:
    """The pids still alive after `timeout` s (a child such as multiprocessing's resource tracker
    exits just after its parent, not with it)."""
    deadline = time.monotonic() + timeout
    while (left := {p for p in pids if alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


class LanguageService:
    """`python -m splitvl language ...` with a log file; stop() checks it exits cleanly with its engine."""

    def __init__(self, tmp: Path, model: Path, *extra: str, config: dict | None = None, api_key: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tmp / f"language-{self.port}.log"
        args = [sys.executable, "-m", "splitvl", "language", "--model", str(model), "--port", str(self.port), *extra]
        if config:
            path = tmp / f"language-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
            args += ["--config", str(path)]
        if api_key:
            args += ["--api-key", api_key]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.children: list[int] = []

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the language service exited ({self.proc.returncode}):\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.children = children(self.proc.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the language service did not become healthy:\n{self.log.read_text()}")

    def wait_encoder(self, timeout: float = 30.0) -> None:
        """Until /health counts the configured encoder as healthy (its first ping answered)."""
        deadline = time.monotonic() + timeout
        while self.health()["encoders_healthy"] != 1:
            assert time.monotonic() < deadline, "the encoder never became healthy"
            time.sleep(0.2)

    def client(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0, **kwargs)

    @property
    def model_name(self) -> str:
        """The name the service serves its model under (its first /v1/models entry)."""
        return self.client().models.list().data[0].id

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def stop(self) -> int | None:
        """SIGTERM; returns the exit code (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return None
        return self.proc.returncode


class EncodeService:
    """`python -m splitvl encode ...` with a log file; `listen` may reuse an old address (restart)."""

    def __init__(self, model: Path, tmp: Path, *extra: str, listen: str | None = None):
        self.listen = listen or f"tcp://127.0.0.1:{free_port()}"
        self.http_port = free_port()
        self.log = tmp / f"encode-{self.http_port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "splitvl",
                    "encode",
                    "--model",
                    str(model),
                    "--listen",
                    self.listen,
                    "--http-port",
                    str(self.http_port),
                    *extra,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 120) -> EncodeService:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the encode service exited:\n{self.log.read_text()}"
            try:
                if httpx.get(f"http://127.0.0.1:{self.http_port}/health", timeout=2).json().get("status") == "ready":
                    return self
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the encode service did not become ready:\n{self.log.read_text()}"
            time.sleep(0.2)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        """SIGTERM (graceful: in-flight jobs finish), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def png(width: int, height: int, seed: int) -> bytes:
    """Seeded noise over a gradient, so different sizes and contents give different features."""
    rng = np.random.default_rng(seed)
    grad = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    pixels = np.clip(grad * 0.5 + rng.integers(0, 128, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def data_url(png_bytes: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode()
