"""Transfer benchmark: zmq and cuda_ipc, per payload size, beside a same-run GPU copy floor.

    python benchmarks/transfer_gpu.py             # = splitvl bench transfer (2 GPUs for cuda_ipc)
    python benchmarks/transfer_gpu.py --cpu-only  # zmq between host tensors only

Payloads are EncodeResults of [rows, 8192] bf16 (16 MiB = 1024 rows), the shape the real model's
vision tower produces; the sender runs in its own process. Rows per size:

    zmq tcp, host -> host          what an encoder on the CPU, or on another node, sends
    zmq tcp, cuda:0 -> cuda:1      the same GPU tensors without cuda_ipc (host staging both ways)
    cuda_ipc cuda:0 -> cuda:1      device to device into the receiver's region
    floor: torch copy_ cuda:0 -> cuda:1 in this process (no protocol, no second process)

Two numbers per row: stream (n messages sent back to back, as an encoder with many finished
images does; timed at the receiver from the sender's first send() call to the last tensor usable
there, the processes sharing CLOCK_MONOTONIC; median of the timed trials after a warm-up one)
and alone (one message with the link idle: send() call to tensor usable; median).
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's packages, for this process and the senders it spawns
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from transfer.messages import EncodeResult  # noqa: E402
from transfer.registry import make_receiver, make_sender  # noqa: E402

MIB = 1 << 20
WIDTH = 8192  # H*(1+k) of the real model: 2048 * (1 + 3)
SPAWN = mp.get_context("spawn")  # a fresh interpreter per sender: no CUDA state inherited


def _median_after_warmup(measure: Callable[[], float], trials: int) -> float:
    measure()
    return statistics.median(measure() for _ in range(trials))


def gpu_copy_floor(nbytes: int, n: int, trials: int) -> tuple[float, float]:
    """(GB/s of n back-to-back copy_ cuda:0 -> cuda:1, median seconds of one copy + synchronize)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")

    def sync() -> None:
        torch.cuda.synchronize(0)
        torch.cuda.synchronize(1)

    def trial() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            dst.copy_(src)
        sync()
        return nbytes * n / (time.perf_counter() - start) / 1e9

    stream = _median_after_warmup(trial, trials)
    alone = []
    for _ in range(20):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        alone.append(time.perf_counter() - start)
    return stream, statistics.median(alone)


def _sender(transport: str, address: str, device: str, rows: int, n: int, trials: int, alone: int, go) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    tensor = torch.randn(rows, WIDTH).to(torch.bfloat16).to(device)
    with make_sender(transport, address) as sender:
        for i in range(3):  # attach, map, warm the path
            sender.send(EncodeResult(f"warm-{i}", "k", (1, 1, 1), tensor), timeout=120)
        for _ in range(trials + 1):
            go.get()
            start = time.perf_counter()  # the receiver times the trial from here
            for i in range(n):
                sender.send(EncodeResult(f"s-{start:.9f}" if i == 0 else f"m-{i}", "k", (1, 1, 1), tensor), timeout=120)
        for _ in range(alone):
            go.get()  # the receiver is idle: the last message is in and usable
            sender.send(EncodeResult(f"t-{time.perf_counter():.9f}", "k", (1, 1, 1), tensor), timeout=120)
        go.get()  # close only once the receiver has everything: send() returns before delivery


