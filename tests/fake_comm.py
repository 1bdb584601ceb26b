"""A fake N-rank communicator for tests: the ranks are threads of one process.

`ThreadWorld(n)` is the world; `world.comm(r)` is rank r's communicator, a tpi_mpi.local_comm.Comm like
LocalComm and MpiComm. Every collective meets at one `threading.Barrier`: each rank leaves its
part, the last to arrive combines the parts (in rank order, once, so every rank gets the very same
bits) and all read the result. A rank that never arrives, or ranks that call different
collectives, make every rank fail within `timeout` seconds instead of hanging.
`run_ranks(n, fn)` runs fn(comm) on n threads and returns the n results.
Point to point, `exchange` and `scratch` are MpiComm's (what allreduce.py's algorithms use): a send
is copied into a mailbox per (source, destination, tag), so the real algorithms run on thread ranks.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from tpi_mpi.errors import CommError
from tpi_mpi.local_comm import Comm, CommStats


class ThreadWorld:
    def __init__(self, size: int, timeout: float = 60.0) -> None:
        if size < 1:
            raise ValueError(f"{size} ranks: at least 1")
        self.size, self.timeout = size, timeout
        self._parts: list[tuple | None] = [None] * size      # (what, payload, combine) per rank
        self._results: list | Exception | None = None
        self._barrier = threading.Barrier(size, action=self._combine, timeout=timeout)
        self._mail: dict[tuple[int, int, int], queue.Queue] = {}
        self._mail_lock = threading.Lock()

    def mailbox(self, src: int, dst: int, tag: int) -> queue.Queue:
        with self._mail_lock:
            return self._mail.setdefault((src, dst, tag), queue.Queue())

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def abort(self) -> None:
        """Break the barrier: every rank waiting in (or later entering) a collective fails at once."""
        self._barrier.abort()

    def collective(self, rank: int, what: str, payload, combine: Callable[[list], list]):
        """Rank `rank`'s part of collective `what`; `combine(payloads)` gives the per-rank results."""
        self._parts[rank] = (what, payload, combine)
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise CommError(f"rank {rank}, {what}: a peer rank failed or did not arrive within "
                            f"{self.timeout:g} s") from None
        results = self._results           # read before this rank's next call: the next action waits for it
        if isinstance(results, Exception):
            raise CommError(f"rank {rank}, {what}: {results}")
        return results[rank]

    def _combine(self) -> None:
        """Run by exactly one thread once every rank has arrived, before any is released."""
        parts, self._parts = self._parts, [None] * self.size
        names = [p[0] for p in parts]
        if len(set(names)) != 1:
            self._results = RuntimeError("the ranks called different collectives: " +
                                         ", ".join(f"rank {r} {n}" for r, n in enumerate(names)))
            return
        try:
            self._results = parts[0][2]([p[1] for p in parts])
        except Exception as e:            # raised on every rank, not lost in the barrier's action
            self._results = e


