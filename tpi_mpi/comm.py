"""All communication between ranks; the only module that imports mpi4py.

Everything moves as raw buffers (the capitalised mpi4py methods on contiguous NumPy arrays),
never as pickled objects. Every wait polls a non-blocking request and sleeps between polls, so a
rank waiting for its peers leaves the core to the ranks that compute (4 ranks on 2 cores is a
normal setup), and a peer that never answers becomes an error after `timeout` seconds.

`LocalComm` is the world of one: reductions return at once and mpi4py is never imported, so the
model runs and is tested without MPI.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .errors import CommError

TAG_PART, TAG_SUM = 11, 12   # star allreduce: partial sums to the hub, the total back
ALLREDUCE_MODES = ("star", "mpi")
_FIRST_PAUSE, _MAX_PAUSE, _IDLE_PAUSE = 5e-6, 2e-4, 1e-2   # poll back-off, seconds


@dataclass
class CommStats:
    seconds: float = 0.0      # wall time inside communication calls
    bytes_sent: int = 0
    calls: int = 0


class LocalComm:
    """A world of one rank: nothing to exchange."""

    rank, size = 0, 1

    def __init__(self) -> None:
        self.stats = CommStats()
        self.mode = "none"

    def allreduce(self, x: Tensor) -> Tensor:
        return x

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor:
        return local

    def bcast(self, buf: np.ndarray, root: int = 0, timeout=True) -> np.ndarray:
        return buf

    def gather_floats(self, value: float) -> list[float]:
        return [value]

    def agree(self, ok: bool) -> int:
        """The lowest rank that is not ok, or -1 when every rank is."""
        return -1 if ok else 0

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def ranks_on_this_host(self) -> int:
        return 1


class MpiComm:
    """MPI_COMM_WORLD with buffer-only collectives and a selectable allreduce."""

    def __init__(self, mode: str = "star", timeout: float = 60.0, hub: int = 0) -> None:
        from mpi4py import MPI

        if mode not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce mode {mode!r}: use one of {', '.join(ALLREDUCE_MODES)}")
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        self.mode, self.timeout, self.hub = mode, timeout, hub
        self.stats = CommStats()
        self._scratch: dict[tuple, np.ndarray] = {}

    # -- waiting without spinning -------------------------------------------------------------
    def _wait(self, reqs: list, what: str, timeout: float | None | bool = True) -> None:
        """Poll until `reqs` complete, sleeping between polls; timeout=None waits forever."""
        test = self.MPI.Request.Testall
        if test(reqs):
            return
        timeout = self.timeout if timeout is True else timeout
        start = time.monotonic()
        pause = _FIRST_PAUSE
        while not test(reqs):
            time.sleep(pause)
            waited = time.monotonic() - start
            # short waits (a peer computing) stay responsive; long idles poll rarely
            pause = min(pause * 2, _MAX_PAUSE if waited < 1.0 else _IDLE_PAUSE)
            if timeout is not None and waited > timeout:
                raise CommError(f"rank {self.rank}: no answer for {timeout:g} s while {what}; "
                                f"a peer rank has died or frozen (raise --comm-timeout if it is only slow)")

    def _timed(self, nbytes: int):
        self.stats.calls += 1
        self.stats.bytes_sent += nbytes
        return time.perf_counter()

    # -- collectives ---------------------------------------------------------------------------
    def allreduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over all ranks, added in float32, returned in x's dtype."""
        buf = x.detach().float().contiguous()
        arr = buf.numpy()
        t0 = self._timed(arr.nbytes)
        if self.mode == "star":
            self._allreduce_star(arr)
        else:
            self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)], "in MPI_Allreduce")
        self.stats.seconds += time.perf_counter() - t0
        return buf if x.dtype == torch.float32 else buf.to(x.dtype)

    def _allreduce_star(self, arr: np.ndarray) -> None:
        """In-place sum via the hub, added in rank order so results repeat bit for bit."""
        hub = self.hub
        if self.rank == hub:
            others = [r for r in range(self.size) if r != hub]
            parts = self._scratch_for(arr.shape, len(others))
            self._wait([self.world.Irecv(parts[i], source=r, tag=TAG_PART) for i, r in enumerate(others)],
                       f"star allreduce: waiting for partial sums from ranks {others}")
            total = np.zeros_like(arr)
            for r in range(self.size):
                total += arr if r == hub else parts[others.index(r)]
            arr[...] = total
            self._wait([self.world.Isend(arr, dest=r, tag=TAG_SUM) for r in others],
                       "star allreduce: sending the total")
        else:
            (total,) = self._scratch_for(arr.shape, 1)   # a send buffer must not be written while in flight
            self._wait([self.world.Irecv(total, source=hub, tag=TAG_SUM),
                        self.world.Isend(arr, dest=hub, tag=TAG_PART)],
                       f"star allreduce: waiting for the total from hub rank {hub}")
            arr[...] = total

    def _scratch_for(self, shape: tuple, n: int) -> list[np.ndarray]:
        key = (shape, n)
        if key not in self._scratch:
            self._scratch[key] = np.empty((n, *shape), dtype=np.float32)
        return list(self._scratch[key])

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Concatenate every rank's (T, counts[r]) float32 block along dim 1 on rank 0."""
        T = local.shape[0]
        send = local.contiguous().numpy()
        t0 = self._timed(send.nbytes)
        if self.rank == 0:
            flat = np.empty(T * sum(counts), dtype=np.float32)
            sizes = [T * c for c in counts]
            displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist()
            self._wait([self.world.Igatherv(send, [flat, sizes, displs, self.MPI.FLOAT], root=0)],
                       "gathering logits")
            blocks = np.split(flat, np.cumsum(sizes)[:-1])
            out = torch.from_numpy(np.concatenate([b.reshape(T, c) for b, c in zip(blocks, counts)], axis=1))
        else:
            self._wait([self.world.Igatherv(send, None, root=0)], "sending logits to rank 0")
            out = None
        self.stats.seconds += time.perf_counter() - t0
        return out

    def bcast(self, buf: np.ndarray, root: int = 0, timeout: float | None | bool = True) -> np.ndarray:
        """Broadcast a contiguous array in place (every rank passes one of the same size)."""
        t0 = self._timed(buf.nbytes if self.rank == root else 0)
        self._wait([self.world.Ibcast(buf, root=root)], f"waiting for a broadcast from rank {root}", timeout)
        self.stats.seconds += time.perf_counter() - t0
        return buf

    def gather_floats(self, value: float) -> list[float] | None:
        out = np.empty(self.size, dtype=np.float64) if self.rank == 0 else None
        self._wait([self.world.Igather(np.array([value], dtype=np.float64), out, root=0)], "gathering stats")
        return out.tolist() if out is not None else None

    def agree(self, ok: bool) -> int:
        """The lowest rank that is not ok, or -1 when every rank is (a setup-time vote)."""
        mine = np.array([self.size if ok else self.rank], dtype=np.int64)
        # no time limit: rank 0 may be preparing a large model meanwhile
        self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, mine, op=self.MPI.MIN)], "agreeing on start-up", None)
        return -1 if mine[0] == self.size else int(mine[0])

    def barrier(self) -> None:
        self._wait([self.world.Ibarrier()], "at a barrier")

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)

    def ranks_on_this_host(self) -> int:
        local = self.world.Split_type(self.MPI.COMM_TYPE_SHARED)
        n = local.Get_size()
        local.Free()
        return n


_active: MpiComm | None = None


def make_comm(mode: str = "star", timeout: float = 60.0):
    """MpiComm when launched by mpirun with more than one rank, else LocalComm."""
    global _active
    if not _launched_by_mpi():
        return LocalComm()
    comm = MpiComm(mode, timeout)
    if comm.size == 1:
        return LocalComm()
    _active = comm
    return comm


def active_comm() -> MpiComm | None:
    """The multi-rank communicator in use, if any (the entry point aborts through it)."""
    return _active


def _launched_by_mpi() -> bool:
    env = os.environ
    return any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK"))
