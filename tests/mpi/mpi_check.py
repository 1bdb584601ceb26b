"""What the tests/mpi/check_*.py scripts share: comparing a result across ranks, and the ending."""

import sys

import numpy as np
from mpi4py import MPI


def same_on_all_ranks(world: MPI.Comm, values: np.ndarray) -> bool:
    """Whether every rank holds the very same `values` (true on every rank, or false on every rank)."""
    lo, hi = values.copy(), values.copy()
    world.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    world.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    return bool(np.array_equal(lo, hi))


def report(rank: int, failures: list[str], ok: str) -> int:
    """Prints this rank's failures to stderr, or `ok` on rank 0 when there are none; the exit code."""
    for f in failures:
        print(f"rank {rank}: {f}", file=sys.stderr)
    if rank == 0 and not failures:
        print(ok)
    return 1 if failures else 0
