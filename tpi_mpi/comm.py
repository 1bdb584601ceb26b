"""All communication between ranks; the only module that imports mpi4py.

Everything moves as raw buffers (the capitalised mpi4py methods on contiguous NumPy arrays),
never as pickled objects. Every wait polls a non-blocking request and sleeps between polls, so a
rank waiting for its peers leaves the core to the ranks that compute (4 ranks on 2 cores is a
normal setup), and a peer that never answers becomes an error after `timeout` seconds.

`LocalComm` is the world of one: reductions return at once and mpi4py is never imported, so the
model runs and is tested without MPI.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .allreduce import ALGORITHMS
from .config import format_size
from .errors import CommError

ALLREDUCE_MODES = ("auto", "star", "mpi", "ring", "recdouble")
AUTO_CANDIDATES = ("star", "mpi", "ring", "recdouble")
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

    def describe(self) -> str:
        return "none"

    def allreduce(self, x: Tensor) -> Tensor:
        return x

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor:
        return local

    def bcast(self, buf: np.ndarray, root: int = 0, timeout=True) -> np.ndarray:
        return buf

    def gather_floats(self, value: float) -> list[float]:
        return [value]

    def agree(self, ok: bool, timeout: float | None = None) -> int:
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

    def __init__(self, mode: str = "auto", timeout: float = 60.0, hub: int = 0) -> None:
        from mpi4py import MPI

        if mode not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce mode {mode!r}: use one of {', '.join(ALLREDUCE_MODES)}")
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        if not 0 <= hub < self.size:
            raise CommError(f"--hub {hub}: choose a rank from 0 to {self.size - 1}")
        self.mode, self.timeout, self.hub = mode, timeout, hub
        self.stats = CommStats()
        self.chosen: dict[int, str] = {}     # auto: size class (bit length of the bytes) -> algorithm
        self._scratch: dict[tuple, np.ndarray] = {}
        record = os.environ.get("TPI_MPI_RECORD")
        self.recorder = Recorder(record, self.rank) if record else None

    # -- waiting without spinning -------------------------------------------------------------
    def _wait(self, reqs: list, what: str, timeout: float | None | bool = True, peers: list[int] | None = None) -> None:
        """Poll until `reqs` complete, sleeping between polls; timeout=None waits forever.
        `peers[i]` is the rank request i waits on, named if it never answers."""
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
                silent = [p for r, p in zip(reqs, peers or []) if p is not None and not r.Test()]
                who = f"rank {', '.join(map(str, silent))} sent nothing" if silent else "a peer rank did not answer"
                raise CommError(f"rank {self.rank}: {who} for {timeout:g} s ({what}): it has died or frozen "
                                f"(raise --comm-timeout if it is only slow)")

    def _timed(self, nbytes: int):
        self.stats.calls += 1
        self.stats.bytes_sent += nbytes
        return time.perf_counter()

    # -- point to point, for the algorithms of allreduce.py ---------------------------------------
    def exchange(self, sends: list, recvs: list, tag: int, what: str, recv_tag: int | None = None,
                 grace: float = 0.0, patient: bool = False) -> None:
        """Post every receive, then every send, and wait for all of them (`patient`: without a
        time limit)."""
        rreqs = [self.world.Irecv(buf, source=src, tag=tag if recv_tag is None else recv_tag) for buf, src in recvs]
        sreqs = [self.world.Isend(buf, dest=dst, tag=tag) for buf, dst in sends]
        self.stats.bytes_sent += sum(buf.nbytes for buf, _ in sends)
        self._wait(rreqs + sreqs, what, None if patient else self.timeout + grace,
                   peers=[src for _, src in recvs] + [None] * len(sreqs))
        if self.recorder:
            for buf, _ in recvs:
                self.recorder.add("p2p", buf)

    def scratch(self, shape: tuple, n: int) -> list[np.ndarray]:
        """n reusable float32 buffers of `shape` (allocated once per shape)."""
        return self._scratch_for(shape, n)

    # -- collectives ---------------------------------------------------------------------------
    def allreduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over all ranks, added in float32, returned in x's dtype."""
        buf = x.detach().float().contiguous()
        arr = buf.numpy()
        t0 = self._timed(0)
        mode = self.mode if self.mode != "auto" else self._auto(arr)
        self._run(mode, arr)
        self.stats.seconds += time.perf_counter() - t0
        return buf if x.dtype == torch.float32 else buf.to(x.dtype)

    def _run(self, mode: str, arr: np.ndarray) -> None:
        if mode == "mpi":
            self.stats.bytes_sent += arr.nbytes
            self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)], "in MPI_Allreduce")
            if self.recorder:
                self.recorder.add("allreduce", arr)
        elif mode == "star":
            ALGORITHMS["star"](self, arr, self.hub)
        else:
            ALGORITHMS[mode](self, arr)

    def _auto(self, arr: np.ndarray) -> str:
        """The fastest algorithm for this size class, timed on first use with this very size.
        Every rank runs the same trials and takes the slowest rank's times, so all choose alike."""
        size_class = arr.nbytes.bit_length()
        if size_class not in self.chosen:
            trial = np.zeros_like(arr)
            repeats = 20 if arr.nbytes <= 1 << 16 else 5
            times = np.zeros(len(AUTO_CANDIDATES))
            saved = self.stats
            self.stats = CommStats()          # trials are not traffic of the model
            for i, mode in enumerate(AUTO_CANDIDATES):
                self._run(mode, trial)        # warm-up: connections, buffers
                self.barrier()
                t0 = time.perf_counter()
                for _ in range(repeats):
                    self._run(mode, trial)
                times[i] = (time.perf_counter() - t0) / repeats
            self.stats = saved
            self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, times, op=self.MPI.MAX)], "agreeing on an allreduce")
            if self.recorder:
                self.recorder.add("auto", times)
            self.chosen[size_class] = AUTO_CANDIDATES[int(np.argmin(times))]
            self.trials = getattr(self, "trials", {})
            self.trials[arr.nbytes] = dict(zip(AUTO_CANDIDATES, times.tolist()))
        return self.chosen[size_class]

    def describe(self) -> str:
        """The allreduce in use, e.g. "star" or "auto (up to 4 KiB: star, up to 1 MiB: ring)"."""
        if self.mode != "auto":
            return self.mode
        picks = ", ".join(f"up to {format_size(1 << c)}: {m}" for c, m in sorted(self.chosen.items()))
        return f"auto ({picks})" if picks else "auto"

    def _scratch_for(self, shape: tuple, n: int) -> list[np.ndarray]:
        key = (shape, n)
        if key not in self._scratch:
            self._scratch[key] = np.empty((n, *shape), dtype=np.float32)
        return list(self._scratch[key])

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Concatenate every rank's (T, counts[r]) float32 block along dim 1 on rank 0."""
        T = local.shape[0]
        send = local.contiguous().numpy()
        t0 = self._timed(send.nbytes if self.rank != 0 else 0)   # rank 0's own block stays put
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
        if self.recorder and self.rank != root:
            self.recorder.add("bcast", buf)
        self.stats.seconds += time.perf_counter() - t0
        return buf

    def gather_floats(self, value: float) -> list[float] | None:
        out = np.empty(self.size, dtype=np.float64) if self.rank == 0 else None
        self._wait([self.world.Igather(np.array([value], dtype=np.float64), out, root=0)], "gathering stats")
        return out.tolist() if out is not None else None

    def agree(self, ok: bool, timeout: float | None = None) -> int:
        """The lowest rank that is not ok, or -1 when every rank is (a start-up vote)."""
        mine = np.array([self.size if ok else self.rank], dtype=np.int64)
        self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, mine, op=self.MPI.MIN)], "agreeing on start-up", timeout)
        if self.recorder:
            self.recorder.add("agree", mine)
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


def make_comm(mode: str = "auto", timeout: float = 60.0, hub: int = 0):
    """MpiComm when launched by mpirun with more than one rank, else LocalComm."""
    global _active
    if not _launched_by_mpi():
        return LocalComm()
    comm = MpiComm(mode, timeout, hub)
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


class Recorder:
    """Every buffer this rank receives, appended raw to rankN.bin with a JSON line each in rankN.jsonl
    (set TPI_MPI_RECORD=folder). It lets a test prove what a worker ever gets to see."""

    def __init__(self, folder: str, rank: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.bin = open(os.path.join(folder, f"rank{rank}.bin"), "ab")
        self.index = open(os.path.join(folder, f"rank{rank}.jsonl"), "a")

    def add(self, op: str, buf: np.ndarray) -> None:
        offset = self.bin.tell()
        self.bin.write(buf.tobytes())
        self.bin.flush()
        self.index.write(json.dumps({"op": op, "dtype": str(buf.dtype), "shape": list(buf.shape),
                                     "offset": offset, "nbytes": buf.nbytes}) + "\n")
        self.index.flush()
