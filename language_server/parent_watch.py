"""A child process that outlives its parent is an orphan holding a GPU: exit when the parent goes.

The launcher's engine process and the engine's rank workers each run this. Their parent's
death is seen as a change of parent pid (the orphan is re-parented), polled from a daemon thread.
"""

from __future__ import annotations

import os
import threading
import time

_POLL_S = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """Start a thread that ends this process (exit code 1) once `parent_pid` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
