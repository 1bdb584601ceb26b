"""The processes a supervisor launches, seen from outside: the engine under mpirun (`EngineProcess`:
its output relayed, its rank 0's channel, its end, and which rank it failed on) and a prepare for
one rank fewer at the lowest CPU priority (`Ahead`). Which devices to launch on is devices.py's;
what to do about a failure is supervisor.py's. No torch, no MPI here."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from subprocess import DEVNULL, PIPE, STDOUT, Popen, TimeoutExpired
from typing import Callable

from .channel import Channel
from .heartbeat import Pulse
from .processes import session_pids

EXIT_GRACE_S = 3.0     # after a failure: how long mpirun may take to end the job itself

# how mpirun and our entry point name a rank that failed (rank, why), most telling first
RANK_PATTERNS = [re.compile(p) for p in (
    r"process rank (\d+) with PID \d+ on node \S+ (exited on signal \d+ \(\w+\))",
    r"tpi_mpi: rank (\d+): (error: [^\n]*)",
    r"process rank (\d+) with PID \d+ on node \S+ (exited [^.]*)",
    r"MPI_ABORT was invoked on rank (\d+) (in communicator)",
)]


def ranks_named(lines: list[str]) -> tuple[list[int], str]:
    """The ranks that mpirun's and the ranks' own lines name as failed, and why."""
    text = "\n".join(" ".join(ln.split()) for ln in lines)
    wrapped = " ".join(text.split())                  # mpirun wraps its messages over lines
    for pattern in RANK_PATTERNS:
        if found := pattern.findall(text if "error" in pattern.pattern else wrapped):
            ranks = list(dict.fromkeys(int(r) for r, _ in found))
            return ranks, found[0][1]
    return [], ""


# Open MPI 5 when a host's daemon (prted) is gone: it names the daemon by its index, which is the
# host's place among the hosts of the launch (0: mpirun's own), and the node by the name it gave
LOST_DAEMON = re.compile(r"lost communication with a remote daemon\..*?Remote daemon: \[\S*?,(\d+)\] on node (\S+)")


def lost_host(lines: list[str], hosts: list[str]) -> tuple[str, str] | None:
    """(host, the name its node gave) of a host whose daemon mpirun lost, from mpirun's lines;
    `hosts`: the launch's, by rank (mpirun fills a host's slots before the next host's)."""
    found = LOST_DAEMON.search(" ".join(" ".join(lines).split()))
    if not found:
        return None
    distinct = list(dict.fromkeys(hosts))
    index, node = int(found.group(1)), found.group(2)
    return (distinct[index], node) if 0 < index < len(distinct) else None


@dataclass
class Failure:
    message: str
    ranks: list[int] = field(default_factory=list)     # the ranks to drop
    fatal: bool = False                                 # starting again would fail alike
    hosts: list[str] = field(default_factory=list)     # hosts the launcher could not reach (all their slots go)
    at: float = field(default_factory=time.time)       # when the supervisor learned of it


