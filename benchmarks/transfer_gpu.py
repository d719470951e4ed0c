"""Transfer benchmark and cuda_ipc exactness check, runnable from a checkout without installing.

    python benchmarks/transfer_gpu.py            # on a node with 2 GPUs: everything
    python benchmarks/transfer_gpu.py --cpu-only # zmq / shm / socket / memcpy parts only

Needs only torch, numpy, msgpack and pyzmq. Same options as `splitvl bench transfer`.
"""

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from splitvl.commands.bench import add_transfer_arguments, run_transfer  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_transfer_arguments(parser)
    sys.exit(run_transfer(parser.parse_args()))
