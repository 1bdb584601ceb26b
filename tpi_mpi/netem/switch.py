"""The links of tpi_mpi.netem: the link model, the TAP ports and the switch that forwards between them.

`LinkModel` is pure arithmetic. A frame from rank i to rank j is sent on i's uplink at the link
rate, then on j's downlink (cut-through: the downlink only adds time when several senders share
it), and arrives `delay` after its last bit left: one-way latency delay + size/rate, as on a real
link. Frames are never dropped or reordered. `plug_in` makes a rank's TAP port inside its
namespace (`check_host` and `netem_available` say what this host allows); `Switch` is one thread that reads Ethernet frames from the ports and writes each to its
destination's port when the model says it arrives. netem.py makes the namespaces and launches MPI;
no MPI here.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import heapq
import os
import secrets
import select
import shutil
import struct
import subprocess
import threading
import time
from dataclasses import dataclass

PREFIX = "tpi-"                  # every namespace and link netem makes is named tpi-*


def mac(i: int) -> bytes:
    return bytes([0x02, 0x74, 0x70, 0x69, 0x00, i])   # locally administered, 02:74:70:69 ("tpi")


def mac_text(m: bytes) -> str:
    return ":".join(f"{b:02x}" for b in m)


# --- the link model (pure) --------------------------------------------------------------------------

@dataclass(frozen=True)
class Link:
    delay_ms: float                 # one way, added after the last bit has left the sender
    rate_mbit: float                # each rank's uplink and downlink
    mtu: int = 9000                 # jumbo frames: a quarter of the frames per byte in Python's hands

    def __post_init__(self) -> None:
        if self.delay_ms < 0:
            raise ValueError(f"delay {self.delay_ms} ms is negative")
        if self.rate_mbit <= 0:
            raise ValueError(f"rate {self.rate_mbit} Mbit/s must be positive")
        if not 1280 <= self.mtu <= 65000:
            raise ValueError(f"MTU {self.mtu} outside 1280..65000")


class LinkModel:
    """Departure and arrival times of frames through a switch with N ports (times in seconds).

    A frame of `nbytes` from `src` occupies src's uplink for nbytes*8/rate after whatever is queued
    there, then dst's downlink for as long, starting as early as its first bit could (cut-through),
    and arrives `delay` after it has left the downlink."""

    def __init__(self, n: int, delay_s: float, rate_bps: float | None):
        self.delay = delay_s
        self.rate = rate_bps                    # None: no rate limit (netem does it)
        self.up_free = [0.0] * n                # when each port's uplink is next idle
        self.down_free = [0.0] * n

    def send(self, now: float, nbytes: int, src: int) -> float:
        """Queue the frame on src's uplink; returns when its last bit has left."""
        tx = nbytes * 8 / self.rate if self.rate else 0.0
        self.up_free[src] = max(now, self.up_free[src]) + tx
        return self.up_free[src]

    def arrive(self, sent: float, nbytes: int, dst: int) -> float:
        """When a frame sent (last bit out of its uplink) at `sent` reaches dst."""
        tx = nbytes * 8 / self.rate if self.rate else 0.0
        self.down_free[dst] = max(sent, self.down_free[dst] + tx)
        return self.down_free[dst] + self.delay

    def backlog(self, now: float, src: int) -> float:
        return max(0.0, self.up_free[src] - now)


# --- ports: TAP devices in the ranks' namespaces (and what the host can do) -------------------------

_TUNSETIFF = 0x400454CA
_IFF_TAP, _IFF_NO_PI = 0x0002, 0x1000


def open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", name.encode(), _IFF_TAP | _IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip() or f'exit {r.returncode}'}")
    return r


def plug_in(ns: str, tap: str, i: int, addresses: list[str], link: Link, qdisc: bool) -> int:
    """Port i: a TAP device `tap` made here, moved into namespace `ns` with addresses[i] and MAC i;
    every other port's MAC is a permanent neighbour (no ARP, as on a warm network). With `qdisc`,
    tc netem on the TAP adds the delay and rate. Returns the TAP's fd, which stays in this process."""
    fd = open_tap(tap)
    try:
        ip("link", "set", tap, "netns", ns)
        ip("-n", ns, "link", "set", tap, "address", mac_text(mac(i)), "mtu", str(link.mtu), "up")
        ip("-n", ns, "addr", "add", f"{addresses[i]}/24", "dev", tap)
        for j, addr in enumerate(addresses):
            if j != i:
                ip("-n", ns, "neigh", "replace", addr, "lladdr", mac_text(mac(j)), "dev", tap, "nud", "permanent")
        if qdisc:
            subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", tap, "root", "netem", "delay", f"{link.delay_ms}ms",
                            "rate", f"{link.rate_mbit}mbit", "limit", "100000"], check=True, capture_output=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_host() -> None:
    """Raise PermissionError / FileNotFoundError with the reason netem cannot work here."""
    if os.geteuid() != 0:
        raise PermissionError("network namespaces need root")
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"the `{tool}` command is missing (iproute2, util-linux)")
    if not os.path.exists("/dev/net/tun"):
        raise FileNotFoundError("/dev/net/tun is missing (no TUN/TAP support)")
    if ip("netns", "list", check=False).returncode != 0:
        raise FileNotFoundError("`ip netns` does not work here")


