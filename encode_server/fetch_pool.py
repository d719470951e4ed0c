"""URL downloads on their own threads, a few at a time per host.

Downloads wait on the network, preprocessing on the CPU; on one pool, a handful of slow or
hostile URLs would hold every worker and delay inline images that need no network at all. So
fetches run here and hand their bytes on to the worker pool, and one host gets at most
`per_host` downloads at once: its other jobs queue here (holding no thread) and start as its
downloads finish. Every fetch carries its job's deadline, so a queued one never outlives it.
"""

from __future__ import annotations

import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor


class FetchPool:
    def __init__(self, workers: int, per_host: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="encode fetch")
        self._per_host = per_host
        self._lock = threading.Lock()
        self._active: dict[str, int] = defaultdict(int)
        self._queued: dict[str, deque[Callable[[], None]]] = defaultdict(deque)

    def submit(self, host: str, fetch: Callable[[], None]) -> None:
        with self._lock:
            if self._active[host] >= self._per_host:
                self._queued[host].append(fetch)
                return
            self._active[host] += 1
        self._pool.submit(self._run, host, fetch)

    def queued(self) -> int:
        with self._lock:
            return sum(len(q) for q in self._queued.values())

    def _run(self, host: str, fetch: Callable[[], None]) -> None:
        """Runs `fetch`, then the host's queued fetches on the same thread (its slot passes on)."""
        while True:
            fetch()  # never raises: the service answers the job itself, whatever happens
            with self._lock:
                queue = self._queued.get(host)
                if not queue:
                    self._queued.pop(host, None)
                    self._active[host] -= 1
                    if not self._active[host]:
                        del self._active[host]
                    return
                fetch = queue.popleft()

    def shutdown(self) -> None:
        """Wait for every accepted fetch, queued ones included (each is bounded by its deadline)."""
        self._pool.shutdown(wait=True)
