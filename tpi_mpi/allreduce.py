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

import math

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

    A start-up trial (the candidates in turns of a few back-to-back calls, no compute in between,
    each judged on its median turn: MpiComm._trial) ranks the candidates. The real calls can rank
    them differently: a rank computing between calls, a link that slows under sustained traffic.
    So the trial's best and every candidate within `CONTENDER` of it then play a match on real
    calls: `ROUNDS` rounds in which each serves one window, every other round in reverse order,
    each judged on its median window. A contender replaces the incumbent (the trial's best) only if
    it is more than `SLACK` faster. One window is a poor judge: on a 2-core host a window of 50 ms
    varies by +-20%, and deciding on one or two windows chose the slower of star and recursive
    doubling (9-20% apart) in 2 of 36 rows in each of two benchmark runs; one window once caught
    recursive doubling at 141 ms a call, its usual 193-237.

    A window is as many calls as last `MIN_WINDOW_S` at the fastest contender's trial time (at least
    `WINDOW`), so each rank knows when a window ends and the ranks agree only once the match is over
    (agreeing costs one MPI_Allreduce: at 4 ranks and 5 ms, 24 ms against 105 ms for a window of 8
    decode calls). The trial's times are already agreed; sizing windows from the match's first
    window instead let one stalled window (49 ms a call against the usual 1.5) set 8-call windows,
    too short to tell star from recursive doubling at 4 ranks and 0 ms.
    The pick is then re-checked at growing intervals (x4, up to every `CHECK_EVERY_MAX` calls) on
    the median of its window-long stretches; when that was more than `SLACK` slower than another
    contender's median, the two play a rematch. (The mean of the whole interval, against medians,
    started rematches for nothing: a few slow calls raise a mean.) A window's time per call is its
    mean over ranks, which comm.py agrees on (`figures()` averaged over ranks); this is bookkeeping.
    (The quickest rank's window flattered algorithms whose ranks take turns being early; each call's
    quickest rank made recursive doubling's 4-rank prefill look 1.7x faster than it was.)
    """

    CONTENDER, SLACK = 1.5, 1.05
    WINDOW, MIN_WINDOW_S, ROUNDS, CHECK_EVERY_MAX = 8, 0.05, 12, 4096

    def __init__(self, trial: dict[str, float]) -> None:
        self.trial = dict(trial)
        best = min(trial.values())
        contenders = sorted((a for a, t in trial.items() if t <= self.CONTENDER * best), key=trial.get)
        self.first_pick = contenders[0]
        self.observed: dict[str, float] = {}          # seconds per real call: each contender's median window
        self.explored: dict[str, list[float]] = {}    # the last match's windows
        self.window = max(self.WINDOW, math.ceil(self.MIN_WINDOW_S / best)) if best > 0 else self.WINDOW
        self.calls, self.check_every = 0, self.window
        self.times: list[float] = []                 # this rank's seconds per call of the pick since the last window
        self.changes: list[dict] = []
        self.rematches = 0
        self._start_match(contenders)

    def _start_match(self, players: list[str]) -> None:
        """players[0] is the incumbent."""
        self.players, self.exploring = players, len(players) > 1
        self.schedule = [p for r in range(self.ROUNDS) for p in (players if r % 2 == 0 else players[::-1])]
        self.played: list[float] = []                # this rank's mean per window, in schedule order
        self.pick = players[0]
        self.next_check = self.calls + (self.window * len(self.schedule) if self.exploring else self.check_every)

    def record(self, seconds: float) -> bool:
        """Counts one call of the pick; True when the ranks should now agree on `figures()`."""
        self.calls += 1
        self.times.append(seconds)
        if self.exploring and len(self.times) == self.window:
            self.played.append(sum(self.times) / self.window)   # a window ends on every rank at once
            self.times = []
            if len(self.played) < len(self.schedule):
                self.pick = self.schedule[len(self.played)]
        return self.calls == self.next_check

    def figures(self) -> np.ndarray:
        """What this rank has seen since the ranks last agreed."""
        if self.exploring:                            # every window of the match
            return np.array(self.played)
        return np.array(self.times).reshape(-1, self.window).mean(axis=1)   # a re-check: window-long stretches

    def revise(self, agreed: np.ndarray) -> None:
        """`agreed`: figures(), averaged over ranks."""
        self.times = []
        if not self.exploring:                        # a re-check
            observed = float(np.median(agreed))
            self.observed[self.pick] = observed
            others = [a for a in self.observed if a != self.pick]
            best = min(others, key=self.observed.get, default=None)
            if best is not None and observed > self.SLACK * self.observed[best]:
                self.rematches += 1
                self._start_match([self.pick, best])
                return
            self._next_check()
            return
        self.explored = {p: [float(t) for q, t in zip(self.schedule, agreed) if q == p] for p in self.players}
        medians = {p: float(np.median(w)) for p, w in self.explored.items()}
        self.observed.update(medians)
        incumbent = self.players[0]
        best = min(medians, key=medians.get)
        self.pick = best if medians[best] * self.SLACK < medians[incumbent] else incumbent
        if self.rematches and self.pick != incumbent:
            self.changes.append({"call": self.calls, "from": incumbent, "to": self.pick})
        self.exploring = False
        self._next_check()

    def _next_check(self) -> None:
        longest = self.window * max(1, self.CHECK_EVERY_MAX // self.window)   # whole windows
        self.check_every = min(4 * self.check_every, longest)
        self.next_check = self.calls + self.check_every
