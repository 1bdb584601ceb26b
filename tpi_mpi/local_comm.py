"""The communicator the engine talks to: the `Comm` interface, the statistics every comm keeps, and
`LocalComm`, the world of one rank (reductions return at once; no MPI). comm.py's `MpiComm` is the
other implementation, over MPI_COMM_WORLD.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

from .link_model import SimulatedLink


@dataclass
class CommStats:
    seconds: float = 0.0      # wall time inside communication calls
    bytes_sent: int = 0
    calls: int = 0


class Comm(Protocol):
    """What the model, the step protocol and start-up ask of a communicator. Buffers are contiguous
    NumPy arrays; `timeout` True means the comm's own --comm-timeout, None no limit."""
    rank: int
    size: int
    stats: CommStats
    link: SimulatedLink | None
    mode: str                         # the allreduce algorithm in use

    def allreduce(self, x: Tensor) -> Tensor:
        """Sum of `x` over all ranks, added in float32, returned in x's dtype."""

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Every rank's (T, counts[r]) float32 block side by side on rank 0; None elsewhere."""

    def bcast(self, buf: np.ndarray, root: int = 0, timeout: float | None | bool = True) -> np.ndarray:
        """`buf` from `root` to every rank, in place."""

    def gather_floats(self, value: float) -> list[float] | None:
        """Every rank's `value` on rank 0; None elsewhere."""

    def gather_names(self, name: str) -> list[str] | None:
        """Every rank's short `name` (its host, at start-up) on rank 0; None elsewhere."""

    def agree(self, ok: bool, timeout: float | None = None) -> int:
        """The lowest rank that is not ok, or -1 when every rank is (a start-up vote)."""

    def barrier(self) -> None: ...

    def ranks_on_this_host(self, key: int = 0) -> int:
        """Ranks on this host (a collective) whose `key` is this rank's: e.g. those in one memory cgroup."""

    def describe(self) -> str:
        """The allreduce in use, for people."""


class LocalComm(Comm):
    """A world of one rank: nothing to exchange."""

    rank, size, link, mode = 0, 1, None, "none"

    def __init__(self) -> None:
        self.stats = CommStats()

    def describe(self) -> str:
        return "none"

    def allreduce(self, x: Tensor) -> Tensor:
        return x

    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor:
        return local

    def bcast(self, buf: np.ndarray, root: int = 0, timeout: float | None | bool = True) -> np.ndarray:
        return buf

    def gather_floats(self, value: float) -> list[float]:
        return [value]

    def gather_names(self, name: str) -> list[str]:
        return [name]

    def agree(self, ok: bool, timeout: float | None = None) -> int:
        return -1 if ok else 0

    def barrier(self) -> None:
        pass

    def ranks_on_this_host(self, key: int = 0) -> int:
        return 1
