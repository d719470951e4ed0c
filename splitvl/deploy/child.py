"""Entry of each service `splitvl up` starts:

    python -m splitvl.deploy.child LAUNCHER_PID encode|language --config FILE

It asks the kernel for SIGTERM when the launcher dies, however it dies (SIGKILL included), so no
orphan keeps a GPU or a port; then it runs the subcommand as `splitvl` would. This is done here
rather than in a pre-exec hook, which is unsafe while the launcher's output threads run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> int:
    launcher, command = int(argv[0]), argv[1:]
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the request took effect
        return 1
    from splitvl.cli import main as splitvl

    return splitvl(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
