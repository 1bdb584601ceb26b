"""Run under mpirun: every allreduce mode must equal a NumPy sum. Exits non-zero on a mismatch.

    mpirun -n 4 python tests/mpi/check_allreduce.py
"""

import sys

import numpy as np
import torch
from mpi4py import MPI

from tpi_mpi.comm import ALLREDUCE_MODES, MpiComm


def check_auto_keeps_ranks_together() -> list[str]:
    """auto revises its pick from the calls' times at calls 4, 16, 64: the ranks must still agree
    on every pick and every sum (a rank that switched alone would deadlock or add wrongly)."""
    comm = MpiComm("auto", timeout=30)
    n, rank = comm.size, comm.rank
    failures = []
    for call in range(70):
        for shape in [(1, 576), (16, 576)]:
            got = comm.allreduce(torch.full(shape, float(rank + call)))
            if not torch.equal(got, torch.full(shape, float(n * (n - 1) / 2 + n * call))):
                failures.append(f"auto call {call} {shape}: wrong sum")
    picks = np.array([list(comm.auto[c].times).index(comm.auto[c].pick) for c in sorted(comm.auto)], dtype=np.int64)
    lo, hi = picks.copy(), picks.copy()
    comm.world.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
    comm.world.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
    if not np.array_equal(lo, hi):
        failures.append(f"auto: ranks picked differently ({picks.tolist()})")
    if n > 1 and any(c.calls != 70 or c.next_check != 256 for c in comm.auto.values()):
        failures.append("auto: the picks were not checked at calls 4, 16 and 64")
    return failures


def main() -> int:
    failures = []
    for mode in ALLREDUCE_MODES:
        comm = MpiComm(mode, timeout=30)
        n, rank = comm.size, comm.rank
        # a value known in advance: the sum of the rank ids
        total = comm.allreduce(torch.full((3,), float(rank)))
        if not torch.equal(total, torch.full((3,), n * (n - 1) / 2)):
            failures.append(f"{mode}: sum of ranks gave {total.tolist()}")
        for shape in [(1,), (7,), (1, 576), (5, 333), (64, 1024)]:
            for dtype in (torch.float32, torch.bfloat16):
                # every rank can rebuild every rank's buffer from its seed
                parts = [torch.from_numpy(np.random.default_rng(1000 * r + len(shape)).standard_normal(shape)
                                          .astype(np.float32)).to(dtype) for r in range(n)]
                expected = np.sum([p.float().numpy() for p in parts], axis=0, dtype=np.float32)
                got = comm.allreduce(parts[rank].clone())
                if got.dtype != dtype or got.shape != parts[rank].shape:
                    failures.append(f"{mode} {shape} {dtype}: got {got.dtype} {tuple(got.shape)}")
                    continue
                # every rank must hold the very same bits, whatever the algorithm
                lo, hi = got.float().numpy().copy(), got.float().numpy().copy()
                comm.world.Allreduce(MPI.IN_PLACE, lo, op=MPI.MIN)
                comm.world.Allreduce(MPI.IN_PLACE, hi, op=MPI.MAX)
                if not np.array_equal(lo, hi):
                    failures.append(f"{mode} {shape} {dtype}: ranks hold different results")
                tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(1.0, float(np.abs(expected).max()))
                err = float(np.abs(got.float().numpy() - expected).max())
                if err > tol:
                    failures.append(f"{mode} {shape} {dtype}: max error {err:g} > {tol:g}")
        comm.barrier()
    failures += check_auto_keeps_ranks_together()
    for f in failures:
        print(f"rank {comm.rank}: {f}", file=sys.stderr)
    if comm.rank == 0 and not failures:
        print(f"allreduce ok on {comm.size} ranks: {', '.join(ALLREDUCE_MODES)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
