"""Test hooks on a region receiver (shm, cuda_ipc): observe its traffic without changing it."""

from __future__ import annotations


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
