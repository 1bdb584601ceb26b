"""Run under mpirun: --link-model charges each message its modelled time and changes no result.

    mpirun -n 2 python tests/mpi/check_link_model.py
"""

import sys
import time

import numpy as np
import torch
from mpi_check import report

from tpi_mpi.comm import MpiComm
from tpi_mpi.link_model import SimulatedLink

DELAY = 0.005


def main() -> int:
    link = SimulatedLink.parse("5ms,1000mbit")
    failures = []
    for mode in ("star", "mpi"):
        plain, slow = MpiComm(mode, timeout=30), MpiComm(mode, timeout=30, link=link)
        n, rank = plain.size, plain.rank
        x = torch.from_numpy(np.random.default_rng(rank).standard_normal(64).astype(np.float32))
        expected = plain.allreduce(x.clone())
        slow.barrier()
        t0 = time.perf_counter()
        got = slow.allreduce(x.clone())
        took = max(slow.gather_floats(time.perf_counter() - t0) or [0.0])    # the slowest rank, on rank 0
        if not torch.equal(got, expected):
            failures.append(f"{mode}: the link model changed the sum")
        # star: to the hub and back; mpi: charged as a ring, 2 (n - 1) steps
        hops = 2 if mode == "star" else 2 * (n - 1)
        if rank == 0 and took < hops * DELAY:
            failures.append(f"{mode}: {took * 1e3:.2f} ms on a {DELAY * 1e3:g} ms link, less than {hops} hops")
        if rank == 0:
            print(f"{mode}: {took * 1e3:.2f} ms")
    return report(plain.rank, failures, f"link model ok on {plain.size} ranks")


if __name__ == "__main__":
    sys.exit(main())
