"""Run under mpirun -n 2: a send to a rank that froze never completes once the link's buffers are
full, and the timeout must name that rank. Prints rank 0's error message; rank 1 is killed after.

    mpirun -n 2 python tests/mpi/check_frozen_send.py
"""

import os
import signal
import sys

import numpy as np

from tpi_mpi.comm import MpiComm
from tpi_mpi.errors import CommError

TAG = 41


def main() -> int:
    comm = MpiComm("star", timeout=2.0)
    pid = np.array([os.getpid()], dtype=np.int64)
    if comm.rank == 1:
        comm.exchange([(pid, 0)], [], TAG, "sending my pid")
        os.kill(os.getpid(), signal.SIGSTOP)          # frozen: reads nothing from now on
        return 0
    comm.exchange([], [(pid, 1)], TAG, "waiting for rank 1's pid")
    big = np.zeros(64 << 20, dtype=np.uint8)          # far more than a socket buffers
    try:
        comm.exchange([(big, 1)], [], TAG, "sending to a frozen rank")
        print("the send completed", flush=True)
    except CommError as e:
        print(f"error: {e}", flush=True)
    os.kill(int(pid[0]), signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
