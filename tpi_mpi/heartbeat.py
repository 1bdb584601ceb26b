"""Heartbeats of a supervised engine's ranks: how a supervisor (supervisor.py) knows that every rank
lives, whatever the rank is doing or waiting for.

Each rank launched by a supervisor writes one short line to its standard output every BEAT_S
seconds, from a thread of its own, from its first moment (before torch and MPI start) to its end.
mpirun forwards every rank's output to the supervisor, from other hosts too, over its own
connections: the beats need no port, no MPI and no help from the rank's main thread. A rank that
computes, reads its shard, waits in MPI_Init or idles beats; one frozen (SIGSTOP, a device asleep)
or cut off (a host out of range) does not, and the supervisor (`Pulse`) names it once it has been
silent for --comm-timeout. Threads beat while the main thread waits in MPI only because those waits
release the GIL: mpi4py's calls do, and comm.py starts MPI that way too.

No torch, no MPI here.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

MARK = "tpi_mpi-beat"
BEAT_S = 0.5             # between two beats of a rank; --comm-timeout under a supervisor is at least 4 of them
MIN_TIMEOUT_S = 4 * BEAT_S
_BEATS = re.compile(rf"{MARK} (\d+)(?: (\S+))?\n?")     # rank, the node's hostname

beating = False          # this process beats (it is a rank launched by a supervisor)


def start_beating(rank: int) -> None:
    """Beat from a daemon thread until the process ends."""
    global beating
    line = f"{MARK} {rank} {socket.gethostname()}\n".encode()      # mpirun's messages name nodes so

    def beat() -> None:
        while True:
            try:
                os.write(1, line)       # one write of a short line: never split or mixed with another
            except OSError:             # mpirun has gone
                return
            time.sleep(BEAT_S)

    beating = True
    threading.Thread(target=beat, name="tpi_mpi-heartbeat", daemon=True).start()


class Pulse:
    """The supervisor's side, for one launch of `ranks` ranks: when each last beat. A rank is silent
    once `limit()` seconds have passed since its last beat (since the launch, before its first):
    while the engine starts, twice `timeout`, since mpirun starts the ranks (on other hosts too) and
    a rank's main thread holds the GIL for seconds at a time importing torch (gaps up to 3.1 s were
    seen on a loaded 2-core host); `timeout` once it serves."""

    def __init__(self, ranks: int, timeout: float) -> None:
        self.timeout, self.starting = timeout, True
        self.started = time.monotonic()
        self.last: list[float | None] = [None] * ranks
        self.longest = 0.0       # the longest gap between two beats of one rank so far: --comm-timeout's margin
        self.nodes: dict[int, str] = {}     # rank -> its node's hostname, as its beats say

    def limit(self) -> float:
        return 2 * self.timeout if self.starting else self.timeout

    def read(self, line: str, now: float | None = None) -> str:
        """Note the beats in a line of mpirun's output; the line without them."""
        if MARK not in line:
            return line
        now = time.monotonic() if now is None else now
        for rank, node in _BEATS.findall(line):
            if int(rank) < len(self.last):
                if (last := self.last[int(rank)]) is not None:
                    self.longest = max(self.longest, now - last)
                self.last[int(rank)] = now
                if node:
                    self.nodes[int(rank)] = node
        return _BEATS.sub("", line)

    def silent(self, now: float | None = None) -> list[int]:
        """The ranks silent longer than `limit()`."""
        now = time.monotonic() if now is None else now
        return [r for r, t in enumerate(self.last) if now - (self.started if t is None else t) > self.limit()]
