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

Failure ends the engine, so the launcher ends the service non-zero and a supervisor restarts it:
- a worker that exits: a monitor thread polls the workers, logs which one went, kills the
  others and exits the process;
- a worker that hangs: each step has a deadline, `distributed_timeout_s` from the moment its plan
  is sent until its forward has finished on rank 0's device (a CUDA event the monitor polls). A
  hung rank stalls rank 0 where no collective timeout reaches: writing a plan larger than the
  pipe holds, or waiting on a collective replayed from a CUDA graph (NCCL does not time those).
  The collectives' own timeout is set beyond the deadline, as a backstop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
_DESTROY_WAIT_S = 5.0
_BACKSTOP_S = 30.0  # the collectives' timeout lies this far beyond the step deadline
STARTUP_TIMEOUT = timedelta(minutes=30)  # the slowest rank's load; a rank that dies is seen at once
_FRAME = struct.Struct("<Q")  # a frame on a worker's stdin: its length, then its bytes
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


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
    step's collectives, whose timeout backs up rank 0's step deadline. One all-reduce on the
    steps' group at once makes NCCL set up now: a fault shows at start, not at the first request,
    and its buffers are taken before the KV cache is sized from the memory left. CPU threads are
    shared out when the ranks share the host's cores."""
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=STARTUP_TIMEOUT)
    steps = dist.new_group(list(range(size)), timeout=timedelta(seconds=step_timeout_s + _BACKSTOP_S))
    dist.all_reduce(torch.zeros(1, device=device), group=steps)
    return TensorParallel(rank, size, expert_parallel, steps)


def leave_group() -> None:
    """Destroy the process group, giving up after a few seconds: with NCCL it waits for peers
    that may be gone (a failed start, a killed rank), and an engine must still exit."""
    if not dist.is_initialized():
        return
    done = threading.Thread(target=dist.destroy_process_group, name="destroy-group", daemon=True)
    done.start()
    done.join(_DESTROY_WAIT_S)
    if done.is_alive():
        log.warning("the process group did not close within %.0f s; leaving it", _DESTROY_WAIT_S)


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


def worker_env() -> dict[str, str]:
    """The workers import the code rank 0 runs: this package's root goes first on their path when
    rank 0 found it through its own path (a source checkout), and their working directory is not
    on it (PYTHONSAFEPATH), so another checkout there cannot shadow it."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    on_path = {os.path.abspath(p or os.curdir) for p in sys.path}
    if _PACKAGE_ROOT in on_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
    return env


@dataclass
class _Worker:
    rank: int
    device: str
    process: subprocess.Popen


class RankGroup:
    """Rank 0's view of the ranks: start them, send each step's plan, end the engine on a fault."""

    def __init__(self, settings: LanguageSettings, devices: list[str], device: torch.device) -> None:
        size = settings.tensor_parallel_size
        self.store = dist.TCPStore(
            "127.0.0.1", 0, size, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False
        )
        self.step_timeout_s = settings.distributed_timeout_s
        self._on_gpu = device.type == "cuda"
        self._closing = False
        self._deadline: float | None = None  # of the step in flight
        self._forward_done: torch.cuda.Event | None = None  # its forward, on rank 0's GPU
        self.broken = False  # a step failed between sending its plan and finishing its forward
        self.workers: list[_Worker] = []
        try:
            for rank in range(1, size):
                argv = [sys.executable, "-m", "language_server.engine.rank_worker", str(rank), str(self.store.port)]
                process = subprocess.Popen([*argv, str(os.getpid())], stdin=subprocess.PIPE, env=worker_env())
                self.workers.append(_Worker(rank, devices[rank], process))
                start = {"settings": settings.model_dump_json(), "device": devices[rank]}
                write_frame(process.stdin, json.dumps(start).encode())
            threading.Thread(target=self._monitor, name="rank-monitor", daemon=True).start()
            self.tp = join_group(self.store, 0, size, device, settings.distributed_timeout_s, settings.expert_parallel)
        except BaseException:
            self.abort()
            raise
        log.info(
            "tensor parallel: %d ranks (%s), expert_parallel=%s; workers %s",
            size,
            ", ".join(devices),
            settings.expert_parallel,
            ", ".join(f"rank {w.rank} pid {w.process.pid}" for w in self.workers),
        )

    @contextlib.contextmanager
    def step(self, plan: StepPlan) -> Iterator[None]:
        """Around one step's forward on rank 0: hands the plan to every other rank first, and
        keeps the step's deadline until the forward has finished on the device."""
        self._forward_done = None
        self._deadline = time.monotonic() + self.step_timeout_s
        try:
            self._send(plan)
            yield
        except BaseException:
            self.broken = True  # the ranks may be mid-step: nothing after this lines up with them
            raise
        if self._on_gpu:  # the forward is queued, not done: the monitor clears the deadline when it is
            event = torch.cuda.Event()
            event.record()
            self._forward_done = event
        else:
            self._deadline = None

    def _send(self, plan: StepPlan) -> None:
        data = encode_plan(plan)
        for worker in self.workers:
            write_frame(worker.process.stdin, data)
        step = plan.step
        if isinstance(step, EagerStep) and step.image_rows is not None:
            dist.broadcast(step.image_rows.contiguous(), src=0, group=self.tp.group)

    def _monitor(self) -> None:
        while not self._closing:
            if self._report_exited() and not self._closing:
                self._fail()
            deadline, done = self._deadline, self._forward_done
            if deadline is not None and done is not None and done.query():
                self._deadline = None
            elif deadline is not None and time.monotonic() > deadline and not self._closing:
                log.error(
                    "a step has waited %.0f s (distributed_timeout_s) for the tensor-parallel ranks: one of "
                    "them is hung; stopping the engine",
                    self.step_timeout_s,
                )
                self._fail()
            time.sleep(_MONITOR_POLL_S)

    def _fail(self) -> None:
        self._kill_workers()
        logging.shutdown()
        os._exit(1)  # the launcher sees the engine gone and ends the service non-zero

    def _report_exited(self) -> bool:
        """Log each worker that has exited; were there any?"""
        exited = [(w, w.process.poll()) for w in self.workers if w.process.poll() is not None]
        for worker, code in exited:
            if not self._closing:
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
        """After a failed step or start: say which rank went, if one did, and kill the workers now
        (they may be stuck in collectives). The process group is left as it is: closing it could
        wait on them."""
        # A killed rank's sockets close as it exits: its exit status can trail the step's error.
        deadline = time.monotonic() + _EXIT_GRACE_S
        while not (reported := self._report_exited()) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._closing = True
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
        leave_group()
