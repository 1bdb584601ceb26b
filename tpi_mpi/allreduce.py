"""Allreduce algorithms written over point-to-point exchanges, all summing float32 buffers in place.

No mpi4py here: `p` is comm.py's `MpiComm`, which offers `rank`, `size`, `scratch(shape, n)` and
`exchange(sends, recvs, tag, what, recv_tag=None, grace=0)`, where sends are (buffer, dest) and
recvs (buffer, source) pairs that all complete before it returns. Each algorithm leaves the same bits on every rank.

- star: every rank sends to a hub, which adds in rank order and sends the total back. Two hops
  whatever the rank count: the algorithm for links where latency dominates.
- ring: reduce-scatter then allgather around a ring, 2 (n - 1) steps of 1/n of the buffer each:
  the least data per link, the most hops.
- recdouble: recursive doubling, log2(n) exchanges of the whole buffer; for rank counts that are
  not powers of two the extra ranks first fold their data into a partner and get the result back.
"""

from __future__ import annotations

import numpy as np

TAG_PART, TAG_SUM, TAG_RING, TAG_RD = 11, 12, 13, 14


def star(p, buf: np.ndarray, hub: int = 0) -> None:
    if p.rank == hub:
        others = [r for r in range(p.size) if r != hub]
        parts = p.scratch(buf.shape, len(others))
        p.exchange([], list(zip(parts, others)), TAG_PART, "star allreduce: partial sums")
        total = np.zeros_like(buf)
        for r in range(p.size):          # fixed rank order: results repeat bit for bit
            total += buf if r == hub else parts[others.index(r)]
        buf[...] = total
        p.exchange([(buf, r) for r in others], [], TAG_SUM, "star allreduce: sending the total")
    else:
        (total,) = p.scratch(buf.shape, 1)   # a send buffer must not be written while in flight
        # waits a little longer than the hub, so that the hub, which knows who is missing, reports first
        p.exchange([(buf, hub)], [(total, hub)], TAG_PART, "star allreduce: the total from the hub",
                   recv_tag=TAG_SUM, grace=2.0)
        buf[...] = total


def ring(p, buf: np.ndarray) -> None:
    n, rank = p.size, p.rank
    if n == 1:
        return
    flat = buf.reshape(-1)
    edges = np.linspace(0, flat.size, n + 1).astype(int)
    chunk = [flat[edges[i]:edges[i + 1]] for i in range(n)]
    right, left = (rank + 1) % n, (rank - 1) % n
    (tmp,) = p.scratch((int(np.diff(edges).max()),), 1)
    for step in range(n - 1):            # reduce-scatter: chunk (rank + 1) ends up complete here
        send, recv = (rank - step) % n, (rank - step - 1) % n
        incoming = tmp[:chunk[recv].size]
        p.exchange([(chunk[send], right)], [(incoming, left)], TAG_RING, "ring allreduce")
        chunk[recv] += incoming
    for step in range(n - 1):            # allgather the complete chunks
        send, recv = (rank + 1 - step) % n, (rank - step) % n
        p.exchange([(chunk[send], right)], [(chunk[recv], left)], TAG_RING, "ring allreduce")


def recdouble(p, buf: np.ndarray) -> None:
    n, rank = p.size, p.rank
    if n == 1:
        return
    pow2 = 1 << (n.bit_length() - 1)
    extra = n - pow2                     # ranks 0..2*extra-1 pair up: evens fold into odds
    (tmp,) = p.scratch(buf.shape, 1)
    if rank < 2 * extra:
        if rank % 2 == 0:
            p.exchange([(buf, rank + 1)], [], TAG_RD, "recursive doubling: folding in")
            p.exchange([], [(buf, rank + 1)], TAG_RD, "recursive doubling: the result")
            return
        p.exchange([], [(tmp, rank - 1)], TAG_RD, "recursive doubling: folding in")
        buf += tmp
        virtual = rank // 2
    else:
        virtual = rank - extra
    mask = 1
    while mask < pow2:
        v = virtual ^ mask
        partner = 2 * v + 1 if v < extra else v + extra
        p.exchange([(buf, partner)], [(tmp, partner)], TAG_RD, "recursive doubling")
        buf += tmp                       # a + b == b + a: both partners hold the same bits
        mask <<= 1
    if rank < 2 * extra:
        p.exchange([(buf, rank - 1)], [], TAG_RD, "recursive doubling: the result")


ALGORITHMS = {"star": star, "ring": ring, "recdouble": recdouble}


class AutoChoice:
    """`--allreduce auto`'s pick for one message-size class.

    A start-up trial of a few calls per candidate gives the first pick, but a short trial can
    flatter an algorithm (a queue that has not filled yet, a neighbour's burst of load), so the pick
    is revised from the calls the model really makes: at call 4, 16, 64, ... (x4, then every 4096)
    the ranks agree on the pick's observed seconds per call, which replace its trial figure; if
    another candidate is then more than `SLACK` faster, it becomes the pick. Once every candidate
    has been observed the pick is the fastest observed. Pure bookkeeping: comm.py does the MPI.
    """

    SLACK = 1.05
    FIRST_CHECK, CHECK_EVERY_MAX = 4, 4096

    def __init__(self, trial: dict[str, float]) -> None:
        self.trial = dict(trial)
        self.times = dict(trial)              # seconds per call: trial figures, then observed ones
        self.pick = min(self.times, key=self.times.get)
        self.calls, self.next_check = 0, self.FIRST_CHECK
        self.window_calls, self.window_s = 0, 0.0   # this rank's calls of the pick since the last check
        self.changes: list[dict] = []

    def record(self, seconds: float) -> bool:
        """Counts one call of the pick; True when the ranks should now agree on its time per call."""
        self.calls += 1
        self.window_calls += 1
        self.window_s += seconds
        return self.calls == self.next_check

    def mean_s(self) -> float:
        return self.window_s / max(self.window_calls, 1)

    def revise(self, observed: float) -> None:
        """`observed`: the pick's seconds per call since the last check, agreed by all ranks."""
        self.times[self.pick] = observed
        best = min(self.times, key=self.times.get)
        if observed > self.SLACK * self.times[best]:
            self.changes.append({"call": self.calls, "from": self.pick, "to": best,
                                 "observed_s": observed, "expected_s": self.times[best]})
            self.pick = best
        self.window_calls, self.window_s = 0, 0.0
        self.next_check = min(4 * self.next_check, self.next_check + self.CHECK_EVERY_MAX)