@functools.cache
def netem_available() -> bool:
    """Try a netem qdisc on a veth in a scratch namespace; the namespace goes away either way."""
    ns = f"{PREFIX}{secrets.token_hex(2)}-probe"
    try:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        ip("-n", ns, "link", "set", "p0", "up")
        r = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True)
        return r.returncode == 0
    except (RuntimeError, FileNotFoundError):
        return False
    finally:
        ip("netns", "del", ns, check=False)


# --- the switch: one thread forwarding frames between TAP devices ------------------------------------

_PR_SET_TIMERSLACK = 29
_MAX_EARLY_S = 3e-4     # never deliver a frame more than this before it is due
_MAX_BACKLOG_S = 2.0     # a sender this far behind loses frames (never reached by MPI's windows)


def fine_timers() -> None:
    """Timer slack 1 ns instead of 50 us for the calling thread: sleeps end closer to when asked."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Switch:
    """Forwards Ethernet frames between TAP fds by destination MAC, timed by a LinkModel."""

    def __init__(self, fds: list[int], model: LinkModel):
        self.fds = fds
        self.model = model
        self.port_of_mac = {mac(i): i for i in range(len(fds))}
        self.frames = self.bytes = self.dropped = 0
        self.cpu_s = 0.0                            # CPU seconds of the forwarding thread, set when it ends
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="netem-switch", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(timeout=5)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _loop(self) -> None:
        # the link is hardware on a real edge device: do not let the ranks' compute slow it down
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), -10)
        except OSError:
            pass
        fine_timers()
        try:
            self._forward()
        except BaseException as e:                  # noqa: BLE001 -- reported by EdgeNet.run
            self.error = e
        finally:
            self.cpu_s = time.thread_time()

    def _forward(self) -> None:
        queue: list[tuple[float, int, int, bytes]] = []     # (arrival time, sequence, dst port, frame)
        seq = 0
        index = {fd: i for i, fd in enumerate(self.fds)}
        watch = [*self.fds, self._wake_r]
        # A timer wakes this thread ~50-150 us late on a VM. Waking `early` before a frame is due, with
        # `early` the running mean of that lateness, centres delivery on the due time without spinning.
        early = 0.0
        while not self._stop:
            target = queue[0][0] - early if queue else None
            timeout = max(0.0, target - time.monotonic()) if queue else 0.5
            ready, _, _ = select.select(watch, [], [], timeout)   # select: microseconds; epoll rounds to ms
            now = time.monotonic()
            if not ready and target is not None and timeout > 0:
                early = min(_MAX_EARLY_S, max(0.0, 0.9 * early + 0.1 * (now - target)))
            for fd in ready:
                if fd == self._wake_r:
                    continue
                src = index[fd]
                while True:
                    try:
                        frame = os.read(fd, 65536)
                    except OSError:                 # BlockingIOError: all read
                        break
                    if len(frame) < 14:
                        continue
                    if self.model.backlog(now, src) > _MAX_BACKLOG_S:
                        self.dropped += 1
                        continue
                    sent = self.model.send(now, len(frame), src)
                    dst = self.port_of_mac.get(frame[:6])
                    targets = [dst] if dst is not None else ([p for p in range(len(self.fds)) if p != src]
                                                             if frame[0] & 1 else [])   # flood broadcast
                    for p in targets:
                        heapq.heappush(queue, (self.model.arrive(sent, len(frame), p), seq, p, frame))
                        seq += 1
            now = time.monotonic()
            while queue and queue[0][0] - early <= now:
                _, _, p, frame = heapq.heappop(queue)
                try:
                    os.write(self.fds[p], frame)
                    self.frames += 1
                    self.bytes += len(frame)
                except OSError:
                    self.dropped += 1