def measure(
    transport: str,
    rows: int,
    n: int,
    trials: int,
    *,
    sender_device: str = "cpu",
    receiver_device: str = "cpu",
    receiver_options: dict | None = None,
    alone: int = 20,
) -> tuple[float, float]:
    """(stream GB/s, median seconds of one message alone) of `transport`, sender in its own
    process; each tensor counts as received once it is usable on `receiver_device`."""
    address = "ipc:///tmp/splitvl-bench-cuda.sock" if transport == "cuda_ipc" else "tcp://127.0.0.1:*"
    nbytes = rows * WIDTH * 2

    def usable(msg: EncodeResult | None) -> EncodeResult:
        if msg is None:
            raise RuntimeError(f"{transport}: a message never arrived")
        if receiver_device != "cpu":
            tensor = msg.embeddings.to(receiver_device)  # zmq: from host memory; cuda_ipc: already there
            torch.cuda.current_stream(tensor.device).synchronize()
        return msg

    with make_receiver(transport, address, **(receiver_options or {})) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(
            target=_sender, daemon=True, args=(transport, receiver.address, sender_device, rows, n, trials, alone, go)
        )
        proc.start()
        try:
            for _ in range(3):
                usable(receiver.recv(timeout=120))

            def trial() -> float:
                go.put(1)
                msg = usable(receiver.recv(timeout=120))
                start = float(msg.request_id[2:])
                for _ in range(n - 1):
                    msg = usable(receiver.recv(timeout=120))
                return nbytes * n / (time.perf_counter() - start) / 1e9

            stream = _median_after_warmup(trial, trials)
            latencies = []
            for _ in range(alone):
                time.sleep(0.002)
                go.put(1)
                msg = usable(receiver.recv(timeout=120))
                latencies.append(time.perf_counter() - float(msg.request_id[2:]))
            go.put(1)
        finally:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    return stream, statistics.median(latencies)


def _line(name: str, mib: int, gbps: float, alone_s: float, floor: tuple[float, float] | None) -> str:
    text = f"{name:<28} {mib:>5} MiB {gbps:>9.2f} GB/s {alone_s * 1e3:>9.3f} ms alone"
    if floor:
        text += f"   {gbps / floor[0]:>6.1%} of the copy stream, {floor[1] / alone_s:>6.1%} of one copy's speed"
    return text


def run(args: argparse.Namespace) -> int:
    """Print one line per transport and size; 1 if a measurement failed."""
    sizes = [int(s) for s in args.sizes.split(",")]
    for mib in sizes:
        if (mib * MIB) % (WIDTH * 2):
            raise ValueError(f"size {mib} MiB is not a whole number of {WIDTH}-wide bf16 rows")
    gpus = 0 if args.cpu_only else torch.cuda.device_count()
    print(f"torch {torch.__version__}; {args.trials} timed trials per number after a warm-up trial, median")
    for i in range(gpus):
        print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    if gpus >= 2:
        print(f"peer access cuda:0 -> cuda:1: {torch.cuda.can_device_access_peer(0, 1)}")
    elif not args.cpu_only:
        print(f"{gpus} GPU(s) visible: cuda_ipc needs 2; measuring zmq between host tensors only")
    scale = 0.1 if args.quick else 1.0
    failures = 0
    for mib in sizes:
        rows, nbytes = mib * MIB // (WIDTH * 2), mib * MIB
        n_zmq = max(4, int(1024 // mib * scale))  # ~1 GiB per trial at full scale
        n_gpu = max(8, int(8192 // mib * scale))  # ~8 GiB: a stream's fill and drain stay small beside it
        cases: list[tuple[str, Callable[[], tuple[float, float]], tuple[float, float] | None]] = [
            ("zmq tcp, host -> host", functools.partial(measure, "zmq", rows, n_zmq, args.trials), None)
        ]
        if gpus >= 2:
            floor = gpu_copy_floor(nbytes, n_gpu, args.trials)
            print(_line("floor: copy_ cuda:0 -> cuda:1", mib, floor[0], floor[1], None), flush=True)
            on_gpus = {"sender_device": "cuda:0", "receiver_device": "cuda:1"}
            region = {"device": "cuda:1", "lease_bytes": 4 * nbytes, "max_senders": 1}  # 4 messages in flight
            cases += [
                (
                    "zmq tcp, cuda:0 -> cuda:1",
                    functools.partial(measure, "zmq", rows, n_zmq, args.trials, **on_gpus),
                    floor,
                ),
                (
                    "cuda_ipc cuda:0 -> cuda:1",
                    functools.partial(
                        measure, "cuda_ipc", rows, n_gpu, args.trials, **on_gpus, receiver_options=region
                    ),
                    floor,
                ),
            ]
        for name, run_case, floor in cases:
            try:
                print(_line(name, mib, *run_case(), floor), flush=True)
            except Exception:  # report and go on with the other rows
                failures += 1
                print(f"FAILED: {name} {mib} MiB\n{traceback.format_exc()}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    from splitvl.commands.bench import add_transfer_arguments

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_transfer_arguments(parser)
    sys.exit(run(parser.parse_args()))
