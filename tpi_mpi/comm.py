"""All communication between ranks; the only module that imports mpi4py.

`Comm` is the interface the rest of tpi_mpi talks to (local_comm.py). Two implementations declare
it: `LocalComm` (local_comm.py: the world of one, reductions return at once and mpi4py is never
imported, so the model runs and is tested without MPI) and `MpiComm` (here: MPI_COMM_WORLD). This module owns the transport: buffers, waits,
timeouts and the roll call that names a silent rank. The allreduce algorithms are composed from
its point-to-point `exchange` in allreduce.py (auto's choice among them in allreduce_auto.py);
`comm.allreduce` is that composition.

Everything moves as raw buffers (the capitalised mpi4py methods on contiguous NumPy arrays),
never as pickled objects. Every wait polls a non-blocking request and sleeps between polls, so a
rank waiting for its peers leaves the core to the ranks that compute (4 ranks on 2 cores is a
normal setup), and a peer that never answers becomes an error after `timeout` seconds.

`--link-model 2ms,300mbit` (a `SimulatedLink`, link_model.py) charges every message a modelled
link time, for what-if runs on one machine without root (tpi_mpi.netem emulates the link for real).
TPI_MPI_RECORD=folder keeps every buffer a rank receives (a `Recorder`, recorder.py).
"""

from __future__ import annotations

import ctypes
import os
import sys
import time
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from .allreduce import Allreduce
from .errors import CommError, ConfigError, PeerFailed
from .launcher import launched_by_mpi
from .link_model import SimulatedLink
from .local_comm import Comm, CommStats, LocalComm
from .recorder import Recorder

_FIRST_PAUSE, _MAX_PAUSE, _IDLE_PAUSE = 5e-6, 2e-4, 1e-2   # poll back-off, seconds
# A wait polls without sleeping for this long first: a peer a few microseconds behind is the usual
# case in a decode step, and the first sleep cost 30-100 us here (bench comm: 0.2 ms a 16 KiB
# allreduce between two ranks of one host). Short enough that a waiting rank sharing a core with a
# computing one (4 ranks on 2 cores) takes little of its time.
_SPIN_S = 5e-5
_TIMER_SLACK_NS = 1000      # Linux rounds a thread's sleeps up by its timer slack, 50 us by default
TAG_PING, TAG_PONG, TAG_LOGITS, TAG_ROLL, TAG_ROLL_ASK = 31, 32, 33, 34, 35
ROLL_CALL_S = 2.0           # how long a timed-out collective waits for its peers to answer a roll call
ANSWER_AFTER_S = 0.01       # a wait longer than this answers roll calls while it polls
# the other ranks wait this much longer than rank 0, so that rank 0, which reports for the job (to the
# user, or to a supervisor), times out first and has named the silent rank before anyone gives up
REPORTER_LEAD_S = ROLL_CALL_S + 1.0
# Open MPI's TCP transport sends a message over its eager limit (64 KiB) only once the receiver
# has answered a handshake, and that answer queues in the one TCP stream between the two ranks
# behind the receiver's own outgoing data: when two ranks exchange large buffers, one direction
# waits for the other (2 ranks, 5 ms, 300 Mbit/s, 2 MiB each way: 165 ms a call instead of 69,
# docs/allreduce-results.md).
# So messages go in segments of at most SEGMENT_BYTES, all under a raised eager limit: no handshake.
# The price: a segment that arrives before its receive is posted waits in a buffer of the receiver.
# A user's own OMPI_MCA_btl_tcp_eager_limit still wins.
SEGMENT_BYTES = 4 << 20
_OMPI_EAGER_LIMIT = str(2 * SEGMENT_BYTES)     # a segment and its headers, with room to spare
NAME_BYTES = 64                # gather_names: a host name, cut to this many bytes


