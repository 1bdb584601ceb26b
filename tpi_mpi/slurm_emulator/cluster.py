"""A Slurm cluster on this one machine (root): munged and slurmctld in the root namespace, one
slurmd per node in a network namespace of its own, with its own hostname and address.

    with SlurmCluster(nodes=4) as cluster:          # or `python -m tpi_mpi.slurm_emulator start`
        subprocess.run(["sbatch", "--wait", "jobs/generate-4nodes.sbatch"], env=cluster.env())

The nodes hang off a kernel bridge (veth pairs, the node's end named eth0 as on a real node), so the
network lives without a process of ours and `start` can return while the cluster runs; the netem
emulator's user-space switch would need one (and adds delay, which a scheduler test does not need).
slurmctld is reached on the bridge's address. Every file (munge key and socket, slurm.conf, state,
spool, logs) is in one temp folder. Teardown -- on `stop`, on a failed start, on Ctrl-C -- kills the
processes in the nodes' namespaces (slurmd and every job step), slurmctld and munged, deletes the
namespaces and the bridge, then the folder. No MPI here.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

from ..netem.emulator import _kill_namespace_processes  # SIGTERM, then SIGKILL, all in a namespace
from ..netem.switch import check_host, ip
from ..processes import free_port
from .conf import Layout, slurm_conf

PREFIX = "tpi-slurm-"             # temp folders and namespaces; links are tsl-<run>-* (15 characters at most)
PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "nsenter")
# libpmix-dev: Debian's srun --mpi=pmix plugin loads pmix2/lib/libpmix.so, a link only that package makes
PACKAGES = ("slurm-wlm", "munge", "libpmix-dev")
MAX_NODES = 64
SLURMD_PORT = 6818                # Slurm's default; each node has its own address


class ClusterError(RuntimeError):
    pass


def log_stderr(msg: str) -> None:
    print(f"slurm_emulator: {msg}", file=sys.stderr, flush=True)


# --- installing Debian's packages --------------------------------------------------------------------

def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") is None]


def missing_packages() -> list[str]:
    """The Debian packages not installed yet (none where there is no dpkg and the programs are there)."""
    if shutil.which("dpkg-query") is None:
        return list(PACKAGES) if missing_programs() else []
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Status}\n", *PACKAGES], capture_output=True, text=True)
    installed = {line.split()[0] for line in r.stdout.splitlines() if line.endswith(" installed")}
    return [p for p in PACKAGES if p not in installed]


def install(log=log_stderr) -> float:
    """apt-get install what is missing of PACKAGES; returns the seconds it took (0 when nothing was
    missing). Package lists are refreshed only when the first try fails."""
    missing = missing_packages()
    if not missing:
        return 0.0
    if shutil.which("apt-get") is None:
        raise ClusterError(f"{', '.join(missing)} not installed and no apt-get here: install Slurm, munge and PMIx")
    t0 = time.monotonic()
    log(f"installing {' '.join(missing)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    with _services_held():
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, stdin=subprocess.DEVNULL)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0 or missing_programs():
        tail = " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        raise ClusterError(f"apt-get install {' '.join(missing)} failed: {tail or f'exit {r.returncode}'}")
    seconds = time.monotonic() - t0
    log(f"installed in {seconds:.0f} s")
    return seconds


@contextlib.contextmanager
def _services_held():
    """Debian starts a package's services when it installs it: munged with the system key, slurmd
    without a slurm.conf (whose failure fails the install). A policy-rc.d that says no (as Docker
    images have; an existing one is left alone) holds them for the length of the install."""
    policy = Path("/usr/sbin/policy-rc.d")
    made = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# tpi_mpi.slurm_emulator: no service starts during its apt-get install\nexit 101\n")
        policy.chmod(0o755)
        made = True
    try:
        yield
    finally:
        if made:
            policy.unlink(missing_ok=True)


# --- names, addresses, ports -------------------------------------------------------------------------

def node_name(i: int) -> str:
    return f"node{i}"


def netns_name(run_id: str, i: int) -> str:
    return f"{PREFIX}{run_id}-{node_name(i)}"


def free_subnet() -> str:
    """A 10.78.X.0/24 that no address or route of this host uses (another cluster may run)."""
    used = ip("-o", "addr", "show", check=False).stdout + ip("route", "show", check=False).stdout
    for x in range(256):
        if f"10.78.{x}." not in used:
            return f"10.78.{x}"
    raise ClusterError("no free 10.78.X.0/24 subnet: stop other clusters (python -m tpi_mpi.slurm_emulator cleanup)")


# --- the cluster -------------------------------------------------------------------------------------

class SlurmCluster:
    """munged + slurmctld + `nodes` slurmds in namespaces, for a `with` block or start()/stop()."""

    def __init__(self, nodes: int = 4, cpus: int = 4, memory_mb: int = 2048, log=log_stderr,
                 start_timeout: float = 60.0):
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"{nodes} nodes: use 1..{MAX_NODES}")
        if cpus < 1:
            raise ValueError(f"{cpus} CPUs per node: use at least 1")
        self.nodes, self.cpus, self.memory_mb = nodes, cpus, memory_mb
        self.log, self.start_timeout = log, start_timeout
        self.run_id = secrets.token_hex(2)
        self.folder: Path | None = None
        self.layout: Layout | None = None
        self.state: dict = {"run": self.run_id, "pids": {}, "namespaces": [], "links": []}

    # -- up --
    def __enter__(self) -> "SlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        check_host()
        install(self.log)
        try:
            self._up()
        except BaseException:
            self.stop()
            raise

    def _up(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{self.run_id}-"))
        self.state["folder"] = str(self.folder)
        self._save()
        net = free_subnet()
        self.layout = lay = Layout(self.folder, f"{net}.254", tuple(node_name(i) for i in range(self.nodes)),
                                   tuple(f"{net}.{i + 1}" for i in range(self.nodes)), free_port(),
                                   SLURMD_PORT, self.cpus, self.memory_mb)
        self._network(lay)
        for sub in ("ctld-state", "spool", "munge", "tmp"):
            (self.folder / sub).mkdir(mode=0o700)
        for name in lay.node_names:
            (self.folder / "spool" / name).mkdir(mode=0o700)
            (self.folder / "tmp" / name).mkdir(mode=0o1777)
        lay.conf_path.write_text(slurm_conf(lay))
        self._hosts_file(lay)
        self._munged(lay)
        self._daemon("slurmctld", [*self._as_host("tpi-controller"), "slurmctld", "-D", "-f", str(lay.conf_path)])
        self._wait(lambda: self._scontrol("ping").find("is UP") >= 0, "slurmctld to answer",
                   self.folder / "slurmctld.log")
        for i, name in enumerate(lay.node_names):
            ns = netns_name(self.run_id, i)
            # nsenter, not `ip netns exec`: that one remounts /sys, and slurmd wants /sys/fs/cgroup
            self._daemon(f"slurmd-{name}", ["nsenter", f"--net=/run/netns/{ns}", *self._as_host(name),
                                            "slurmd", "-D", "-f", str(lay.conf_path)])
        self._wait(self._all_idle, f"{self.nodes} slurmd to register", self.folder / "spool" / f"{lay.node_names[-1]}.log")
        self.log(f"cluster {self.run_id} up: {self.nodes} nodes {lay.node_names[0]}..{lay.node_names[-1]} "
                 f"({lay.node_addrs[0]}..), {self.cpus} CPUs each; export SLURM_CONF={lay.conf_path}")

    def _network(self, lay: Layout) -> None:
        bridge = f"tsl-{self.run_id}-br"
        ip("link", "add", bridge, "type", "bridge")
        self.state["links"].append(bridge)
        self._save()
        ip("addr", "add", f"{lay.controller_addr}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        for i, addr in enumerate(lay.node_addrs):
            ns, veth = netns_name(self.run_id, i), f"tsl-{self.run_id}-v{i}"
            ip("netns", "add", ns)
            self.state["namespaces"].append(ns)
            self._save()
            ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self.state["links"].append(veth)
            self._save()
            ip("link", "set", veth, "master", bridge, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")

    def _hosts_file(self, lay: Layout) -> None:
        """This host's /etc/hosts plus the cluster's names: srun's PMIx plugin and mpirun look nodes up
        by name, as on a real cluster with DNS."""
        try:
            base = Path("/etc/hosts").read_text()
        except OSError:
            base = "127.0.0.1 localhost\n"
        names = [f"{lay.controller_addr} tpi-controller"] + [f"{a} {n}" for n, a in zip(lay.node_names, lay.node_addrs)]
        (self.folder / "hosts").write_text(base.rstrip("\n") + "\n# tpi_mpi.slurm_emulator\n" + "\n".join(names) + "\n")

    def _as_host(self, hostname: str) -> list[str]:
        """Command prefix: a hostname of its own (UTS namespace) and the cluster's /etc/hosts (a mount
        namespace where it is bind-mounted), for a daemon and every job step it starts."""
        return ["unshare", "--uts", "--mount", "--propagation", "private", "/bin/sh", "-c",
                'hostname "$0" && mount --bind "$1" /etc/hosts && shift && exec "$@"', hostname,
                str(self.folder / "hosts")]

    def _munged(self, lay: Layout) -> None:
        key = self.folder / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(1024))        # one key for the whole cluster: one machine
        m = self.folder / "munge"
        self._daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={lay.munge_socket}",
                                f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                                f"--seed-file={m / 'munged.seed'}"])
        self._wait(lay.munge_socket.exists, "munged's socket", m / "munged.log")

    def _daemon(self, name: str, argv: list[str]) -> None:
        with open(self.folder / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.state["pids"][name] = proc.pid
        self._save()

    def _wait(self, ready, what: str, logfile: Path) -> None:
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            if ready():
                return
            dead = [n for n, pid in self.state["pids"].items() if not _alive(pid)]
            if dead:
                raise ClusterError(f"{', '.join(dead)} exited while waiting for {what}: "
                                   f"{_tail(self.folder / f'{dead[0]}.out') or _tail(logfile)}")
            time.sleep(0.3)
        raise ClusterError(f"no {what} after {self.start_timeout:g} s: {_tail(logfile)}")

    def _scontrol(self, *args: str) -> str:
        r = subprocess.run(["scontrol", *args], env=self.env(), capture_output=True, text=True, timeout=20)
        return r.stdout

    def _all_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env(), capture_output=True, text=True,
                           timeout=20)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return len(states) == self.nodes and all(s == "idle" for s in states.values())

    def env(self) -> dict[str, str]:
        """The environment for sbatch, srun, squeue, ...: this cluster's slurm.conf."""
        return dict(os.environ, SLURM_CONF=str(self.layout.conf_path) if self.layout else "")

    def _save(self) -> None:
        """state.json: what `stop` (another process) must undo, written after every step."""
        if self.folder is not None:
            tmp = self.folder / "state.json.tmp"
            tmp.write_text(json.dumps(self.state))
            tmp.replace(self.folder / "state.json")

    # -- down --
    def stop(self) -> None:
        teardown(self.state, self.log)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _tail(path: Path, lines: int = 4) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _ours(pid: int, folder: str | None) -> bool:
    """Whether `pid` is still one of the cluster's daemons (each names the folder in its arguments),
    not a process that got the number since."""
    try:
        return bool(folder) and folder in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _terminate(pid: int, grace: float = 5.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        end = time.monotonic() + wait
        while _alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if not _alive(pid):
            try:
                os.waitpid(pid, os.WNOHANG)      # our child (the with-block case): reap it
            except ChildProcessError:
                pass
            return


def teardown(state: dict, log=log_stderr) -> None:
    """Undo what `state` records, in reverse: job steps and slurmds, slurmctld, munged, network, folder.
    Ctrl-C is ignored meanwhile: a half-done teardown leaves namespaces behind."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)} \
        if _main_thread() else {}
    try:
        for ns in state.get("namespaces", []):
            _kill_namespace_processes(ns)
        pids = {name: pid for name, pid in state.get("pids", {}).items() if _ours(pid, state.get("folder"))}
        for name in ("slurmctld", "munged"):
            if name in pids:
                _terminate(pids[name])
        for name, pid in pids.items():
            _terminate(pid, grace=1.0)           # slurmds are gone with their namespace's processes
        for ns in state.get("namespaces", []):
            r = ip("netns", "del", ns, check=False)
            if r.returncode != 0:
                log(f"could not delete {ns}: {r.stderr.strip()} (try `python -m tpi_mpi.slurm_emulator cleanup`)")
        for link in reversed(state.get("links", [])):
            ip("link", "del", link, check=False)  # a veth goes with its namespace: quiet when gone
        if state.get("folder"):
            shutil.rmtree(state["folder"], ignore_errors=True)
        state.update(pids={}, namespaces=[], links=[])
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --- clusters started by another process -------------------------------------------------------------

def running() -> list[dict]:
    """The state of every cluster whose folder is still there."""
    found = []
    for path in sorted(Path(tempfile.gettempdir()).glob(f"{PREFIX}*/state.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return found


def leftovers(run_id: str | None = None) -> tuple[list[str], list[str]]:
    """Namespaces tpi-slurm-* and links tsl-* (or those of `run_id`)."""
    ns_prefix, link_prefix = f"{PREFIX}{run_id or ''}", f"tsl-{run_id + '-' if run_id else ''}"
    ns = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0]
             for line in ip("-o", "link", "show", check=False).stdout.splitlines() if ":" in line]
    return [n for n in ns if n.startswith(ns_prefix)], [x for x in links if x.startswith(link_prefix)]