class EngineProcess:
    """One launch of the engine on `hosts` (by rank): mpirun in a session of its own, its output
    relayed to ours (the last lines kept, to learn which rank failed; the ranks' heartbeats taken
    out and noted in `pulse`), and the channel its rank 0 opens."""

    def __init__(self, argv: list[str], listener: socket.socket, hosts: list[str], timeout: float) -> None:
        self.hosts, self.timeout = hosts, timeout
        self.pulse = Pulse(len(hosts), timeout)
        env = dict(os.environ)
        if os.geteuid() == 0:          # the supervisor was run as root: so are the ranks it launches
            env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
        self.proc = Popen(argv, stdin=DEVNULL, stdout=PIPE, stderr=STDOUT, env=env, start_new_session=True)
        self.tail: deque[str] = deque(maxlen=200)
        self.relay = threading.Thread(target=self._relay, daemon=True, name="tpi_mpi-engine-output")
        self.relay.start()
        self.listener, self.channel = listener, None
        self.ready: dict | None = None

    def _relay(self) -> None:
        for raw in self.proc.stdout:
            line = self.pulse.read(raw.decode(errors="replace"))
            if not line:
                continue
            self.tail.append(line)
            sys.stderr.write(line)
        sys.stderr.flush()

    def start(self, stopping: threading.Event) -> dict | Failure:
        """Wait until rank 0 reports ready (its info) or the launch failed. Starting may take long
        (rank 0 prepares the model, ships the shards, every rank loads its own): the deadline is the
        ranks' heartbeats (`silence`); the ranks' own waits have theirs too (startup.py)."""
        hosts = self.hosts
        while self.channel is None:
            if stopping.is_set():
                return Failure("stopped")
            if self.proc.poll() is not None:
                return self.failure(None, hosts)
            if silent := self.silence():
                return silent
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.channel = Channel(sock, background=True)      # sending never blocks the HTTP loop
        while True:                  # rank 0 prepares, ships and loads the shards: as long as every rank beats
            if stopping.is_set():
                return Failure("stopped")
            if silent := self.silence():
                return silent
            try:
                message = self.channel.recv(timeout=0.2)
                break
            except TimeoutError:
                continue
        if message is None or "failed" in message:
            return self.failure(message and message["failed"], hosts)
        self.ready = message["ready"]
        self.pulse.starting = False
        return self.ready

    def silence(self) -> Failure | None:
        """If a rank has not beaten for the time limit: the job ended, and that rank named (all of a
        host's ranks, when its link is cut). None while every rank beats. When every rank of several
        is silent at once, none is named: the fault is then between them and us (mpirun's output
        forwarding, or this process was stalled itself)."""
        quiet = self.pulse.silent()
        if not quiet or self.proc.poll() is not None:      # ended: mpirun's own lines say why
            return None
        at = time.time()
        self.end()                                         # a frozen rank is waited for by nobody
        if len(quiet) == len(self.hosts) > 1:
            return Failure(f"no rank gave a sign of life for {self.pulse.limit():g} s: mpirun stopped forwarding "
                           "their output", at=at)
        named = ", ".join(f"{r} ({self.hosts[r]})" for r in quiet)
        limit = "2 x --comm-timeout while starting" if self.pulse.starting else "--comm-timeout"
        return Failure(f"rank {named} gave no sign of life for {self.pulse.limit():g} s ({limit}): it has died, "
                       "frozen or lost its network", quiet, at=at)

    def failure(self, report: dict | None, hosts: list[str]) -> Failure:
        """Why the engine ended: rank 0's report, else what mpirun and the ranks printed (a rank
        named, or else another of `hosts` than rank 0's named in an error line)."""
        at = time.time()
        self.end(grace=EXIT_GRACE_S)
        if report:
            message = report["message"]
            if report["fatal"] and report["ranks"]:          # another rank's own error: it printed it
                message = next((ln.strip().removeprefix("tpi_mpi: error: ") for ln in reversed(self.tail)
                                if ln.startswith("tpi_mpi: error:")), message)
            return Failure(message, report["ranks"], report["fatal"], at=at)
        ranks, why = ranks_named(list(self.tail))
        if ranks:
            return Failure(f"rank {', '.join(map(str, ranks))} {why}", ranks, at=at)
        if lost := lost_host(list(self.tail), hosts):
            host, node = lost
            return Failure(f"the host {host} (node {node}) was lost: mpirun lost its daemon there", hosts=[host], at=at)
        last = next((ln.strip() for ln in reversed(self.tail) if "error" in ln.lower()), None)
        text = " ".join(self.tail)
        # a host named by mpirun ("A daemon failed to report back ... Remote host: X"), as the hostfile
        # writes it or by the hostname its ranks' beats gave
        names = {r: [h] + [n for n in [self.pulse.nodes.get(r)] if n and n != self.pulse.nodes.get(0)]
                 for r, h in enumerate(hosts)}
        unreachable = list(dict.fromkeys(h for r, h in enumerate(hosts) if h != hosts[0] and any(
            re.search(rf"(?<![\w.-]){re.escape(n)}(?![\w.-])", text) for n in names[r])))
        named = f"; mpirun's messages name {', '.join(unreachable)}" if unreachable else ""
        return Failure(f"the engine ended (exit status {self.proc.returncode}){f': {last}' if last else ''}{named}",
                       hosts=unreachable, at=at)

    def end(self, grace: float = 0.0) -> None:
        """Close the channel (the engine's stop), give mpirun `grace` seconds to end the job, then
        kill every process of its session, ranks frozen by SIGSTOP included."""
        if self.channel:
            self.channel.close()
        try:
            self.proc.wait(timeout=grace)
        except TimeoutExpired:
            pass
        for pid in session_pids(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.relay.join(timeout=2)
        if self.pulse.longest:
            sys.stderr.write(f"tpi_mpi: supervisor: the longest gap between two beats of a rank was "
                             f"{self.pulse.longest:.2f} s (--comm-timeout {self.timeout:g})\n")


class Ahead:
    """The model prepared for `world` ranks into the cache by a process at the lowest CPU priority,
    while the engine serves on one rank more."""

    def __init__(self, argv: list[str], world: int, log: Callable[[str], None]) -> None:
        self.world, self.log = world, log
        self.proc = Popen(argv, stdin=DEVNULL, stdout=DEVNULL, start_new_session=True)
        try:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)
        except OSError:
            pass

    def finish(self, world: int | None) -> None:
        """Before a launch on `world` ranks: wait for it if it prepares that size, else stop it (SIGINT:
        prepare removes its staging folder)."""
        if self.proc.poll() is not None:
            return
        if world == self.world:
            self.log(f"waiting for the model being prepared for {world} rank(s)")
            try:
                os.setpriority(os.PRIO_PROCESS, self.proc.pid, 0)     # nothing else runs now
            except OSError:
                pass
            self.proc.wait()
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
