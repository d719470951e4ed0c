"""Transfer benchmark: every transport beside the raw speed of the same link, in the same run.

    transport                      baseline (same run, same payload)
    cuda_ipc  GPU0 -> GPU1         torch copy_ of a cuda:0 tensor into a cuda:1 tensor
    zmq tcp   loopback             a plain TCP socket: sendall / recv_into a reused buffer
    shm       host shared memory   host memcpy (torch copy_ of a CPU tensor)

Payloads are EncodeResults of [rows, 8192] bf16 (16 MiB = 1024 rows, 256 MiB = 16384 rows), the
shape the real model's vision tower produces. Senders run in their own processes.

Two numbers per transport where they differ:
- stream (the bandwidth column): the sender sends a stream as fast as send() returns, as an
  encoder with many finished images does, so several messages are in flight. Timed at the
  receiver from the first to the last message of a trial (copy-out of the last one complete),
  so the number is steady-state throughput, with no start-up handshake in it. One warm-up
  trial is dropped; the median of the timed trials is reported.
- alone (cuda_ipc only): one message at a time with the link idle in between, timed from the
  sender's send() call to the receiver holding the tensor on its GPU (the processes share
  CLOCK_MONOTONIC); median over messages. Its baseline is one torch copy plus a synchronize.

Also checks, on GPUs, that cuda_ipc is bit-exact between two processes on two GPUs for bf16,
fp16 and fp32 at several sizes, empty tensors included. Run `splitvl bench transfer --help` or
`python benchmarks/transfer_gpu.py`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from transfer.messages import EncodeResult

MIB = 1 << 20
WIDTH = 8192  # H*(1+k) of the real model: 2048 * (1 + 3)
BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
# Peers start from a forkserver that has torch imported (never CUDA initialised): ~0.2 s each
# instead of a fresh interpreter's seconds. Processes that need a fresh exec (in_child_with_env)
# are spawned.
SPAWN = mp.get_context("forkserver")
SPAWN.set_forkserver_preload(["torch", "zmq", "msgpack", "transfer.bench", "transfer.registry", "transfer.region_sender",
                              "transfer.region_receiver", "transfer.zmq_transport"])
FRESH = mp.get_context("spawn")
# glibc hands each allocation over 32 MiB fresh pages from mmap, and a receiver allocates one
# per message (zmq's receive buffer, shm's copy-out). With this tunable glibc asks for
# transparent huge pages for them: 512x fewer page faults. See docs/transfer.md.
THP_MALLOC = "glibc.malloc.hugetlb=1"


@dataclass
class Row:
    name: str
    mib: int
    gbps: float
    baseline_name: str
    baseline_gbps: float
    target: float | None  # required fraction of the baseline, where the issue sets one
    note: str = ""

    def line(self) -> str:
        if not self.baseline_gbps:
            return f"{self.name:<26} {self.mib:>5} MiB {self.gbps:>9.2f} GB/s{self.note}"
        ratio = self.gbps / self.baseline_gbps
        verdict = "" if self.target is None else ("  ok" if ratio >= self.target else f"  BELOW {self.target:.0%}")
        return (f"{self.name:<26} {self.mib:>5} MiB {self.gbps:>9.2f} GB/s   {self.baseline_name:<24}"
                f" {self.baseline_gbps:>9.2f} GB/s   {ratio:>6.1%}{verdict}{self.note}")


def payload(rows: int, device: str = "cpu", dtype: torch.dtype = torch.bfloat16, seed: int = 0,
            cols: int = WIDTH) -> torch.Tensor:
    """Random bits (NaNs, infs and subnormals included): the wire must move bits, not values."""
    g = torch.Generator().manual_seed(seed)
    info = torch.iinfo(BITS[dtype])
    bits = torch.randint(info.min, info.max, (rows, cols), generator=g, dtype=BITS[dtype])
    return bits.view(dtype).to(device)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def _median_after_warmup(measure, trials: int) -> float:
    """Run one warm-up trial and `trials` timed ones; the median of the timed ones."""
    measure()
    return statistics.median(measure() for _ in range(trials))


# ------------------------------------------------------------------------------ raw links


def host_memcpy(nbytes: int, n: int, trials: int) -> float:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def trial() -> float:
        start = time.perf_counter()
        for _ in range(n):
            dst.copy_(src)
        return _gbps(nbytes * n, time.perf_counter() - start)

    return _median_after_warmup(trial, trials)


def gpu_copy(nbytes: int, n: int, src_dev: int, dst_dev: int, trials: int) -> tuple[float, float]:
    """(stream GB/s of n back-to-back copies, median seconds of one copy + synchronize)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=f"cuda:{src_dev}")
    dst = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{dst_dev}")

    def sync() -> None:
        torch.cuda.synchronize(src_dev)
        torch.cuda.synchronize(dst_dev)

    def trial() -> float:
        sync()
        start = time.perf_counter()
        for _ in range(n):
            dst.copy_(src)
        sync()
        return _gbps(nbytes * n, time.perf_counter() - start)

    stream = _median_after_warmup(trial, trials)
    alone = []
    for _ in range(max(10, trials * 4)):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        alone.append(time.perf_counter() - start)
    return stream, statistics.median(alone)


