"""Allreduce algorithms composed from comm.py's transport, all summing float32 buffers in place, and
`Allreduce`, the `comm.allreduce` the model calls: one algorithm (or auto's pick) over tensors.

No mpi4py here: `p` is comm.py's `MpiComm`, which offers `rank`, `size`, `stats`, `scratch(shape, n, dtype)`,
`sum_mpi(buf)` and `exchange(sends, recvs, tag, what, recv_tag=None, grace=0)`, where sends are
(buffer, dest) and recvs (buffer, source) pairs that all complete before it returns. Each algorithm
leaves the same bits on every rank.

- mpi: MPI_Allreduce, whatever algorithm the MPI library picks.

- star: every rank sends to a hub, which adds in rank order and sends the total back. Two hops
  whatever the rank count: the algorithm for links where latency dominates. The one algorithm that
  carries a compressed payload (--allreduce-payload bf16 or q8, payload.py): every part travels
  encoded, the hub adds the decoded parts (its own encoded and decoded too, so the sum does not
  depend on which rank is the hub) and every rank, the hub included, decodes the one encoded total.
- ring: reduce-scatter then allgather around a ring, 2 (n - 1) steps of 1/n of the buffer each:
  the least data per link, the most hops.
- recdouble: recursive doubling, log2(n) exchanges of the whole buffer; for rank counts that are
  not powers of two the extra ranks first fold their data into a partner and get the result back.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from .allreduce_auto import AutoAllreduce
from .config import ALLREDUCE_MODES, check_payload
from .payload import CODECS

TAG_PART, TAG_SUM, TAG_RING, TAG_RD = 11, 12, 13, 14


def star(p, buf: np.ndarray, hub: int = 0, codec=None) -> None:
    if codec is not None:
        star_encoded(p, buf, hub, codec)
    elif p.rank == hub:
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
        # (rank 0 would anyway; another hub is given the time here)
        p.exchange([(buf, hub)], [(total, hub)], TAG_PART, "star allreduce: the total from the hub",
                   recv_tag=TAG_SUM, grace=2.0)
        buf[...] = total


def star_encoded(p, buf: np.ndarray, hub: int, codec) -> None:
    """star with every message in `codec`'s wire format (payload.py)."""
    (wire_bytes,) = wire_shape = (codec.wire_bytes(buf.shape),)
    if p.rank == hub:
        others = [r for r in range(p.size) if r != hub]
        *parts, own = p.scratch(wire_shape, len(others) + 1, np.uint8)
        p.exchange([], list(zip(parts, others)), TAG_PART, "star allreduce: partial sums")
        codec.encode(buf, own)
        total, part = np.zeros_like(buf), np.empty_like(buf)
        for r in range(p.size):          # fixed rank order: results repeat bit for bit
            codec.decode(own if r == hub else parts[others.index(r)], part)
            total += part
        codec.encode(total, own)
        codec.decode(own, buf)           # the total the others get, not the float32 one
        p.exchange([(own, r) for r in others], [], TAG_SUM, "star allreduce: sending the total")
    else:
        send, total = p.scratch(wire_shape, 2, np.uint8)
        codec.encode(buf, send)
        p.exchange([(send, hub)], [(total, hub)], TAG_PART, "star allreduce: the total from the hub",
                   recv_tag=TAG_SUM, grace=2.0)
        codec.decode(total, buf)


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


def mpi(p, buf: np.ndarray) -> None:
    p.stats.bytes_sent += buf.nbytes
    p.sum_mpi(buf)
    if p.link:                            # as a ring would: 2 (n - 1) steps of 1/n of the buffer
        time.sleep(2 * (p.size - 1) * p.link.cost(-(-buf.nbytes // p.size)))
    p.record("allreduce", buf)


ALGORITHMS = {"star": star, "mpi": mpi, "ring": ring, "recdouble": recdouble}


class Allreduce:
    """`comm.allreduce(x)`: the sum of `x` over all ranks by algorithm `mode` (switchable between
    calls, the same on every rank), added in float32 and returned in x's dtype; its parts and total
    travel as `payload` (payload.py: a compressed one only by star, which auto then always picks)."""

    def __init__(self, p, mode: str = "auto", hub: int = 0, payload: str = "fp32") -> None:
        if mode not in ALLREDUCE_MODES:
            raise ValueError(f"allreduce mode {mode!r}: use one of {', '.join(ALLREDUCE_MODES)}")
        check_payload(payload, mode)
        self.p, self.mode, self.hub, self.payload = p, mode, hub, payload
        self.codec = CODECS[payload]
        self.auto = AutoAllreduce(p, self.run)
        if self.codec is not None:
            self.auto.candidates = ("star",)

    def __call__(self, x: Tensor) -> Tensor:
        buf = x.detach().float().contiguous()
        arr = buf.numpy()
        stats = self.p.stats
        stats.calls += 1
        t0 = time.perf_counter()
        if self.mode == "auto":
            self.auto.run(arr)
        else:
            self.run(self.mode, arr)
        stats.seconds += time.perf_counter() - t0
        return buf if x.dtype == torch.float32 else buf.to(x.dtype)

    def keep_sum_order(self) -> bool:
        """Serving a batch, a sequence's sums must not depend on the message size (the batch's rows):
        auto then picks only among algorithms that add each element in one order whatever the size,
        star (rank order) and, at 3 ranks, recdouble (the same order there). ring and MPI's own choose
        their order by size: False when one of them is the mode (at 2 ranks any order is a + b)."""
        if self.p.size <= 2 or self.codec is not None:      # a compressed payload: star alone
            return True
        self.auto.candidates = ("star", "recdouble") if self.p.size == 3 else ("star",)
        return self.mode in ("auto", "star") or (self.mode == "recdouble" and self.p.size == 3)

    def run(self, mode: str, arr: np.ndarray) -> None:
        """One allreduce of `arr` in place with algorithm `mode` (not auto)."""
        if self.codec is not None and mode != "star":
            check_payload(self.payload, mode)     # a benchmark's SET_ALLREDUCE switched away from star: refused
        if mode == "star":
            star(self.p, arr, self.hub, self.codec)
        else:
            ALGORITHMS[mode](self.p, arr)

    def describe(self) -> str:
        """The algorithm in use, e.g. "star", "star, bf16 payload" or "auto (up to 4 KiB: star, up to
        4 MiB: ring (trial: recdouble))"."""
        mode = self.mode if self.mode != "auto" else self.auto.describe()
        return mode if self.codec is None else f"{mode}, {self.payload} payload"


