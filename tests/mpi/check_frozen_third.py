"""Run under mpirun -n 3: recursive doubling, rank 2 frozen. Rank 0 waits on rank 1, which waits
on rank 2: the timeout must name rank 2 (the roll call), not rank 1. Prints rank 0's error message.

    mpirun -n 3 python tests/mpi/check_frozen_third.py
"""

import os
import signal
import sys

import numpy as np
import torch

from tpi_mpi.comm import MpiComm
from tpi_mpi.errors import CommError

TAG = 41


def main() -> int:
    comm = MpiComm("recdouble", timeout=2.0)
    pid = np.array([os.getpid()], dtype=np.int64)
    if comm.rank == 2:
        comm.exchange([(pid, 0)], [], TAG, "sending my pid")
        os.kill(os.getpid(), signal.SIGSTOP)          # frozen: takes part in nothing from now on
        return 0
    if comm.rank == 0:
        comm.exchange([], [(pid, 2)], TAG, "waiting for rank 2's pid")
    try:
        comm.allreduce(torch.ones(16))
        print(f"rank {comm.rank}: the allreduce completed", flush=True)
    except CommError as e:
        if comm.rank == 0:
            print(f"error: {e}", flush=True)
            os.kill(int(pid[0]), signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
