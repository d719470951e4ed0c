"""The tensor-parallel ranks: rank 0 is the engine process, ranks 1..N-1 are workers it starts.

Rank 0's scheduler plans every step. The workers (rank_worker.py) are started with subprocess,
not multiprocessing: the engine process is the launcher's daemon child, and a daemon may not
have children of its own. All ranks meet in one torch.distributed process group (gloo on CPUs;
on GPUs NCCL for device tensors with gloo beside it for host ones) through a TCPStore that rank
0 serves on a free local port.

Each step, rank 0 writes the encoded plan (step_plan.py) down every worker's stdin. A pipe, not
a collective: a worker waits for the next step without a timeout (an idle service has no hung
rank), and reads EOF once rank 0 has gone. The step's encoder rows follow as one broadcast over
the group, from rank 0's device to each worker's (NCCL between GPUs). Then every rank runs the
same forward; its collectives (models/parallel.py) join them.

A rank that exits ends the engine: a monitor thread polls the workers and, when one has gone,
logs which, kills the others and exits the process, so the launcher ends the service non-zero
and a supervisor restarts it. A rank that hangs is caught by the collectives' timeout
(`distributed_timeout_s`): rank 0's step raises, which ends the engine the same way.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import BinaryIO

import torch
import torch.distributed as dist

from language_server.engine.step_plan import EagerStep, StepPlan, decode_plan, encode_plan
from language_server.settings import LanguageSettings
from models.parallel import TensorParallel

log = logging.getLogger(__name__)

_MONITOR_POLL_S = 0.1
_STOP_WAIT_S = 5.0
_EXIT_GRACE_S = 0.5
STARTUP_TIMEOUT = timedelta(minutes=30)  # the slowest rank's load; a rank that dies is seen at once
_FRAME = struct.Struct("<Q")  # a frame on a worker's stdin: its length, then its bytes
_REPO_ROOT = str(Path(__file__).resolve().parents[2])


def write_frame(pipe: BinaryIO, data: bytes) -> None:
    pipe.write(_FRAME.pack(len(data)))
    pipe.write(data)
    pipe.flush()


def read_frame(pipe: BinaryIO) -> bytes | None:
    """The next frame, or None at EOF (rank 0 closed the pipe or is gone)."""
    head = pipe.read(_FRAME.size)
    if len(head) < _FRAME.size:
        return None
    (length,) = _FRAME.unpack(head)
    data = pipe.read(length)
    return data if len(data) == length else None


def join_group(
    store: dist.Store, rank: int, size: int, device: torch.device, step_timeout_s: float, expert_parallel: bool
) -> TensorParallel:
    """Join the ranks' process group; returns this rank's TensorParallel over the steps' group.

    Two groups, for two timeouts: the default group carries start-up (ranks load their shards at
    their own pace: minutes apart on a large model is no fault), the steps' group carries every
    step's collectives, where a rank `step_timeout_s` late is a hung one. CPU threads are shared
    out when the ranks share the host's cores."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STARTUP_TIMEOUT)
    steps = dist.new_group(list(range(size)), timeout=timedelta(seconds=step_timeout_s))
    return TensorParallel(rank, size, expert_parallel, steps)


def receive_plan(pipe: BinaryIO, tp: TensorParallel, dtype: torch.dtype, device: torch.device) -> StepPlan | None:
    """The next step's plan on a worker, its encoder rows received; None when rank 0 has stopped."""
    data = read_frame(pipe)
    if data is None:
        return None
    plan, rows_shape = decode_plan(data)
    if isinstance(plan.step, EagerStep) and rows_shape is not None:
        rows = torch.empty(rows_shape, dtype=dtype, device=device)
        dist.broadcast(rows, src=0, group=tp.group)
        plan.step.image_rows = rows
    return plan


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen


class RankGroup:
    """Rank 0's view of the ranks: start them, send each step's plan, notice one that exits."""

    def __init__(self, settings: LanguageSettings, devices: list[str], device: torch.device) -> None:
        size = settings.tensor_parallel_size
        self.store = dist.TCPStore(
            "127.0.0.1", 0, size, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False
        )
        self._closing = False
        self.workers: list[_Worker] = []
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO_ROOT, os.environ.get("PYTHONPATH")])))
        try:
            for rank in range(1, size):
                process = subprocess.Popen(
                    [sys.executable, "-m", "language_server.engine.rank_worker", str(rank), str(self.store.port)],
                    stdin=subprocess.PIPE,
                    env=env,
                )
                self.workers.append(_Worker(rank, devices[rank], process))
                start = {"settings": settings.model_dump_json(), "device": devices[rank]}
                write_frame(process.stdin, json.dumps(start).encode())
            threading.Thread(target=self._monitor, name="rank-monitor", daemon=True).start()
            self.tp = join_group(self.store, 0, size, device, settings.distributed_timeout_s, settings.expert_parallel)
        except BaseException:
            self.close()
            raise
        log.info(
            "tensor parallel: %d ranks (%s), expert_parallel=%s; workers %s",
            size,
            ", ".join(devices),
            settings.expert_parallel,
            ", ".join(f"rank {w.rank} pid {w.process.pid}" for w in self.workers),
        )

    def send(self, plan: StepPlan) -> None:
        """Hand one step to every other rank (before rank 0 executes it itself)."""
        data = encode_plan(plan)
        for worker in self.workers:
            write_frame(worker.process.stdin, data)
        step = plan.step
        if isinstance(step, EagerStep) and step.image_rows is not None:
            dist.broadcast(step.image_rows.contiguous(), src=0, group=self.tp.group)

    def _monitor(self) -> None:
        while not self._closing:
            if self._report_exited() and not self._closing:
                self._kill_workers()
                logging.shutdown()
                os._exit(1)  # the launcher sees the engine gone and ends the service non-zero
            time.sleep(_MONITOR_POLL_S)

    def _report_exited(self) -> bool:
        """Log each worker that has exited; were there any?"""
        exited = [(w, w.process.poll()) for w in self.workers if w.process.poll() is not None]
        for worker, code in exited:
            log.error(
                "tensor-parallel rank %d (pid %d, device %s) exited with code %d; stopping the engine",
                worker.rank,
                worker.process.pid,
                worker.device,
                code,
            )
        return bool(exited)

    def _kill_workers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
        for worker in self.workers:
            worker.process.wait()

    def abort(self) -> None:
        """After a failed step: say which rank went, if one did, and kill the workers now (they
        may be stuck in the step's collectives)."""
        self._closing = True
        # A killed rank's sockets close as it exits: its exit status can trail the step's error.
        deadline = time.monotonic() + _EXIT_GRACE_S
        while not (reported := self._report_exited()) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not reported:
            log.error("a step failed on rank 0 of %d tensor-parallel ranks; stopping the engine", len(self.workers) + 1)
        self._kill_workers()

    def close(self) -> None:
        """Stop the workers (EOF on their stdin ends their loop), killing any that lingers."""
        self._closing = True
        for worker in self.workers:
            try:
                worker.process.stdin.close()
            except OSError:
                pass  # it has gone already
        deadline = time.monotonic() + _STOP_WAIT_S
        for worker in self.workers:
            try:
                worker.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tensor-parallel rank %d did not stop within %.0f s; killing it", worker.rank, _STOP_WAIT_S)
        self._kill_workers()
        if dist.is_initialized():
            dist.destroy_process_group()