def _socket_sender(port: int, nbytes: int, n: int, trials: int, go) -> None:
    buf = memoryview(bytearray(b"\x01" * nbytes))
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(trials + 1):
            go.get()
            for _ in range(n):
                sock.sendall(buf)


def raw_socket(nbytes: int, n: int, trials: int, fresh: bool = False) -> float:
    """A plain TCP socket into one reused buffer, or (`fresh`) into a new buffer per message as
    a real receiver needs: the difference is the cost of fresh pages."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_socket_sender, args=(server.getsockname()[1], nbytes, n, trials, go), daemon=True)
        proc.start()
        conn, _ = server.accept()
        buf = memoryview(bytearray(nbytes))
        with conn:
            def trial() -> float:
                nonlocal buf
                go.put(1)
                start = time.perf_counter()
                for _ in range(n):
                    if fresh:
                        buf = memoryview(torch.empty(nbytes, dtype=torch.uint8).numpy())
                    left = nbytes
                    while left:
                        got = conn.recv_into(buf[nbytes - left:], left)
                        if not got:
                            raise RuntimeError("the socket sender died")
                        left -= got
                return _gbps(nbytes * n, time.perf_counter() - start)

            result = _median_after_warmup(trial, trials)
        proc.join(10)
    return result


# ---------------------------------------------------------------------------- transports


def core_halves() -> tuple[set[int], set[int]] | None:
    """Two disjoint sets of this process's CPUs, each made of whole physical cores (both
    hyperthreads of a core in one set), so a receiver and a sender pinned to one each never
    share a core. None when the topology cannot be read or there are fewer than 2 cores."""
    allowed = sorted(os.sched_getaffinity(0))
    cores: dict[str, set[int]] = {}
    for cpu in allowed:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                key = f.read().strip()
        except OSError:
            return None
        cores.setdefault(key, set()).add(cpu)
    groups = list(cores.values())
    if len(groups) < 2:
        return None
    half = len(groups) // 2
    return set().union(*groups[:half]), set().union(*groups[half:])


def _pin_process(cpus: set[int]) -> None:
    """Every thread of this process (zmq's I/O threads too) onto `cpus`; threads started later
    inherit it from theirs."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except OSError:  # the thread exited meanwhile
            pass


def _transport_sender(transport: str, address: str, device: str, rows: int, n: int, trials: int, go, options: dict,
                      alone: int, probe, batch: int = 1, cpus: set[int] | None = None) -> None:
    from transfer.registry import make_sender

    if cpus:
        _pin_process(cpus)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    tensor = payload(rows, device)
    with make_sender(transport, address, **options) as sender:
        for i in range(3):  # attach, map, warm the path
            sender.send(EncodeResult(f"warm-{i}", "k", (1, 1, 1), tensor), timeout=120)
        if probe is not None:
            probe.put(_probe_writes(sender, tensor, n))
        for _ in range(trials + 1):
            go.get()
            start = time.perf_counter()  # the receiver times the trial from here (one clock per machine)
            for at in range(0, n, batch):  # batch > 1: send_many, as the encode service's outbox does
                sender.send_many([EncodeResult(f"s-{start:.9f}" if i == 0 else f"m-{i}", "k", (1, 1, 1), tensor)
                                  for i in range(at, min(n, at + batch))], timeout=120)
        for i in range(alone):
            go.get()  # the receiver is idle: the last message is in and copied out
            sender.send(EncodeResult(f"t-{time.perf_counter():.9f}", "k", (1, 1, 1), tensor), timeout=120)
        go.get()  # close only once the receiver has everything: send() returns before zmq delivered


def _probe_writes(sender, tensor: torch.Tensor, n: int) -> float:
    """Diagnostics: GB/s of the backend's writes alone into the sender's lease (no protocol):
    n back-to-back writes of the payload into its first span, then the fence."""
    deadline = time.monotonic() + 30
    while True:  # wait until the receiver freed every warm-up span, so the span is ours
        with sender._cond:
            lease = sender._lease
            if lease is not None and not lease.ring.live:
                break
        if time.monotonic() > deadline:
            return float("nan")
        time.sleep(0.01)
    src = tensor.reshape(-1).view(torch.uint8)
    lease.writer.write(lease.offset, src)
    lease.writer.fence().wait()
    start = time.perf_counter()
    for _ in range(n):
        lease.writer.write(lease.offset, src)
    lease.writer.fence().wait()
    return _gbps(src.numel() * n, time.perf_counter() - start)


@dataclass
class Measured:
    stream_gbps: float
    alone_s: float | None = None  # median latency of one message alone
    probe_gbps: float | None = None  # the backend's writes alone


def transport_bandwidth(transport: str, rows: int, n: int, trials: int, *, address: str, sender_device: str = "cpu",
                        receiver_options: dict | None = None, sender_options: dict | None = None,
                        alone: int = 0, probe: bool = False, batch: int = 1, pin: bool = False) -> Measured:
    """`pin`: the receiver (this process, for the call) and the sender on disjoint physical cores."""
    halves = core_halves() if pin else None
    if pin and halves is None:
        raise RuntimeError("cannot pin: the CPU topology is unreadable or there is only one core")
    saved = os.sched_getaffinity(0)
    try:
        if halves:
            _pin_process(halves[0])
        return _transport_bandwidth(transport, rows, n, trials, address=address, sender_device=sender_device,
                                    receiver_options=receiver_options, sender_options=sender_options, alone=alone,
                                    probe=probe, batch=batch, sender_cpus=halves[1] if halves else None)
    finally:
        if halves:
            _pin_process(saved)


def _transport_bandwidth(transport: str, rows: int, n: int, trials: int, *, address: str, sender_device: str,
                         receiver_options: dict | None, sender_options: dict | None, alone: int, probe: bool,
                         batch: int, sender_cpus: set[int] | None) -> Measured:
    from transfer.registry import make_receiver

    nbytes = rows * WIDTH * 2
    with make_receiver(transport, address, **(receiver_options or {})) as receiver:
        go = SPAWN.Queue()
        probe_q = SPAWN.Queue() if probe else None
        proc = SPAWN.Process(target=_transport_sender, daemon=True, args=(
            transport, receiver.address, sender_device, rows, n, trials, go, sender_options or {}, alone, probe_q, batch,
            sender_cpus))
        proc.start()

        def take() -> EncodeResult:
            msg = receiver.recv(timeout=120)
            if msg is None:
                raise RuntimeError(f"{transport}: a message never arrived")
            if msg.embeddings.is_cuda:  # the tensor is usable once its copy-out is done
                torch.cuda.current_stream(msg.embeddings.device).synchronize()
            return msg

        for _ in range(3):
            take()
        measured = Measured(0.0)
        deadline = time.monotonic() + 120
        while probe_q is not None and measured.probe_gbps is None and time.monotonic() < deadline:
            receiver.recv(timeout=0.005)  # runs the protocol: the sender waits for its warm-up spans back
            try:
                measured.probe_gbps = probe_q.get_nowait()
            except queue.Empty:
                pass

        def trial() -> float:
            """From the sender's first send() call to the last tensor usable here. (Timing from
            the first message's arrival instead overstates a sender that runs a lease ahead of
            its copies: some of them are done before the clock starts.)"""
            go.put(1)
            msg = receiver.recv(timeout=120)
            if msg is None or not msg.request_id.startswith("s-"):
                raise RuntimeError(f"{transport}: the trial's first message never arrived")
            start = float(msg.request_id[2:])
            for _ in range(n - 1):
                msg = receiver.recv(timeout=120)
                if msg is None:
                    raise RuntimeError(f"{transport}: a message never arrived")
            if msg.embeddings.is_cuda:
                torch.cuda.current_stream(msg.embeddings.device).synchronize()
            return _gbps(nbytes * n, time.perf_counter() - start)

        measured.stream_gbps = _median_after_warmup(trial, trials)
        latencies = []
        for _ in range(alone):
            time.sleep(0.002)  # let the sender's control traffic settle
            go.put(1)
            msg = take()
            latencies.append(time.perf_counter() - float(msg.request_id[2:]))
        if latencies:
            measured.alone_s = statistics.median(latencies)
        go.put(1)
        proc.join(30)
    return measured


# ----------------------------------------------------------------- per-stage breakdown


STAGES = ["send() call", "send() -> DATA to zmq", "DATA to zmq -> receiver reads", "read -> recv() returns",
          "recv() -> tensor ready", "total (send() call -> tensor ready)"]


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads: Python, I/O, zmq
    return usage.ru_utime + usage.ru_stime


def _maybe_profiler():
    """A cProfile.Profile when SPLITVL_TRANSFER_PROFILE=1 (diagnostics for --breakdown), else None."""
    if os.environ.get("SPLITVL_TRANSFER_PROFILE") != "1":
        return None
    import cProfile

    return cProfile.Profile()


def _print_profile(profiler, title: str) -> None:
    if profiler is None:
        return
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(18)
    print(f"\n-- python profile: {title}\n{buf.getvalue()}", flush=True)


def _breakdown_sender(transport: str, address: str, device: str, rows: int, n: int, alone: int, go, out,
                      options: dict) -> None:
    from transfer.registry import make_sender

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    tensor = payload(rows, device)
    handed: list[float] = []
    with make_sender(transport, address, **options) as sender:
        send_data = sender._send_data

        def timed_send_data(sock, job):  # the moment the DATA goes to zmq, in whichever thread
            handed.append(time.perf_counter())
            return send_data(sock, job)

        sender._send_data = timed_send_data
        for i in range(3):
            sender.send(EncodeResult(f"warm-{i}", "k", (1, 1, 1), tensor), timeout=120)
        go.get()
        profiler = _maybe_profiler()
        if profiler:
            profiler.enable()
        cpu, start = _cpu_s(), time.perf_counter()
        for i in range(n):
            sender.send(EncodeResult(f"m-{i}", "k", (1, 1, 1), tensor), timeout=120)
        busy = time.perf_counter() - start
        if profiler:
            profiler.disable()
        _print_profile(profiler, f"sender send() (caller thread), {n} messages streamed")
        go.get()  # the receiver has them all
        out.put(((_cpu_s() - cpu) / n, busy / n))
        times = []
        for i in range(alone):
            go.get()
            handed.clear()
            t0 = time.perf_counter()
            sender.send(EncodeResult(f"t-{t0:.9f}", "k", (1, 1, 1), tensor), timeout=120)
            t1 = time.perf_counter()
            time.sleep(0.002)
            times.append((t0, t1, handed[0] if handed else float("nan")))
        out.put(times)
        go.get()


def breakdown(transport: str, rows: int, n: int, alone: int, *, address: str, sender_device: str = "cpu",
              receiver_options: dict | None = None, sender_options: dict | None = None) -> dict[str, float]:
    """Where one message's time goes, in seconds (medians over `alone` messages sent one at a
    time: the STAGES), and what a stream of `n` costs per message: `stream` (wall), `sender
    send() busy`, `sender cpu` and `receiver cpu` (user + system time of all of the process's
    threads) and `FREEs per DATA`. Both processes read the same CLOCK_MONOTONIC."""
    from transfer.registry import make_receiver

    with make_receiver(transport, address, **(receiver_options or {})) as receiver:
        go, out = SPAWN.Queue(), SPAWN.Queue()
        proc = SPAWN.Process(target=_breakdown_sender, daemon=True, args=(
            transport, receiver.address, sender_device, rows, n, alone, go, out, sender_options or {}))
        proc.start()
        read_at: list[float] = []
        on_frames, reply = receiver._on_frames, receiver._reply
        frees = [0]

        def timed_on_frames(frames):
            read_at.append(time.perf_counter())
            return on_frames(frames)

        def counted_reply(identity, kind, **fields):
            frees[0] += kind == b"free"
            return reply(identity, kind, **fields)

        receiver._on_frames, receiver._reply = timed_on_frames, counted_reply

        def take() -> EncodeResult:
            msg = receiver.recv(timeout=120)
            if msg is None:
                raise RuntimeError(f"{transport}: a message never arrived")
            return msg

        def ready(msg: EncodeResult) -> None:
            if msg.embeddings.is_cuda:
                torch.cuda.current_stream(msg.embeddings.device).synchronize()

        for _ in range(3):
            ready(take())
        go.put(1)
        ready(take())
        cpu, start, frees[0] = _cpu_s(), time.perf_counter(), 0
        for _ in range(n - 1):
            msg = take()
        ready(msg)
        result = {"stream": (time.perf_counter() - start) / (n - 1), "receiver cpu": (_cpu_s() - cpu) / (n - 1),
                  "FREEs per DATA": frees[0] / (n - 1)}
        go.put(1)
        result["sender cpu"], result["sender send() busy"] = out.get(timeout=120)
        rows_out = []
        profiler = _maybe_profiler()
        for _ in range(alone):
            time.sleep(0.002)
            read_at.clear()
            go.put(1)
            if profiler:
                profiler.enable()
            msg = take()
            returned = time.perf_counter()
            if profiler:
                profiler.disable()
            ready(msg)
            rows_out.append((read_at[-1], returned, time.perf_counter()))
        _print_profile(profiler, f"receiver recv(), {alone} messages alone")
        go.put(1)
        sent = out.get(timeout=120)
        proc.join(30)
    for name, values in zip(STAGES, zip(*[(t1 - t0, io - t1, rd - io, ret - rd, done - ret, done - t0)
                                          for (t0, t1, io), (rd, ret, done) in zip(sent, rows_out)])):
        result[name] = statistics.median(values)
    return result


def print_breakdown(label: str, nbytes: int, result: dict[str, float]) -> None:
    print(f"\n{label}, {nbytes / MIB:g} MiB messages")
    print("  one message alone (medians; a negative 'send() -> DATA to zmq': sent inside send() by the caller):")
    for name in STAGES:
        print(f"    {name:<38} {result[name] * 1e6:9.1f} us")
    print(f"  stream: {result['stream'] * 1e6:.1f} us per message ({_gbps(nbytes, result['stream']):.2f} GB/s); "
          f"sender send() returns every {result['sender send() busy'] * 1e6:.1f} us; cpu per message: "
          f"sender {result['sender cpu'] * 1e6:.1f} us, receiver {result['receiver cpu'] * 1e6:.1f} us; "
          f"FREEs per DATA {result['FREEs per DATA']:.2f}", flush=True)


def _child_entry(result, fn, args, kwargs) -> None:
    try:
        result.put(fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - report, don't hang the parent
        result.put(exc)


def in_child_with_env(env: dict[str, str], fn, *args, **kwargs):
    """Run fn(*args, **kwargs) in a fresh process started with `env` added (e.g. GLIBC_TUNABLES,
    which glibc reads only at start), and return its result."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = FRESH.Queue()
        proc = FRESH.Process(target=_child_entry, args=(result, fn, args, kwargs))  # not a daemon: it starts a sender
        proc.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    value = result.get(timeout=600)
    proc.join(30)
    if isinstance(value, BaseException):
        raise value
    return value


# ----------------------------------------------------------------------- cuda_ipc exactness


# (rows, cols): empty, odd sizes that leave spans unaligned to the element, 16 MiB and 64 MiB in bf16.
EXACT_SHAPES = [(0, WIDTH), (1, 1), (7, 13), (1024, WIDTH), (4096, WIDTH)]


def _exact_plan() -> list[tuple[str, torch.dtype, tuple[int, int]]]:
    return [(f"{str(dtype)[6:]}-{r}x{c}", dtype, (r, c)) for dtype in BITS for r, c in EXACT_SHAPES]


def _exact_sender(address: str, go) -> None:
    from transfer.registry import make_sender

    torch.cuda.set_device(0)
    with make_sender("cuda_ipc", address) as sender:
        for seed, (name, dtype, (rows, cols)) in enumerate(_exact_plan()):
            sender.send(EncodeResult(name, "k", (1, 1, 1), payload(rows, "cuda:0", dtype, seed, cols)), timeout=120)
        go.get()


def cuda_ipc_exact(address: str) -> list[tuple[str, bool, str]]:
    """(case, passed, detail) for each dtype and size, sender on cuda:0, receiver on cuda:1."""
    from transfer.registry import make_receiver

    results = []
    with make_receiver("cuda_ipc", address, device="cuda:1", lease_bytes=256 * MIB, max_senders=1) as receiver:
        go = SPAWN.Queue()
        proc = SPAWN.Process(target=_exact_sender, args=(receiver.address, go), daemon=True)
        proc.start()
        for seed, (name, dtype, (rows, cols)) in enumerate(_exact_plan()):
            msg = receiver.recv(timeout=120)
            want = payload(rows, "cpu", dtype, seed, cols)
            if msg is None:
                results.append((name, False, "never arrived"))
                continue
            got = msg.embeddings
            ok = (msg.request_id == name and got.device == torch.device("cuda:1") and got.dtype == dtype
                  and got.shape == want.shape and torch.equal(got.cpu().view(BITS[dtype]), want.view(BITS[dtype])))
            results.append((name, ok, f"{tuple(got.shape)} {str(got.dtype)[6:]} on {got.device}"))
        go.put(1)
        proc.join(30)
    return results


# ------------------------------------------------------------------------------------ main


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def run_breakdown(sizes: list[int], cpu_only: bool = False, no_host: bool = False, quick: bool = False,
                  lease_depths: tuple[int, ...] = (4, 16)) -> int:
    """Per-stage breakdown of the region protocol: shm here (a 16 KiB message shows the fixed
    cost alone) and, with 2 GPUs, cuda_ipc cuda:0 -> cuda:1 at each lease depth."""
    gpus = 0 if cpu_only else torch.cuda.device_count()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {gpus} GPUs; stages timed with CLOCK_MONOTONIC "
          "in both processes")
    scale = 0.2 if quick else 1.0
    failures = 0
    cases = []
    if not no_host:
        for rows in [1] + [mib * MIB // (WIDTH * 2) for mib in sizes]:
            nbytes = rows * WIDTH * 2
            cases.append(("shm, lease 4x", "shm", rows, max(20, int(min(2000, 2048 * MIB // nbytes) * scale)), {},
                          {"lease_bytes": 4 * nbytes, "max_senders": 1}, "cpu"))
    if gpus >= 2:
        for rows in [1] + [mib * MIB // (WIDTH * 2) for mib in sizes]:
            nbytes = rows * WIDTH * 2
            for depth in lease_depths:
                cases.append((f"cuda_ipc 0->1, lease {depth}x", "cuda_ipc", rows,
                              max(50, int(min(2000, 4096 * MIB // nbytes) * scale)), {"max_pending": 2 * depth},
                              {"device": "cuda:1", "lease_bytes": depth * nbytes, "max_senders": 1}, "cuda:0"))
    for label, transport, rows, n, sender_options, receiver_options, device in cases:
        try:
            result = breakdown(transport, rows, n, 50, address=f"ipc:///tmp/splitvl-bench-{transport}.sock",
                               sender_device=device, receiver_options=receiver_options, sender_options=sender_options)
            print_breakdown(label, rows * WIDTH * 2, result)
        except Exception:  # noqa: BLE001
            failures += 1
            print(f"FAILED: {label}\n{traceback.format_exc()}", flush=True)
    return 1 if failures else 0


def run(sizes: list[int], trials: int = 3, quick: bool = False, cpu_only: bool = False, host_quick: bool = False,
        lean_host: bool = False, no_host: bool = False, lease_depths: tuple[int, ...] = (4, 16, 32), pin: bool = False,
        only: set[str] | None = None) -> int:
    """Print the exactness checks and the bandwidth table; 1 if cuda_ipc was not bit-exact or a
    measurement failed. `host_quick`: a quarter of the host messages; `lean_host`: skip the
    fresh-buffer socket and THP shm rows; `no_host`: no host rows at all;
    `lease_depths`: cuda_ipc lease sizes to measure, in messages (how many can be in flight);
    `pin`: also the deepest lease's rows with sender and receiver on disjoint physical cores;
    `only`: the cuda_ipc rows to measure, by label (e.g. to profile one)."""
    for mib in sizes:
        if (mib * MIB) % (WIDTH * 2):
            raise ValueError(f"size {mib} MiB is not a whole number of {WIDTH}-wide bf16 rows")
    gpus = 0 if cpu_only else torch.cuda.device_count()
    print(f"torch {torch.__version__}, python {sys.version.split()[0]}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} CPUs; {trials} timed trials per number after a warm-up trial, median")
    for i in range(gpus):
        print(f"cuda:{i}: {torch.cuda.get_device_name(i)}")
    if gpus >= 2:
        print(f"peer access cuda:0 -> cuda:1: {torch.cuda.can_device_access_peer(0, 1)}")
    elif not cpu_only:
        print(f"{gpus} GPU(s) visible: the cuda_ipc parts need 2; running the CPU parts only")

    failures = 0
    if gpus >= 2:
        print("\ncuda_ipc bit-exactness, sender process on cuda:0 -> receiver process on cuda:1")
        for name, ok, detail in cuda_ipc_exact("ipc:///tmp/splitvl-bench-exact.sock"):
            failures += not ok
            print(f"  {name:<20} {'ok' if ok else 'MISMATCH'}  {detail}", flush=True)

    scale = 0.1 if quick else 1.0
    host_scale = 0.25 * scale if host_quick else scale
    table: list[Row] = []
    notes: list[str] = []

    def guarded(what: str, fn, *args, **kwargs):
        """A failed measurement is reported and the run goes on (the table shows nan)."""
        nonlocal failures
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            failures += 1
            print(f"FAILED: {what}\n{traceback.format_exc()}", flush=True)
            return None

    def add(row: Row) -> None:
        table.append(row)
        print(row.line(), flush=True)  # as measured, in case the run is cut short

    def host_rows(mib: int, rows: int, nbytes: int, n_host: int, n_net: int) -> None:
        nan = float("nan")
        memcpy = host_memcpy(nbytes, n_host, trials)
        add(Row("host memcpy", mib, memcpy, "-", 0.0, None))
        sock_bw = guarded("raw socket", raw_socket, nbytes, n_net, trials) or nan
        zmq_bw = guarded("zmq", transport_bandwidth, "zmq", rows, n_net, trials, address="tcp://127.0.0.1:*")
        add(Row("zmq tcp loopback", mib, zmq_bw.stream_gbps if zmq_bw else nan, "raw TCP socket", sock_bw, 0.5))
        zmq_thp = guarded("zmq, THP malloc", in_child_with_env, {"GLIBC_TUNABLES": THP_MALLOC}, transport_bandwidth,
                          "zmq", rows, n_net, trials, address="tcp://127.0.0.1:*")
        add(Row("zmq tcp, THP malloc", mib, zmq_thp.stream_gbps if zmq_thp else nan, "raw TCP socket", sock_bw, 0.5))
        if not lean_host:
            add(Row("  raw TCP, fresh buffer", mib, guarded("raw socket", raw_socket, nbytes, n_net, trials, fresh=True)
                             or nan, "raw TCP socket", sock_bw, None, "  (per message, as zmq)"))
        shm_options = {"lease_bytes": 4 * nbytes, "max_senders": 1}
        shm = guarded("shm", transport_bandwidth, "shm", rows, n_host, trials, address="ipc:///tmp/splitvl-bench-shm.sock",
                      receiver_options=shm_options)
        add(Row("shm", mib, shm.stream_gbps if shm else nan, "host memcpy", memcpy, None))
        if not lean_host:
            shm_thp = guarded("shm, THP malloc", in_child_with_env, {"GLIBC_TUNABLES": THP_MALLOC}, transport_bandwidth,
                              "shm", rows, n_host, trials, address="ipc:///tmp/splitvl-bench-shm.sock",
                              receiver_options=shm_options)
            add(Row("shm, THP malloc", mib, shm_thp.stream_gbps if shm_thp else nan, "host memcpy", memcpy, None))

    for mib in sizes:
        rows, nbytes = mib * MIB // (WIDTH * 2), mib * MIB
        n_host = max(4, int(2048 // mib * host_scale))  # ~2 GiB per trial at full scale
        n_net = max(4, int(1024 // mib * host_scale))
        nan = float("nan")
        if not no_host:
            host_rows(mib, rows, nbytes, n_host, n_net)
        if gpus >= 2:
            # ~8 GiB per trial at full scale: a stream is timed from its first send() to its last
            # tensor, so the pipeline's fill and drain (~1 ms) must be small beside it.
            n_gpu = max(8, int(8192 // mib * scale))
            raw, raw_alone = gpu_copy(nbytes, n_gpu, 0, 1, trials)
            # (label, sender options, lease depth, batch, pinned)
            variants = [(f"cuda_ipc 0->1, lease {d}x", {}, d, 1, False) for d in lease_depths]
            # send_many: several messages per control message (the encode service's outbox sends
            # what its queue holds that way), in batches of a quarter and of half the deepest
            # lease (send_many caps a batch at half the lease, so two are in flight).
            deepest = max(lease_depths)
            for batch in sorted({max(1, deepest // 4), max(1, deepest // 2)}):
                variants.append((f"cuda_ipc 0->1, lease {deepest}x, batches of {batch}", {}, deepest, batch, False))
            variants.append((f"cuda_ipc, host fence, lease {deepest}x, batches of {deepest // 2}", {"device_fence": False},
                             deepest, deepest // 2, False))
            # For comparison, the earlier paths: the sender waits for its copy before each DATA
            # (no device fence), and the region mapped on the receiver's GPU (host-staged copies).
            variants.append(("cuda_ipc, host fence", {"device_fence": False}, 4, 1, False))
            variants.append(("cuda_ipc, mapped on owner", {"map_on": "owner"}, 4, 1, False))
            if pin:  # sender and receiver on disjoint physical cores
                variants.append((f"cuda_ipc pinned, lease {deepest}x", {}, deepest, 1, True))
                variants.append((f"cuda_ipc pinned, batches of {deepest // 2}", {}, deepest, deepest // 2, True))
            unknown = (only or set()) - {label for label, *_ in variants}
            if unknown:
                print(f"--only: no cuda_ipc row is called {sorted(unknown)}; the rows are "
                      f"{[label for label, *_ in variants]}", flush=True)
            for label, options, depth, batch, pinned in variants:
                if only and label not in only:
                    continue
                target = 0.8 if mib == 16 and not options else None
                m = guarded(f"{label} {mib} MiB", transport_bandwidth,
                            "cuda_ipc", rows, n_gpu, trials, address="ipc:///tmp/splitvl-bench-cuda.sock",
                            sender_device="cuda:0", sender_options={**options, "max_pending": 2 * depth},
                            receiver_options={"device": "cuda:1", "lease_bytes": depth * nbytes, "max_senders": 1},
                            alone=20, probe=True, batch=batch, pin=pinned) or Measured(nan, nan, nan)
                add(Row(label, mib, m.stream_gbps, "torch copy cuda:0->1", raw, target, "  (stream)"))
                add(Row(f"  {label}, alone", mib, _gbps(nbytes, m.alone_s), "one copy + sync",
                                 _gbps(nbytes, raw_alone), None, f"  ({_us(m.alone_s)} vs {_us(raw_alone)} per message)"))
                notes.append(f"{label:<26} {mib:>5} MiB: the backend's writes alone into the mapped region "
                             f"(no protocol): {m.probe_gbps:.2f} GB/s")
                print(notes[-1], flush=True)
        print(f"  {mib} MiB done", flush=True)

    for note in notes:
        print(note)
    print(f"\n{'transport':<26} {'size':>9} {'bandwidth':>14}   {'baseline (same run)':<24} {'bandwidth':>14}   ratio")
    for row in table:
        print(row.line())
    print("\ntargets: cuda_ipc >= 80% of the GPU copy at 16 MiB; zmq tcp >= 50% of the raw socket."
          f"\n'THP malloc': the receiving process started with GLIBC_TUNABLES={THP_MALLOC}")
    return 1 if failures else 0
