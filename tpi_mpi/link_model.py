"""`--link-model 2ms,300mbit`: a modelled link that the comm layer charges every message it receives,
for what-if runs on one machine without root (tpi_mpi.netem emulates a link for real). Pure
arithmetic: comm.py sleeps the cost; no MPI here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class SimulatedLink:
    """A link of one-way `delay` seconds and `rate` bits per second, charged in the comm layer.

    Every message that MpiComm.exchange receives costs delay + bytes / rate, slept on the receiving
    rank after it arrived; messages received in one exchange share the receiver's link, one after
    the other (a star's hub pays delay + (n - 1) bytes / rate). The sender's uplink is not modelled
    apart, so a hub's n - 1 sends back count as parallel. An `mpi` allreduce (MPI_Allreduce, whose
    messages are out of sight) is charged as the ring's pattern: 2 (n - 1) steps of delay +
    (bytes / n) / rate. Broadcasts and gathers are not charged (one of each per token)."""

    delay: float
    rate: float

    @classmethod
    def parse(cls, text: str) -> SimulatedLink:
        """'2ms,300mbit' -> SimulatedLink(0.002, 3e8); delays in us/ms/s, rates in kbit/mbit/gbit."""
        m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)\s*,\s*([0-9.]+)\s*(kbit|mbit|gbit)\s*", text.lower())
        try:
            link = m and cls(float(m[1]) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m[2]],
                             float(m[3]) * {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}[m[4]])
        except ValueError:
            link = None
        if not link or link.rate <= 0:
            raise ConfigError(f"--link-model {text!r}: write a one-way delay and a rate, e.g. 2ms,300mbit")
        return link

    def cost(self, nbytes: int) -> float:
        """Seconds until the last of messages of `nbytes` in all, sent together, has arrived."""
        return self.delay + nbytes * 8 / self.rate

    def describe(self) -> str:
        return f"{self.delay * 1e3:g}ms,{self.rate / 1e6:g}mbit"
