"""Transfer benchmark and cuda_ipc exactness check, runnable from a checkout without installing.

    python benchmarks/transfer_gpu.py            # on a node with 2 GPUs: everything
    python benchmarks/transfer_gpu.py --cpu-only # zmq / shm / socket / memcpy parts only
    python benchmarks/transfer_gpu.py --breakdown --sizes 16   # where each message's time goes

Needs only torch, numpy, msgpack and pyzmq. Same options as `splitvl bench transfer`.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from splitvl.commands.bench import add_transfer_arguments  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_transfer_arguments(parser)
    parser.add_argument("--host-quick", action="store_true", help="a quarter of the host-side messages per trial")
    parser.add_argument("--lean-host", action="store_true", help="skip the fresh-buffer socket and THP shm rows")
    parser.add_argument("--no-host", action="store_true", help="skip every host-side row (sockets, zmq, shm)")
    parser.add_argument("--lease-depths", default="4,16,32",
                        help="cuda_ipc lease sizes to measure, in messages of the payload size (default: 4,16,32)")
    parser.add_argument("--pin", action="store_true",
                        help="also measure the deepest lease's cuda_ipc rows with the sender and receiver processes "
                             "pinned to disjoint physical cores")
    parser.add_argument("--only", default="",
                        help="measure only these cuda_ipc rows, by label, separated by ';' (e.g. to profile one)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the table: where one message's time goes (per stage) and what a stream "
                             "costs per message, for shm and (with 2 GPUs) cuda_ipc at --lease-depths")
    args = parser.parse_args()
    from transfer.bench import run, run_breakdown

    if args.breakdown:
        sys.exit(run_breakdown(sizes=[int(s) for s in args.sizes.split(",")], cpu_only=args.cpu_only,
                               no_host=args.no_host, quick=args.quick,
                               lease_depths=tuple(int(d) for d in args.lease_depths.split(","))))

    sys.exit(run(sizes=[int(s) for s in args.sizes.split(",")], trials=args.trials, quick=args.quick,
                 cpu_only=args.cpu_only, host_quick=args.host_quick, lean_host=args.lean_host,
                 no_host=args.no_host, lease_depths=tuple(int(d) for d in args.lease_depths.split(",")), pin=args.pin,
                 only=set(filter(None, args.only.split(";"))) or None))
