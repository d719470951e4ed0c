"""Test hooks on a region receiver (shm, cuda_ipc): observe its traffic without changing it,
and drive both ends of the lease protocol from one thread."""

from __future__ import annotations

from transfer.base import TransportTimeout


def count_data_messages(receiver) -> list[int]:
    """Count the DATA control messages `receiver` reads from now on; returns a one-item list the
    count goes into (one DATA may carry several messages: send_many)."""
    count = [0]
    on_frames = receiver._on_frames

    def counting(frames):
        count[0] += len(frames) > 1 and frames[1].bytes == b"data"
        return on_frames(frames)

    receiver._on_frames = counting
    return count


def deliver(receiver, sender, msg) -> None:
    """Send `msg` from `sender` and receive it at `receiver`, both in this thread: the receiver
    runs the lease protocol only inside recv(), so a first send waits for a lease that only a
    recv() between tries can grant."""
    for _ in range(100):
        try:
            sender.send(msg, timeout=0.05)
        except TransportTimeout:
            receiver.recv(timeout=0.05)
            continue
        got = receiver.recv(timeout=5)
        assert got is not None and got.request_id == msg.request_id
        return
    raise AssertionError("the sender never got through")
