"""Soak: `splitvl up` under mixed traffic for minutes, as users load it. Half the requests carry
one image of mixed sizes, half are streamed; then a burst at higher concurrency. Passes when no
request failed, the engine is idle with every KV block free afterwards, and no process's memory
grew by more than 10% from the end of the warm-up to the end.

    python benchmarks/soak.py                          # the tiny demo on the CPU: 32 clients 5 min, 128 clients 1 min
    python benchmarks/soak.py --config configs/qwen3-vl-30b-a3b-1gpu.yaml --model /models/...

Traffic comes from `splitvl bench serve`'s load generator (a client, as users run it); the
result JSON goes to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from splitvl.loadgen import dataset, report
from splitvl.loadgen.client import request_body
from splitvl.loadgen.load import Pacing, Target, run

RSS_GROWTH_LIMIT = 0.10
IMAGE_SIZES = "32x32,64x48,96x96,160x120,256x192"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="deployment file for `splitvl up` (default: the tiny demo)")
    p.add_argument("--model", default=None)
    p.add_argument("--phases", default="32:300,128:60", help="CLIENTS:SECONDS,... (default %(default)s)")
    p.add_argument(
        "--warmup-s",
        type=float,
        default=60.0,
        help="memory is compared from this many seconds into the first phase (default %(default)s)",
    )
    p.add_argument("--output-len", default="16:64", help="MIN:MAX output tokens (default %(default)s)")
    p.add_argument("--input-len", type=int, default=48, help="text tokens per request (about; default %(default)s)")
    p.add_argument("--out", default=None, help="result JSON (default: print only)")
    args = p.parse_args(argv)

    low, high = (int(v) for v in args.output_len.split(":"))
    requests = dataset.random_requests(
        512,
        args.input_len,
        (low + high) // 2,
        range_ratio=(high - low) / (high + low),
        image_sizes=dataset.parse_sizes(IMAGE_SIZES),
        images_per_request=1,
        image_fraction=0.5,
        stream_fraction=0.5,
        seed=0,
    )
    phases = [(int(c), float(s)) for c, s in (item.split(":") for item in args.phases.split(","))]

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "splitvl", "up", "--port", str(port)]
    command += ["--config", args.config] if args.config else []
    command += ["--model", args.model] if args.model else []
    up = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(up.stdout), daemon=True).start()
    try:
        _wait_healthy(base, up, log)
        model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        target = Target(
            url=f"{base}/v1/chat/completions",
            model=model,
            api_key=None,
            timeout_s=300,
            body=lambda r: request_body(model, r, ignore_eos=True, temperature=1.0),
        )
        memory = _MemorySampler(up.pid)
        memory.start()
        results = []
        for clients, seconds in phases:
            print(f"phase: {clients} clients for {seconds:g} s", file=sys.stderr)
            outcomes, duration = asyncio.run(
                run(target, requests, Pacing(concurrency=clients, duration_s=seconds), progress=sys.stderr.isatty())
            )
            groups = report.report(outcomes, duration, {})
            print(report.format_table(f"{clients} clients", groups, duration))
            idle = _wait_idle(base)
            results.append({"clients": clients, "seconds": seconds, "idle_after": idle, **groups})
        memory.stop()
        verdict = _verdict(results, memory.growth(args.warmup_s), _failed_steps(base))
    finally:
        os.killpg(up.pid, signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
    summary = {
        "date": datetime.date.today().isoformat(),
        "commit": _commit(),
        "host": _host(),
        "config": args.config or "tiny demo",
        "phases": results,
        "memory": memory.samples_summary(args.warmup_s),
        "verdict": verdict,
    }
    print(json.dumps({"verdict": verdict, "memory": summary["memory"]}, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return 0 if verdict["passed"] else 1


class _MemorySampler(threading.Thread):
    """RSS of every process under `root` (the launcher and its services) every few seconds."""

    def __init__(self, root: int, every_s: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.root, self.every_s = root, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._done = threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self._done.wait(self.every_s):
            self.samples.append((time.monotonic() - self.start_time, _tree_rss(self.root)))

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.samples.append((time.monotonic() - self.start_time, _tree_rss(self.root)))

    def _at(self, warmup_s: float) -> tuple[dict[str, int], dict[str, int]]:
        warm = next((s for t, s in self.samples if t >= warmup_s), self.samples[0][1])
        return warm, self.samples[-1][1]

    def growth(self, warmup_s: float) -> dict[str, float]:
        warm, last = self._at(warmup_s)
        return {name: last[name] / warm[name] - 1 for name in warm if name in last and warm[name]}

    def samples_summary(self, warmup_s: float) -> dict:
        warm, last = self._at(warmup_s)
        peak: dict[str, int] = {}
        for _, sample in self.samples:
            for name, rss in sample.items():
                peak[name] = max(peak.get(name, 0), rss)
        mib = 1 << 20
        return {
            name: {
                "after_warmup_mib": warm[name] / mib,
                "end_mib": last.get(name, 0) / mib,
                "peak_mib": peak[name] / mib,
            }
            for name in warm
        }


def _tree_rss(root: int) -> dict[str, int]:
    """RSS by process, named by its command (the engine and encoder workers are spawned children)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    out: dict[str, int] = {}
    for pid in sorted(tree):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0)
        name = _name(cmdline, pid)
        out[name] = out.get(name, 0) + rss
    return out


def _name(cmdline: str, pid: int) -> str:
    for key in ("resource_tracker", "spawn_main"):
        if key in cmdline:
            return f"{key}[{pid}]"
    for key in (" up ", " encode ", " language "):
        if key in cmdline:
            return key.strip()
    return cmdline[:40]


def _wait_idle(base: str, timeout_s: float = 60.0) -> dict:
    """/health once nothing runs or waits: every KV block should be free again."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(f"{base}/health", timeout=10).json()
        if health["running"] == 0 and health["waiting"] == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.5)


def _failed_steps(base: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("splitvl_engine_failed_steps_total "):
            return float(line.split()[1])
    return float("nan")


def _verdict(results: list[dict], growth: dict[str, float], failed_steps: float) -> dict:
    problems = []
    for phase in results:
        if phase["all"]["failed"]:
            problems.append(
                f"{phase['all']['failed']} requests failed at {phase['clients']} clients: {phase['all']['errors']}"
            )
        idle = phase["idle_after"]
        if idle["running"] or idle["waiting"] or idle["kv_blocks_free"] != idle["kv_blocks_total"]:
            problems.append(f"not idle after {phase['clients']} clients: {idle}")
    problems += [f"{name} RSS grew {g:.0%}" for name, g in growth.items() if g > RSS_GROWTH_LIMIT]
    if failed_steps != 0:
        problems.append(f"{failed_steps:g} engine steps failed")
    return {"passed": not problems, "problems": problems, "rss_growth": growth, "failed_steps": failed_steps}


def _wait_healthy(base: str, up: subprocess.Popen, log: list[str], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if up.poll() is not None:
            raise SystemExit("splitvl up exited:\n" + "".join(log[-40:]))
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("splitvl up did not become healthy:\n" + "".join(log[-40:]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _host() -> str:
    return f"{os.cpu_count()} CPUs, {os.uname().machine}"


if __name__ == "__main__":
    sys.exit(main())