class MpiComm(Comm):
    """MPI_COMM_WORLD with buffer-only collectives; `allreduce` is allreduce.py's algorithm `mode`
    composed from this comm's exchanges."""

    def __init__(self, mode: str = "auto", timeout: float = 60.0, hub: int = 0,
                 link: SimulatedLink | None = None, payload: str = "fp32") -> None:
        os.environ.setdefault("OMPI_MCA_btl_tcp_eager_limit", _OMPI_EAGER_LIMIT)   # read by MPI_Init
        self.MPI = MPI = _start_mpi()
        self.world = MPI.COMM_WORLD
        self.rank, self.size = self.world.Get_rank(), self.world.Get_size()
        if not 0 <= hub < self.size:          # every rank finds this alike: rank 0 alone says so
            error = ConfigError(f"--hub {hub}: choose a rank from 0 to {self.size - 1}") if self.rank == 0 \
                else PeerFailed("rank 0 reports a bad --hub")
            error.coordinated = True
            raise error
        self.timeout, self.link = timeout, link
        _fine_sleeps()
        self.stats = CommStats()
        self._scratch: dict[tuple, np.ndarray] = {}
        record = os.environ.get("TPI_MPI_RECORD")
        self.recorder = Recorder(record, self.rank) if record else None
        self.allreduce = Allreduce(self, mode, hub, payload)
        self._here, self._asked = np.array([self.rank], dtype=np.int64), np.empty(1, dtype=np.int64)
        self._roll_sends: list = []

    @property
    def mode(self) -> str:
        return self.allreduce.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self.allreduce.mode = mode

    def describe(self) -> str:
        return self.allreduce.describe()

    # -- waiting without spinning -------------------------------------------------------------
    def _wait(self, reqs: list, what: str, timeout: float | None | bool = True, peers: list[int] | None = None,
              sent_to: list[int] | None = None) -> None:
        """Poll until `reqs` complete, sleeping between polls; timeout=None waits forever. `peers[i]`:
        the rank receive i waits on; `sent_to[j]`: the rank the send after them goes to (a frozen
        rank stops reading, so a send larger than the link buffers never completes). Named if silent."""
        test = self.MPI.Request.Testall
        spin_until = time.perf_counter() + _SPIN_S
        while not test(reqs):
            if time.perf_counter() > spin_until:
                break
        else:
            return
        timeout = self.timeout if timeout is True else timeout
        if timeout is not None and self.rank != 0:
            timeout += REPORTER_LEAD_S
        start = time.monotonic()
        pause = _FIRST_PAUSE
        while not test(reqs):
            time.sleep(pause)
            waited = time.monotonic() - start
            # short waits (a peer computing) stay responsive; long idles poll rarely
            pause = min(pause * 2, _MAX_PAUSE if waited < 1.0 else _IDLE_PAUSE)
            if waited > ANSWER_AFTER_S:
                self._answer_roll_calls()
            if timeout is not None and waited > timeout:
                self._timed_out(reqs, what, timeout, peers, sent_to)

    def _timed_out(self, reqs: list, what: str, timeout: float, peers: list[int] | None,
                   sent_to: list[int] | None) -> None:
        """Raise the CommError naming the rank that has died or frozen. The peer waited on may be
        alive and waiting in turn for a silent third (recursive doubling at 3 ranks: rank 0 waits on
        rank 1, which waits on rank 2), so beyond two ranks a roll call names the silent ones."""
        n = len(peers or [])
        silent = [p for r, p in zip(reqs[:n], peers or []) if not r.Test()]
        deaf = [p for r, p in zip(reqs[n:], sent_to or []) if not r.Test()]
        waited_on = list(dict.fromkeys(silent or deaf))
        absent = self._roll_call() if peers is None or self.size > 2 else waited_on
        named = absent or waited_on
        ranks = ", ".join(map(str, named))
        if not named:
            who = "a peer rank did not answer"
        elif waited_on and set(named) != set(waited_on):
            who = f"rank {ranks} answered no roll call (rank {', '.join(map(str, waited_on))} waited on it)"
        else:
            who = f"rank {ranks} {'took' if deaf and not silent else 'sent'} nothing"
        raise CommError(f"{who} for {timeout:g} s ({what}): it has died or frozen "
                        f"(raise --comm-timeout if it is only slow)", named)

    def _roll_call(self) -> list[int]:
        """The ranks that do not answer within ROLL_CALL_S, asked when a collective timed out. A live
        rank is waiting in the same collective (or soon will be) and answers from its polling loop,
        whenever its own time limit runs out; a dead or frozen one cannot."""
        answers = {r: np.empty(1, dtype=np.int64) for r in range(self.size) if r != self.rank}
        reqs = {r: self.world.Irecv(buf, source=r, tag=TAG_ROLL) for r, buf in answers.items()}
        self._roll_sends += [self.world.Isend(self._here, dest=r, tag=TAG_ROLL_ASK) for r in answers]
        end = time.monotonic() + ROLL_CALL_S
        while time.monotonic() < end and not all(req.Test() for req in reqs.values()):
            time.sleep(0.01)
            self._answer_roll_calls()            # another rank may be asking at the same moment
        return [r for r, req in reqs.items() if not req.Test()]

    def _answer_roll_calls(self) -> None:
        """Tell every rank that asks (its collective timed out) that this one is alive."""
        status = self.MPI.Status()
        while self.world.Iprobe(source=self.MPI.ANY_SOURCE, tag=TAG_ROLL_ASK, status=status):
            asker = status.Get_source()
            self.world.Recv(self._asked, source=asker, tag=TAG_ROLL_ASK)
            self._roll_sends.append(self.world.Isend(self._here, dest=asker, tag=TAG_ROLL))   # the job is ending

    def _timed(self, nbytes: int):
        self.stats.calls += 1
        self.stats.bytes_sent += nbytes
        return time.perf_counter()

    # -- point to point, for the algorithms of allreduce.py ---------------------------------------
    def exchange(self, sends: list, recvs: list, tag: int, what: str, recv_tag: int | None = None,
                 grace: float = 0.0, patient: bool = False) -> None:
        """Post every receive, then every send, and wait for all of them (`patient`: without a
        time limit). Buffers go in segments (see SEGMENT_BYTES); MPI keeps messages between two ranks
        with one tag in order, so segment i lands in segment i."""
        rtag = tag if recv_tag is None else recv_tag
        rreqs, peers = [], []
        for buf, src in recvs:
            for segment in _segments(buf):
                rreqs.append(self.world.Irecv(segment, source=src, tag=rtag))
                peers.append(src)
        sreqs = [self.world.Isend(segment, dest=dst, tag=tag) for buf, dst in sends for segment in _segments(buf)]
        self.stats.bytes_sent += sum(buf.nbytes for buf, _ in sends)
        self._wait(rreqs + sreqs, what, None if patient else self.timeout + grace, peers=peers,
                   sent_to=[dst for buf, dst in sends for _ in _segments(buf)])
        if self.link and recvs:
            time.sleep(self.link.cost(sum(buf.nbytes for buf, _ in recvs)))
        for buf, _ in recvs:
            self.record("p2p", buf)

    def pingpong(self, peer: int, buf: np.ndarray, repeats: int) -> list[float]:
        """`repeats` round trips of `buf` between this rank and `peer`, which calls it naming this
        rank; the lower rank starts each. Returns its one-way times (round trip / 2) in seconds,
        and [] on the other rank."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            if self.rank < peer:
                self.exchange([(buf, peer)], [], TAG_PING, "ping")
                self.exchange([], [(buf, peer)], TAG_PONG, "waiting for a pong")
                times.append((time.perf_counter() - t0) / 2)
            else:
                self.exchange([], [(buf, peer)], TAG_PING, "waiting for a ping")
                self.exchange([(buf, peer)], [], TAG_PONG, "pong")
        return times

    def scratch(self, shape: tuple, n: int, dtype=np.float32) -> list[np.ndarray]:
        """n reusable buffers of `shape` (allocated once per shape and dtype)."""
        key = (shape, n, np.dtype(dtype).str)
        if key not in self._scratch:
            self._scratch[key] = np.empty((n, *shape), dtype=dtype)
        return list(self._scratch[key])

    def sum_mpi(self, arr: np.ndarray, what: str = "in MPI_Allreduce") -> None:
        """MPI_Allreduce(SUM) in place: the `mpi` algorithm, and auto's agreement on timings."""
        self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, arr, op=self.MPI.SUM)], what)

    @contextmanager
    def uncounted(self):
        """Traffic that is not the model's (auto's trials): kept out of `stats`."""
        saved, self.stats = self.stats, CommStats()
        try:
            yield
        finally:
            self.stats = saved

    def record(self, op: str, buf: np.ndarray) -> None:
        """Keep a received buffer for TPI_MPI_RECORD (see Recorder)."""
        if self.recorder:
            self.recorder.add(op, buf)

    # -- collectives ---------------------------------------------------------------------------
    def gather_columns(self, local: Tensor, counts: list[int]) -> Tensor | None:
        """Concatenate every rank's (T, counts[r]) float32 block along dim 1 on rank 0. Point to
        point rather than MPI_Gatherv: a rank that never sends its block is then named."""
        send = local.contiguous().numpy()
        t0 = self._timed(0)                   # exchange counts the bytes; rank 0's own block stays put
        if self.rank == 0:
            blocks = [send] + [np.empty((send.shape[0], c), dtype=np.float32) for c in counts[1:]]
            self.exchange([], [(b, r) for r, b in enumerate(blocks) if r], TAG_LOGITS, "gathering logits")
            out = torch.from_numpy(np.concatenate(blocks, axis=1))
        else:
            self.exchange([(send, 0)], [], TAG_LOGITS, "sending logits to rank 0")
            out = None
        self.stats.seconds += time.perf_counter() - t0
        return out

    def bcast(self, buf: np.ndarray, root: int = 0, timeout: float | None | bool = True) -> np.ndarray:
        """Broadcast a contiguous array in place (every rank passes one of the same size)."""
        t0 = self._timed(buf.nbytes if self.rank == root else 0)
        what = "broadcasting" if self.rank == root else f"waiting for a broadcast from rank {root}"
        self._wait([self.world.Ibcast(buf, root=root)], what, timeout)
        if self.rank != root:
            self.record("bcast", buf)
        self.stats.seconds += time.perf_counter() - t0
        return buf

    def gather_floats(self, value: float) -> list[float] | None:
        out = np.empty(self.size, dtype=np.float64) if self.rank == 0 else None
        self._wait([self.world.Igather(np.array([value], dtype=np.float64), out, root=0)], "gathering stats")
        return out.tolist() if out is not None else None

    def gather_names(self, name: str) -> list[str] | None:
        mine = np.zeros(NAME_BYTES, dtype=np.uint8)              # fixed size: a plain Gather, no pickle
        raw = name.encode()[:NAME_BYTES]
        mine[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        out = np.empty((self.size, NAME_BYTES), dtype=np.uint8) if self.rank == 0 else None
        self._wait([self.world.Igather(mine, out, root=0)], "gathering host names")
        return None if out is None else [bytes(row).rstrip(b"\0").decode(errors="replace") for row in out]

    def agree(self, ok: bool, timeout: float | None = None) -> int:
        """The lowest rank that is not ok, or -1 when every rank is (a start-up vote)."""
        mine = np.array([self.size if ok else self.rank], dtype=np.int64)
        self._wait([self.world.Iallreduce(self.MPI.IN_PLACE, mine, op=self.MPI.MIN)], "agreeing on start-up", timeout)
        self.record("agree", mine)
        return -1 if mine[0] == self.size else int(mine[0])

    def barrier(self) -> None:
        self._wait([self.world.Ibarrier()], "at a barrier")

    def ranks_on_this_host(self, key: int = 0) -> int:
        local = self.world.Split_type(self.MPI.COMM_TYPE_SHARED)
        same = local.Split(key)
        n = same.Get_size()
        same.Free()
        local.Free()
        return n


def _start_mpi():
    """mpi4py's MPI module, MPI started. MPI_Init waits for every rank; mpi4py calls it holding the
    GIL, so a rank of a supervised engine starts MPI itself through ctypes, which lets go of the GIL
    during the call: its heartbeat thread beats meanwhile (heartbeat.py), and a rank frozen before
    MPI_Init is told from the ranks waiting for it there."""
    import mpi4py

    from . import heartbeat

    if heartbeat.beating and "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize, mpi4py.rc.finalize = False, True
        from mpi4py import MPI

        with open("/proc/self/maps") as maps:     # the libmpi mpi4py has loaded
            lib = next((line.split()[-1] for line in maps if "/libmpi.so" in line), None)
        if lib is None:                            # not Open MPI's name: mpi4py's own way
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
        else:
            provided = ctypes.c_int()
            if ctypes.CDLL(lib).MPI_Init_thread(None, None, MPI.THREAD_MULTIPLE, ctypes.byref(provided)) != 0:
                raise CommError("MPI_Init_thread failed (see the MPI messages above)", [])
        return MPI
    from mpi4py import MPI

    return MPI


def _segments(buf: np.ndarray) -> list[np.ndarray]:
    """Views of a contiguous buffer of at most SEGMENT_BYTES each (an empty buffer: itself)."""
    if not buf.flags.c_contiguous:      # reshape would copy, and a receive would fill the copy
        raise ValueError("MPI buffers must be contiguous")
    flat = buf.reshape(-1)
    step = max(1, SEGMENT_BYTES // max(flat.itemsize, 1))
    return [flat[i:i + step] for i in range(0, max(flat.size, 1), step)]


def make_comm(mode: str = "auto", timeout: float = 60.0, hub: int = 0, link_model: str | None = None,
              payload: str = "fp32") -> Comm:
    """MpiComm when launched by mpirun with more than one rank, else LocalComm.
    `link_model` ('2ms,300mbit'): charge each message that link's time (SimulatedLink); `payload`:
    how allreduce parts travel (payload.py)."""
    link = SimulatedLink.parse(link_model) if link_model else None
    if not launched_by_mpi():
        return LocalComm()
    comm = MpiComm(mode, timeout, hub, link, payload)
    return LocalComm() if comm.size == 1 else comm


def abort_job(code: int = 1) -> None:
    """End every rank of the job at once (MPI_Abort) if MPI is running with peers; else return.
    Asked of MPI itself, so no module needs to remember the comm in use."""
    mpi4py = sys.modules.get("mpi4py.MPI")
    if mpi4py is not None and mpi4py.Is_initialized() and not mpi4py.Is_finalized() \
            and mpi4py.COMM_WORLD.Get_size() > 1:
        mpi4py.COMM_WORLD.Abort(code)



def _fine_sleeps() -> None:
    """Let this thread's short sleeps (the waits' polls) be as short as asked: Linux's timer slack, where
    it has one (prctl PR_SET_TIMERSLACK), down from 50 us to 1 us."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, _TIMER_SLACK_NS, 0, 0, 0)    # 29: PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass
