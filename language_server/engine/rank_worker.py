"""A tensor-parallel rank other than 0: `python -m language_server.engine.rank_worker RANK PORT PARENT_PID`.

Started by rank 0 (ranks.py), which writes the settings and this rank's device as the first frame
on stdin. The worker joins the process group, builds the same runner as rank 0 over its own
shard (models/parallel.py), then executes every plan rank 0 sends until EOF. It samples nothing
and keeps no request state: rank 0's scheduler decides everything. Its lifetime is rank 0's: it
dies with its parent (an orphan would hold its GPU), ignores SIGINT and SIGTERM (a signal to
the engine's process group is rank 0's to handle), and any error ends it non-zero, which ends
the engine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

from language_server.parent_watch import exit_with_parent, kill_with_parent

log = logging.getLogger("splitvl.rank")


def main(rank: int, store_port: int, parent_pid: int) -> None:
    # Before torch is imported (seconds): a rank 0 gone meanwhile is noticed at once.
    kill_with_parent()
    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine rank {rank} %(levelname)s %(message)s")

    import torch
    import torch.distributed as dist

    from language_server.engine.model_runner import build_runner
    from language_server.engine.ranks import STARTUP_TIMEOUT, join_group, read_frame, receive_plan
    from language_server.settings import LanguageSettings
    from models.device import resolve_device

    stdin = sys.stdin.buffer
    start = read_frame(stdin)
    if start is None:
        return  # rank 0 stopped before we were told anything
    start = json.loads(start)
    settings = LanguageSettings.model_validate_json(start["settings"])
    size = settings.tensor_parallel_size
    device = resolve_device(start["device"])
    store = dist.TCPStore("127.0.0.1", store_port, size, is_master=False, timeout=STARTUP_TIMEOUT)
    tp = join_group(store, rank, size, device, settings.distributed_timeout_s, settings.expert_parallel)
    runner = build_runner(settings, str(device), tp)
    log.info("rank %d of %d ready on %s (%s)", rank, size, device, runner.kernels.describe())
    with torch.no_grad():
        while (plan := receive_plan(stdin, tp, runner.dtype, runner.device)) is not None:
            runner.execute(plan)
    # EOF: rank 0 has stopped. Exit without closing the process group, which with NCCL would
    # wait for ranks that are going too.
    os._exit(0)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
