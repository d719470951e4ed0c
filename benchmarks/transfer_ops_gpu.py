"""Host cost of each per-message step of the cuda_ipc path, on this machine (one GPU is enough).

    python benchmarks/transfer_ops_gpu.py

A stream of 16 MiB messages keeps up with a 280 GB/s link only if each side's host work per
message stays under ~60 us. This prints what each step costs here, through torch and through
direct ctypes calls into the libcudart torch loaded, so the budget can be read off rather than
guessed. Copies are 4 KiB, so the GPU never backs up and only the host's share is timed.

Measured on a 2x H200 host (docs/transfer.md): the direct calls save ~4.6 us on the copy and
nothing on events, far too little against the ~120 us of host time each side spends per message, so
the transport keeps torch's calls.
"""

import ctypes
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import zmq  # noqa: E402

from transfer.codec import parse_header, pack_header, split_message  # noqa: E402
from transfer.messages import EncodeResult  # noqa: E402
from transfer.region import DATA, CudaEventFence, CurrentStream, _OnStream, pack_ctrl, unpack_ctrl  # noqa: E402

N = 4000
DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


def loaded_cudart() -> ctypes.CDLL | None:
    """The libcudart this process mapped with torch, for direct calls (None on other builds)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.rsplit(" ", 1)[-1].strip()
            if "/libcudart.so" in path:
                lib = ctypes.CDLL(path)
                lib.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                ctypes.c_void_p]
                lib.cudaEventRecord.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
                lib.cudaEventQuery.argtypes = [ctypes.c_void_p]
                return lib
    return None


def per_call_us(fn, n: int = N) -> float:
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def main() -> None:
    torch.cuda.init()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    rt = loaded_cudart()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, cudart via ctypes: {rt._name if rt else 'not found'}")
    region = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    src = torch.randn(2048, dtype=torch.bfloat16, device=device)  # 4 KiB
    src_u8 = src.reshape(-1).view(torch.uint8)
    stream = torch.cuda.current_stream()
    current = CurrentStream(device)
    side = torch.cuda.Stream(device, priority=-1)
    on_side = _OnStream(side)
    ipc_event = torch.cuda.Event(interprocess=True)
    plain_event = torch.cuda.Event()
    rows: list[tuple[str, float]] = []

    def row(name: str, fn) -> None:
        rows.append((name, per_call_us(fn)))
        print(f"  {name:<58} {rows[-1][1]:7.2f} us", flush=True)

    print("sender, per message:")
    row("torch: tensor.reshape(-1).view(uint8)", lambda: src.reshape(-1).view(torch.uint8))
    row("torch: region[a:b].copy_(src, non_blocking=True)", lambda: region[4096:8192].copy_(src_u8, non_blocking=True))
    base, src_ptr, stream_ptr = region.data_ptr(), src_u8.data_ptr(), stream.cuda_stream
    if rt:
        row("ctypes: cudaMemcpyAsync", lambda: rt.cudaMemcpyAsync(base + 4096, src_ptr, 4096, DEVICE_TO_DEVICE, stream_ptr))
        row("ctypes: src.data_ptr() + cudaMemcpyAsync",
            lambda: rt.cudaMemcpyAsync(base + 4096, src_u8.data_ptr(), 4096, DEVICE_TO_DEVICE, stream_ptr))
    row("CurrentStream() (cached)", current)
    row("torch.cuda.current_stream()", torch.cuda.current_stream)
    row("torch: interprocess Event.record(stream)", lambda: ipc_event.record(stream))
    row("CudaEventFence(stream, ipc event) (record + wrapper)", lambda: CudaEventFence(stream, ipc_event, b"x"))
    if rt:
        handle = ipc_event.cuda_event
        row("ctypes: cudaEventRecord", lambda: rt.cudaEventRecord(handle, stream_ptr))
    msg = EncodeResult("r-1", "k", (1, 32, 32), torch.empty(1024, 8192, dtype=torch.bfloat16, device=device))
    row("split_message(EncodeResult)", lambda: split_message(msg))
    header = split_message(msg)[0]
    row("pack_header", lambda: pack_header(header))
    ctrl_fields = dict(session=1, lease=0, gen=1, seq=7, spans=[[0, 16 << 20]], low=False, fence=b"f" * 64, count=1)
    row("pack_ctrl(DATA)", lambda: pack_ctrl(**ctrl_fields))

    print("receiver, per message:")
    raw_header, raw_ctrl = pack_header(header), pack_ctrl(**ctrl_fields)
    row("unpack_ctrl(DATA)", lambda: unpack_ctrl(raw_ctrl, DATA))
    row("parse_header", lambda: parse_header(raw_header))
    row("torch: Event.query() (done)", ipc_event.query)
    if rt:
        row("ctypes: cudaEventQuery (done)", lambda: rt.cudaEventQuery(handle))
    row("_OnStream enter + exit", lambda: on_side.__enter__() or on_side.__exit__(None, None, None))
    view = region[: 4096].view(torch.bfloat16)

    def copy_out() -> None:
        with on_side:
            out = view.clone()
        out.record_stream(stream)

    row("copy-out: clone on side stream + record_stream", copy_out)

    def fence() -> None:
        f = CudaEventFence(side)
        stream.wait_event(f.event)

    row("fence: new Event, record, consumer wait_event", fence)
    row("plain Event.record + wait_event (reused event)", lambda: plain_event.record(side) or stream.wait_event(plain_event))

    print("zmq, DEALER -> ROUTER over ipc://, 3 frames, pipelined:")
    ctx = zmq.Context.instance()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    router.bind("ipc:///tmp/splitvl-ops.sock")
    dealer.connect("ipc:///tmp/splitvl-ops.sock")
    frames = [b"data", raw_ctrl, raw_header]
    dealer.send_multipart(frames)
    router.recv_multipart()

    def send_recv() -> None:
        dealer.send_multipart(frames, copy=False)
        router.recv_multipart(copy=False)

    row("send_multipart + recv_multipart (one process, both ends)", send_recv)
    router.close(0)
    dealer.close(0)


if __name__ == "__main__":
    main()
