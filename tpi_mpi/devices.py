"""The devices a supervised engine runs on (`serve --ranks N [--hostfile H]`): the hostfile's slots,
in order (mpirun places rank r on the r-th slot, --map-by slot), or N slots on this host, less the
ones dropped since the hostfile last changed. Rank 0 runs on the first slot, which must be this
host: the supervisor runs there. No processes are started here (engine_process.py does that)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from .errors import ConfigError

LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per line of an Open MPI hostfile ('host slots=N', '#' comments)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--hostfile {path}: {e.strerror}") from None
    hosts = []
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#")[0].split()
        if not words:
            continue
        slots = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("slots=")), "1")
        if not slots.isdigit() or int(slots) < 1:
            raise ConfigError(f"--hostfile {path} line {n}: slots={slots}: write a positive number")
        hosts.append((words[0], int(slots)))
    if not hosts:
        raise ConfigError(f"--hostfile {path} lists no host")
    return hosts


def is_this_host(name: str) -> bool:
    if name in LOCAL_NAMES or name in (socket.gethostname(), socket.getfqdn()):
        return True
    try:                              # an address of one of this host's interfaces: it can be bound
        with socket.socket(socket.AF_INET6 if ":" in name else socket.AF_INET) as s:
            s.bind((name, 0))
            return True
    except OSError:
        pass
    try:
        return socket.gethostbyname(name).startswith("127.") or \
            socket.gethostbyname(name) == socket.gethostbyname(socket.gethostname())
    except OSError:
        return False


class Devices:
    """The slots the engine may run on, in rank order, less the ones dropped since the hostfile last
    changed; with --ratio, each slot's share. `log` takes the lines for people (the supervisor's)."""

    def __init__(self, ranks: int, hostfile: str | None, ratio: tuple[float, ...] = (), *,
                 log: Callable[[str], None]) -> None:
        self.ranks, self.hostfile = ranks, Path(hostfile).expanduser() if hostfile else None
        self.ratio, self.log = ratio, log
        self.dropped: set[int] = set()
        self.stamp = None
        self.slots = self._read()
        if self.hostfile and len(self.slots) < ranks:
            raise ConfigError(f"--hostfile {self.hostfile} has {len(self.slots)} slot(s) for --ranks {ranks}: add "
                              f"hosts or slots=N to it, or ask for fewer ranks")
        if ratio and len(ratio) != min(ranks, len(self.slots)):
            raise ConfigError(f"--ratio has {len(ratio)} parts for {min(ranks, len(self.slots))} rank(s): give one "
                              "per rank")

    def _read(self) -> list[str]:
        if self.hostfile is None:
            return ["localhost"] * self.ranks
        hosts = read_hostfile(self.hostfile)
        if not is_this_host(hosts[0][0]):
            raise ConfigError(f"--hostfile {self.hostfile}: its first host ({hosts[0][0]}) must be this machine: "
                              "rank 0 runs beside the supervisor")
        return [h for h, n in hosts for _ in range(n)]     # beyond --ranks: spares, for slots dropped

    def refresh(self) -> bool:
        """Re-read the hostfile; if it changed, every slot in it is back. True if it changed."""
        if self.hostfile is None:
            return False
        try:
            stamp = (self.hostfile.stat().st_mtime_ns, self.hostfile.read_bytes())
            slots = self._read()
        except (OSError, ConfigError) as e:
            self.log(f"the hostfile cannot be read again, keeping the devices known: {e}")
            return False
        if stamp == self.stamp:
            return False
        changed = self.stamp is not None
        self.stamp, self.dropped = stamp, set()
        if len(slots) < self.ranks:
            self.log(f"the hostfile now has {len(slots)} slot(s) for --ranks {self.ranks}: starting {len(slots)} rank(s)")
        if self.ratio and min(self.ranks, len(slots)) != len(self.ratio):
            self.log(f"--ratio has {len(self.ratio)} parts, the hostfile now {len(slots)} slot(s): splitting evenly")
            self.ratio = ()
        self.slots = slots
        return changed

    def current(self) -> list[int]:
        """The slots to run on, in rank order: the first --ranks of those not dropped (a spare slot,
        one past --ranks in the hostfile, fills in for a dropped one)."""
        chosen = [i for i in range(len(self.slots)) if i not in self.dropped][:self.ranks]
        # mpirun fills a host's slots before the next host's (the supervisor's hostfile lists each host
        # once): rank order is that order
        hosts = list(dict.fromkeys(self.slots[i] for i in chosen))
        return sorted(chosen, key=lambda i: (hosts.index(self.slots[i]), i))

    def ratio_of(self, slots: list[int]) -> str | None:
        """--ratio's shares of these slots; None (split evenly) without --ratio or once a spare, which
        has no share of its own, is among them."""
        if not self.ratio or max(slots, default=0) >= len(self.ratio):
            return None
        return ",".join(f"{self.ratio[i]:g}" for i in slots)
