"""Processes and ports on this host, read the plain way (/proc, a bound socket): what the supervisor
needs to end every process of a launch, and what its benchmark and the tests need to start and
watch servers. No torch, no MPI, no HTTP stack here."""

from __future__ import annotations

import os
import socket
from pathlib import Path


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
