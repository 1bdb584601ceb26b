"""`--allreduce auto`: per message size, the allreduce algorithm that is fastest here, chosen by
timing the candidates and re-checked on the real calls.

`AutoAllreduce` runs the calls: a start-up trial per size class, then `AutoChoice`'s match and
re-checks, with every rank's timings averaged over ranks (one MPI_Allreduce of integers) so that
all ranks make the same choice at the same call. `AutoChoice` is the bookkeeping, with no
communication. Built on comm.py's primitives (`barrier`, `sum_mpi`, `uncounted`, `record`) and
the algorithms of allreduce.py (the `run` it is given); no mpi4py here.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from .config import format_size

AUTO_CANDIDATES = ("star", "mpi", "ring", "recdouble")


class AutoAllreduce:
    """auto's picks per size class (a power of two of the message size), and the calls that keep them."""

    def __init__(self, p, run: Callable[[str, np.ndarray], None]) -> None:
        self.p, self.run_mode = p, run
        self.choices: dict[int, AutoChoice] = {}
        self.candidates = AUTO_CANDIDATES

    def choice(self, nbytes: int) -> AutoChoice | None:
        """auto's pick for messages of `nbytes` (None before the first such message)."""
        return self.choices.get(nbytes.bit_length())

    def run(self, arr: np.ndarray) -> None:
        """The current pick for this size class, timed so the pick can be revised. Every rank makes
        the same calls in the same order, so all check, agree and switch alike."""
        choice = self.choice(arr.nbytes) or self._trial(arr)
        t0 = time.perf_counter()
        self.run_mode(choice.pick, arr)
        if choice.record(time.perf_counter() - t0):
            choice.revise(self._mean_over_ranks(choice.figures()))

    def _mean_over_ranks(self, times: np.ndarray) -> np.ndarray:
        """Every rank's timings of the same calls, averaged over ranks. Not the slowest or the quickest
        rank: ranks take turns being early (at 2 ranks and 5 ms, recursive doubling's two ranks swap
        every call), so the slowest rank of an odd run of calls carries one delay more (7 calls timed
        13% slower than 8) and the quickest one less; the mean counts each rank's lead once.
        Summed as integer nanoseconds: exact in any order, so every rank gets the same bits and
        makes the same choice (a float sum may round differently from rank to rank)."""
        ns = np.rint(times * 1e9).astype(np.int64)
        self.p.sum_mpi(ns, "agreeing on an allreduce")
        mean = ns / (self.p.size * 1e9)
        self.p.record("auto", mean)
        return mean

    def _trial(self, arr: np.ndarray) -> AutoChoice:
        """Times every candidate with this very size (the mean over ranks, see _mean_over_ranks). The
        candidates take turns, a few calls each, and each keeps its median turn: a hiccup during
        one candidate's calls once made recursive doubling look 4x slower than it was (2 ranks, 2 ms,
        12.9 ms a call instead of 3), and a candidate ranked out here is never tried again."""
        trial = np.zeros_like(arr)
        rounds, calls = (4, 5) if arr.nbytes <= 1 << 16 else (3, 2)
        times = np.zeros((rounds, len(self.candidates)))
        with self.p.uncounted():              # trials are not traffic of the model
            for mode in self.candidates:
                self.run_mode(mode, trial)    # warm-up: connections, buffers
            for r in range(rounds):
                for i, mode in enumerate(self.candidates):
                    self.p.barrier()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        self.run_mode(mode, trial)
                    times[r, i] = (time.perf_counter() - t0) / calls
        median = np.median(self._mean_over_ranks(times), axis=0)
        choice = self.choices[arr.nbytes.bit_length()] = AutoChoice(dict(zip(self.candidates, median.tolist())))
        return choice

    def describe(self) -> str:
        picks = ", ".join(f"up to {format_size(1 << c)}: {a.pick}" + (f" (trial: {a.first_pick})" if
                                                                        a.pick != a.first_pick else "")
                          for c, a in sorted(self.choices.items()))
        return f"auto ({picks})" if picks else "auto"


class AutoChoice:
    """`--allreduce auto`'s pick for one message-size class.

    A start-up trial (the candidates in turns of a few back-to-back calls, no compute in between,
    each judged on its median turn: AutoAllreduce._trial) ranks the candidates. The real calls can rank
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
    mean over ranks, which AutoAllreduce agrees on (`figures()` averaged over ranks); this is bookkeeping.
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
