"""A child process that outlives its parent is an orphan holding a GPU: exit when the parent goes.

The launcher's engine process and the engine's rank workers each run this. Their parent's
death is seen as a change of parent pid (the orphan is re-parented), polled from a daemon thread;
a child that is handed its parent's pid also checks it at once, so a parent gone before the child
got this far is noticed too. On Linux a rank also asks the kernel for SIGKILL when its parent
dies (`kill_with_parent`), which reaches a stopped or wedged process that no thread of its own can.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

_POLL_S = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """Start a thread that ends this process (exit code 1) once `parent_pid` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_POLL_S)
        os._exit(1)

    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_PR_SET_PDEATHSIG = 1


def kill_with_parent() -> None:
    """Linux: the kernel sends this process SIGKILL when its parent exits (elsewhere: nothing)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # no prctl: the watch thread alone
