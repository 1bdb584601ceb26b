"""Run under mpirun: every allreduce mode must equal a NumPy sum. Exits non-zero on a mismatch.

    mpirun -n 4 python tests/mpi/check_allreduce.py
"""

import sys

import numpy as np
import torch
from mpi_check import report, same_on_all_ranks

from tpi_mpi import comm as tpi_comm
from tpi_mpi.allreduce_auto import AutoChoice
from tpi_mpi.comm import MpiComm
from tpi_mpi.config import ALLREDUCE_MODES


def check_auto_keeps_ranks_together() -> list[str]:
    """auto tries its contenders on real calls and re-checks its pick: the ranks must agree on every
    switch (a rank that switched alone would deadlock or add wrongly). Every candidate is made a
    contender, windows may be short and a match is 2 rounds, so all four have played by call 64."""
    AutoChoice.CONTENDER, AutoChoice.MIN_WINDOW_S, AutoChoice.ROUNDS = float("inf"), 0.0, 2
    comm = MpiComm("auto", timeout=30)
    n, rank = comm.size, comm.rank
    failures = []
    for call in range(70):
        for shape in [(1, 576), (16, 576)]:
            got = comm.allreduce(torch.full(shape, float(rank + call)))
            if not torch.equal(got, torch.full(shape, float(n * (n - 1) / 2 + n * call))):
                failures.append(f"auto call {call} {shape}: wrong sum")
    state = np.array([[list(c.trial).index(c.pick), len(c.observed), c.next_check] for _, c in sorted(comm.allreduce.auto.choices.items())],
                     dtype=np.int64)
    if not same_on_all_ranks(comm.world, state):
        failures.append(f"auto: ranks disagree on pick, tried candidates or next check: {state.tolist()}")
    # windows of 8 calls: 4 candidates x 2 rounds end the match at call 64, the first check is at 96
    if n > 1 and any(len(c.observed) != 4 or c.exploring or c.next_check != 96 for c in comm.allreduce.auto.choices.values()):
        failures.append(f"auto: expected all 4 candidates tried and the next check at call 96: {state.tolist()}")
    return failures


def check_sums(comm: MpiComm, mode: str, shapes: list[tuple]) -> list[str]:
    n, rank = comm.size, comm.rank
    failures = []
    for shape in shapes:
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
            if not same_on_all_ranks(comm.world, got.float().numpy()):
                failures.append(f"{mode} {shape} {dtype}: ranks hold different results")
            tol = 1e-5 if dtype == torch.float32 else 2e-2 * max(1.0, float(np.abs(expected).max()))
            err = float(np.abs(got.float().numpy() - expected).max())
            if err > tol:
                failures.append(f"{mode} {shape} {dtype}: max error {err:g} > {tol:g}")
    return failures


def check_payloads(size: int, shapes: list[tuple]) -> list[str]:
    """star (and auto, which then picks star) with each compressed payload, hubs 0 and the last rank:
    the same bits on every rank, within the codec's error of a float64 sum (two roundings per value:
    its part, then the total; bf16 2^-8 of the value each, q8 half a block scale, below 1/127 of the row)."""
    failures = []
    for payload in ("bf16", "q8"):
        for mode, hub in (("star", 0), ("star", size - 1), ("auto", 0)):
            comm = MpiComm(mode, timeout=30, hub=hub, payload=payload)
            n, rank = comm.size, comm.rank
            for shape in shapes:
                parts = [np.random.default_rng(77 * r + len(shape)).standard_normal(shape).astype(np.float32) for r in range(n)]
                exact = np.sum(parts, axis=0, dtype=np.float64)
                got = comm.allreduce(torch.from_numpy(parts[rank].copy())).numpy()
                if not same_on_all_ranks(comm.world, got):
                    failures.append(f"{payload} {mode} hub {hub} {shape}: ranks hold different results")
                if payload == "bf16":
                    tol = 2.0 ** -8 * (np.sum(np.abs(parts), axis=0) + 2 * np.abs(exact)) + 1e-6
                else:
                    rows = [np.abs(a).reshape(-1, shape[-1]).max(axis=1).reshape(*shape[:-1], 1) for a in (*parts, exact)]
                    tol = (sum(rows[:-1]) + rows[-1] * 1.01) / 127 / 2 + 1e-6
                if np.any(np.abs(got - exact) > tol):
                    failures.append(f"{payload} {mode} hub {hub} {shape}: max error {np.abs(got - exact).max():g}")
            comm.barrier()
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
        failures += check_sums(comm, mode, [(1,), (7,), (1, 576), (5, 333), (64, 1024)])
        comm.barrier()
    # large buffers travel in segments: make segments of 100 bytes, so that odd sizes end in a partial one
    default_segment, tpi_comm.SEGMENT_BYTES = tpi_comm.SEGMENT_BYTES, 100
    for mode in ("star", "ring", "recdouble"):
        comm = MpiComm(mode, timeout=30)
        failures += [f"in segments of 100 bytes: {f}" for f in check_sums(comm, mode, [(7,), (5, 333)])]
    failures += [f"in segments of 100 bytes: {f}" for f in check_payloads(comm.size, [(5, 333)])]
    tpi_comm.SEGMENT_BYTES = default_segment
    failures += check_payloads(comm.size, [(1,), (1, 576), (5, 333), (64, 1024)])
    failures += check_auto_keeps_ranks_together()
    # ranks sharing a key (as ranks in one memory cgroup do): all on this host, split by parity
    sharing = comm.ranks_on_this_host(comm.rank % 2)
    if sharing != sum(1 for r in range(comm.size) if r % 2 == comm.rank % 2) or comm.ranks_on_this_host() != comm.size:
        failures.append(f"ranks_on_this_host: {sharing} ranks share key {comm.rank % 2}")
    return report(comm.rank, failures, f"allreduce ok on {comm.size} ranks: {', '.join(ALLREDUCE_MODES)}")


if __name__ == "__main__":
    sys.exit(main())
