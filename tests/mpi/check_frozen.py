"""Run under mpirun: the last rank sends rank 0 its pid and freezes (SIGSTOP); rank 0's timeout
must name it. Prints rank 0's error message; the frozen rank is killed after.

    mpirun -n 2 python tests/mpi/check_frozen.py send    a send to the frozen rank never completes
                                                         once the link's buffers are full
    mpirun -n 3 python tests/mpi/check_frozen.py third   recursive doubling: rank 0 waits on rank 1,
                                                         which waits on the frozen rank 2
"""

import os
import signal
import sys

import numpy as np
import torch

from tpi_mpi.comm import MpiComm
from tpi_mpi.errors import CommError

TAG = 41


def main(scenario: str) -> int:
    comm = MpiComm("recdouble" if scenario == "third" else "star", timeout=2.0)
    frozen = comm.size - 1
    pid = np.array([os.getpid()], dtype=np.int64)
    if comm.rank == frozen:
        comm.exchange([(pid, 0)], [], TAG, "sending my pid")
        os.kill(os.getpid(), signal.SIGSTOP)          # frozen: takes part in nothing from now on
        return 0
    if comm.rank == 0:
        comm.exchange([], [(pid, frozen)], TAG, f"waiting for rank {frozen}'s pid")
    try:
        if scenario == "third":
            comm.allreduce(torch.ones(16))
        elif comm.rank == 0:
            comm.exchange([(np.zeros(64 << 20, dtype=np.uint8), frozen)], [], TAG, "sending to a frozen rank")
        print(f"rank {comm.rank}: completed", flush=True)
    except CommError as e:
        if comm.rank == 0:
            print(f"error: {e}", flush=True)
    if comm.rank == 0:
        os.kill(int(pid[0]), signal.SIGKILL)
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
