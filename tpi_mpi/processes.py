"""Processes and ports on this host, read the plain way (/proc, a bound socket): what the supervisor
needs to end every process of a launch, and what its benchmark and the tests need to start and
watch servers; and whether the input of the mpirun above a rank has ended. No torch, no MPI, no
HTTP stack here."""

from __future__ import annotations

import os
import re
import select
import socket
import stat
from pathlib import Path
from typing import Callable


def proc_stat(pid: int | str) -> tuple[str, int, int] | None:
    """(state, ppid, session) of a process from /proc, None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()          # after "pid (comm) "
    return fields[0], int(fields[1]), int(fields[3])


def session_pids(*sids: int) -> list[int]:
    """Every live process (zombies are over) of these sessions: mpirun, started as a session's
    leader, and the ranks it forked, which Open MPI puts in process groups of their own."""
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and (s := proc_stat(e)) and s[2] in sids and s[0] != "Z"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a server started next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LAUNCHERS = ("prterun", "mpirun", "mpiexec", "orterun")      # Open MPI's, which forward their stdin to rank 0


def launcher_input_ended() -> Callable[[], bool] | None:
    """For a rank whose parent is mpirun: a check that mpirun's own stdin has ended and been read to
    the end (what it read is then passed on within milliseconds), told from /proc without reading it:
    a pipe with no writer left and nothing in it, a file read to its size, /dev/null. Open MPI 5 never
    passes that end on to rank 0. None where it cannot be told: another parent (rank 0 on another
    host, no mpirun), a terminal, no access to /proc."""
    pid = os.getppid()
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() not in LAUNCHERS:
            return None
        source = f"/proc/{pid}/fd/0"
        st = os.stat(source)
        if stat.S_ISFIFO(st.st_mode):            # a read end of our own on the same pipe, never read from
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
            poller = select.poll()
            poller.register(fd, select.POLLIN)

            def drained() -> bool:
                events = dict(poller.poll(0)).get(fd, 0)
                return bool(events & select.POLLHUP) and not events & select.POLLIN
            return drained
        if stat.S_ISREG(st.st_mode):
            def read_through() -> bool:
                pos = re.search(r"^pos:\s*(\d+)", Path(f"/proc/{pid}/fdinfo/0").read_text(), re.M)
                return int(pos.group(1)) >= os.stat(source).st_size
            return read_through
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.stat(os.devnull).st_rdev:
            return lambda: True
    except OSError:
        return None
    return None