class ThreadComm(Comm):
    """Rank `rank` of a ThreadWorld (see the module docstring)."""

    link = None
    mode = "fake"

    def __init__(self, world: ThreadWorld, rank: int) -> None:
        if not 0 <= rank < world.size:
            raise ValueError(f"rank {rank} of a world of {world.size}")
        self.world, self.rank, self.size = world, rank, world.size
        self.stats = CommStats()

    def _call(self, what: str, payload, combine, nbytes: int = 0):
        t0 = time.perf_counter()
        self.stats.calls += 1
        self.stats.bytes_sent += nbytes
        try:
            return self.world.collective(self.rank, what, payload, combine)
        finally:
            self.stats.seconds += time.perf_counter() - t0

    def describe(self) -> str:
        return f"fake ({self.size} threads)"

    # -- point to point, as MpiComm's (allreduce.py's algorithms) --------------------------------
    def exchange(self, sends: list, recvs: list, tag: int, what: str, recv_tag: int | None = None,
                 grace: float = 0.0, patient: bool = False) -> None:
        for buf, dst in sends:
            if not buf.flags.c_contiguous:
                raise ValueError("MPI buffers must be contiguous")
            self.world.mailbox(self.rank, dst, tag).put(buf.copy())
            self.stats.bytes_sent += buf.nbytes
        for buf, src in recvs:
            try:
                got = self.world.mailbox(src, self.rank, tag if recv_tag is None else recv_tag).get(
                    timeout=self.world.timeout)
            except queue.Empty:
                raise CommError(f"rank {self.rank}, {what}: rank {src} sent nothing") from None
            if got.size != buf.size or got.dtype != buf.dtype:
                raise ValueError(f"rank {self.rank}, {what}: got {got.dtype} {got.shape} for {buf.dtype} {buf.shape}")
            buf.reshape(-1)[...] = got.reshape(-1)

    def scratch(self, shape: tuple, n: int, dtype=np.float32) -> list[np.ndarray]:
        return list(np.empty((n, *shape), dtype=dtype))

    def record(self, op: str, buf: np.ndarray) -> None:
        pass

    def allreduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over all ranks, added in float32 in rank order, returned in x's dtype."""
        def add(parts: list[Tensor]) -> list[Tensor]:
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"allreduce of different shapes: {[tuple(p.shape) for p in parts]}")
            total = parts[0]
            for p in parts[1:]:
                total = total + p                  # out of place: inference tensors or not
            return [total] * len(parts)

        mine = x.detach().float().contiguous().clone()        # the caller may reuse x afterwards
        total = self._call("allreduce", mine, add, mine.numel() * 4)
        return total.clone() if x.dtype == torch.float32 else total.to(x.dtype)

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Every rank's (T, counts[r]) float32 block side by side on rank 0; None on the others."""
        def concat(parts: list[Tensor]) -> list[Tensor | None]:
            for r, p in enumerate(parts):
                if p.dtype != torch.float32 or p.dim() != 2 or tuple(p.shape) != (parts[0].shape[0], counts[r]):
                    raise ValueError(f"rank {r} gave a {p.dtype} block of shape {tuple(p.shape)}, "
                                     f"expected ({parts[0].shape[0]}, {counts[r]}) float32")
            return [torch.cat(parts, dim=1)] + [None] * (len(parts) - 1)

        if len(counts) != self.size:
            raise ValueError(f"{len(counts)} counts for {self.size} ranks")
        mine = local.detach().contiguous().clone()
        return self._call("gather_columns", mine, concat, 0 if self.rank == 0 else mine.numel() * 4)

    def bcast(self, buf: np.ndarray, root: int = 0, timeout=True) -> np.ndarray:
        """Rank `root`'s `buf` copied into every rank's `buf`, in place."""
        def spread(parts: list) -> list:
            if len({(p.shape, p.dtype) for p in parts}) != 1:
                raise ValueError(f"bcast of different buffers: {[(p.shape, str(p.dtype)) for p in parts]}")
            return [parts[root].copy()] * len(parts)

        got = self._call("bcast", buf, spread, buf.nbytes if self.rank == root else 0)
        if self.rank != root:
            np.copyto(buf, got)
        return buf

    def gather_floats(self, value: float) -> list[float] | None:
        return self._call("gather_floats", float(value),
                          lambda parts: [list(parts)] + [None] * (len(parts) - 1))

    def gather_names(self, name: str) -> list[str] | None:
        return self._call("gather_names", str(name), lambda parts: [list(parts)] + [None] * (len(parts) - 1))

    def agree(self, ok: bool, timeout: float | None = None) -> int:
        """The lowest rank that is not ok, or -1 when every rank is."""
        return self._call("agree", bool(ok),
                          lambda parts: [next((r for r, v in enumerate(parts) if not v), -1)] * len(parts))

    def barrier(self) -> None:
        self._call("barrier", None, lambda parts: [None] * len(parts))

    def abort(self, code: int = 1) -> None:
        self.world.abort()

    def ranks_on_this_host(self, key: int = 0) -> int:
        return self._call("ranks_on_this_host", key, lambda parts: [parts.count(k) for k in parts])


def run_ranks(n: int, fn: Callable[[ThreadComm], object], timeout: float = 120.0, comm_timeout: float = 60.0) -> list:
    """fn(comm) on n threads, one per rank; their results by rank. An exception on any rank breaks
    the world (the others fail at once instead of waiting) and is raised here, the first one first."""
    world = ThreadWorld(n, comm_timeout)
    results: list = [None] * n
    errors: list[tuple[int, BaseException]] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(world.comm(rank))
        except BaseException as e:
            errors.append((rank, e))
            world.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank{r}", daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads):
        world.abort()
        stuck = [r for r, t in enumerate(threads) if t.is_alive()]
        raise TimeoutError(f"ranks {stuck} still running after {timeout:g} s")
    if errors:
        # the root cause first: a failure that is not merely a broken barrier
        errors.sort(key=lambda e: (isinstance(e[1], CommError) and "peer rank failed" in str(e[1]), e[0]))
        raise errors[0][1]
    return results
