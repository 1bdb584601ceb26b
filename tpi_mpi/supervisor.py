"""`tpi_mpi serve --ranks N [--hostfile H]`: the HTTP front as a supervisor outside MPI, which keeps
serving when a device drops.

The supervisor launches the engine (`mpirun ... python -m tpi_mpi serve --channel PATH`) and talks
to its rank 0 over a local channel (channel.py). It admits requests, sends them to the engine as
token ids and records every token each client has had. When the engine fails (a rank killed, a
rank silent past --comm-timeout, a host gone), it learns which rank failed (rank 0's report over
the channel, else mpirun's own lines), drops that rank's device, ends every process of the job and
launches again on the devices left: the engine prepares the shards for the new world size (cached
per world size) and ships them. Every request in flight is then sent again with the tokens its
client has had, so the engine prefills prompt + those tokens and its stream goes on where it
stopped. New requests wait meanwhile (429 past the queue); while no engine can start they get 503
with Retry-After.

Devices are slots: the hostfile's, in order (mpirun places rank r on the r-th slot, --map-by slot),
or N slots on this host. A dropped slot comes back when the hostfile changes (it is re-read at each
launch). Rank 0 runs on the first slot, which must be this host: if it goes, so does the supervisor.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, PIPE, STDOUT, Popen, TimeoutExpired

from .channel import Channel, job_message, with_seed
from .errors import ConfigError, TpiError
from .openai_api import ApiError
from .serve import Api, HttpThread, ServeConfig, queue_full
from .text import TextCodec

FAILED_STARTS = 3      # launches in a row that never got ready, with no device to blame: give up
EXIT_GRACE_S = 3.0     # after a failure: how long mpirun may take to end the job itself
RETRY_AFTER_S = 10     # Retry-After while no engine can start
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}


def log(msg: str) -> None:
    print(f"tpi_mpi: supervisor: {msg}", file=sys.stderr, flush=True)


# --- devices ----------------------------------------------------------------------------------------

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
    try:
        return socket.gethostbyname(name).startswith("127.") or \
            socket.gethostbyname(name) == socket.gethostbyname(socket.gethostname())
    except OSError:
        return False


class Devices:
    """The slots the engine may run on, in rank order, less the ones dropped since the hostfile last
    changed; with --ratio, each slot's share."""

    def __init__(self, ranks: int, hostfile: str | None, ratio: tuple[float, ...] = ()) -> None:
        self.ranks, self.hostfile = ranks, Path(hostfile).expanduser() if hostfile else None
        self.ratio = ratio
        self.dropped: set[int] = set()
        self.stamp = None
        self.slots = self._read()
        if ratio and len(ratio) != len(self.slots):
            raise ConfigError(f"--ratio has {len(ratio)} parts for {len(self.slots)} rank(s): give one per rank")

    def _read(self) -> list[str]:
        if self.hostfile is None:
            return ["localhost"] * self.ranks
        hosts = read_hostfile(self.hostfile)
        if not is_this_host(hosts[0][0]):
            raise ConfigError(f"--hostfile {self.hostfile}: its first host ({hosts[0][0]}) must be this machine: "
                              "rank 0 runs beside the supervisor")
        slots = [h for h, n in hosts for _ in range(n)]
        return slots[:self.ranks]

    def refresh(self) -> bool:
        """Re-read the hostfile; if it changed, every slot in it is back. True if it changed."""
        if self.hostfile is None:
            return False
        try:
            stamp = (self.hostfile.stat().st_mtime_ns, self.hostfile.read_bytes())
            slots = self._read()
        except (OSError, ConfigError) as e:
            log(f"the hostfile cannot be read again, keeping the devices known: {e}")
            return False
        if stamp == self.stamp:
            return False
        changed = self.stamp is not None
        self.stamp, self.dropped = stamp, set()
        if self.ratio and len(slots) != len(self.ratio):
            log(f"--ratio has {len(self.ratio)} parts, the hostfile now {len(slots)} slot(s): splitting evenly")
            self.ratio = ()
        self.slots = slots
        return changed

    def current(self) -> list[int]:
        """The slots left, in rank order."""
        return [i for i in range(len(self.slots)) if i not in self.dropped]

    def ratio_of(self, slots: list[int]) -> str | None:
        return ",".join(f"{self.ratio[i]:g}" for i in slots) if self.ratio else None


# --- the engine: mpirun and its processes -------------------------------------------------------

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


@dataclass
class Failure:
    message: str
    ranks: list[int] = field(default_factory=list)     # the ranks to drop
    fatal: bool = False                                 # starting again would fail alike
    hosts: list[str] = field(default_factory=list)     # hosts the launcher could not reach (all their slots go)
    at: float = field(default_factory=time.time)       # when the supervisor learned of it


class Engine:
    """One launch of the engine: mpirun in a session of its own, its output relayed to ours (the
    last lines kept, to learn which rank failed), and the channel its rank 0 opens."""

    def __init__(self, argv: list[str], listener: socket.socket) -> None:
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
            line = raw.decode(errors="replace")
            self.tail.append(line)
            sys.stderr.write(line)
        sys.stderr.flush()

    def start(self, stopping: threading.Event, hosts: list[str]) -> dict | Failure:
        """Wait until rank 0 reports ready (its info) or the launch failed."""
        while self.channel is None:
            if stopping.is_set():
                return Failure("stopped")
            if self.proc.poll() is not None:
                return self.failure(None, hosts)
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.channel = Channel(sock)
        while True:                  # rank 0 prepares, ships and loads the shards: as long as it takes
            if stopping.is_set():
                return Failure("stopped")
            try:
                message = self.channel.recv(timeout=0.2)
                break
            except TimeoutError:
                continue
        if message is None or "failed" in message:
            return self.failure(message and message["failed"], hosts)
        self.ready = message["ready"]
        return self.ready

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
        last = next((ln.strip() for ln in reversed(self.tail) if "error" in ln.lower()), None)
        text = " ".join(self.tail)
        unreachable = [h for h in dict.fromkeys(hosts[1:]) if h != hosts[0] and re.search(rf"\b{re.escape(h)}\b", text)]
        return Failure(f"the engine ended (exit status {self.proc.returncode}){f': {last}' if last else ''}",
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


class Ahead:
    """The model prepared for `world` ranks into the cache by a process at the lowest CPU priority,
    while the engine serves on one rank more."""

    def __init__(self, argv: list[str], world: int) -> None:
        self.world = world
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
            log(f"waiting for the model being prepared for {world} rank(s)")
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


# --- the supervisor ---------------------------------------------------------------------------

@dataclass
class SupervisorConfig:
    serve: ServeConfig
    ranks: int
    hostfile: str | None
    engine_args: list[str]          # the serve options the engine runs with (but --ratio)
    launcher_args: list[str]        # extra mpirun options
    ratio: tuple[float, ...] = ()   # each device's share, in rank order
    model: str | None = None        # --model, as given
    prepare_ahead: bool = False     # prepare for one rank fewer in the background


class Supervisor:
    """The HTTP front's jobs, relayed to the engine; restarts the engine when it fails. The HTTP
    thread calls submit/health; everything else runs on the main thread."""

    def __init__(self, cfg: SupervisorConfig) -> None:
        self.cfg = cfg.serve
        self.sup = cfg
        self.devices = Devices(cfg.ranks, cfg.hostfile, cfg.ratio)
        self.devices.refresh()
        self.prepared = bool(cfg.model) and (Path(cfg.model).expanduser() / "rank0").is_dir()   # holds rank0/, ...
        self.ahead: Ahead | None = None
        if self.prepared:
            log(f"warning: {cfg.model} is prepared for one world size: a lost device will end the service; "
                "give the original model (Hugging Face folder or GGUF), which is split again for the ranks left")
        here = os.path.dirname(sys.executable)           # a virtual environment's own mpirun first
        self.launcher = shutil.which("mpirun", path=here + os.pathsep + os.environ.get("PATH", ""))
        if self.launcher is None:
            raise ConfigError("mpirun is not on PATH: pip install 'tpi_mpi[mpi]' (or install Open MPI)")
        self.dir = Path(tempfile.mkdtemp(prefix="tpi_mpi-supervisor-"))
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.dir / "channel"))
        self.listener.listen(1)
        self.listener.settimeout(0.2)
        self.lock = threading.Lock()
        self.jobs: dict = {}                # id -> HttpJob, admitted and not ended, in arrival order
        self.engine: Engine | None = None
        self.live = False                   # the engine is ready and has every job in self.jobs
        self.state, self.error = "starting", None
        self.slots: list[int] = []          # the devices in use, by rank
        self.hosts: list[str] = []
        self.restarts, self.last_failure = 0, None
        self.finished = self.fruitless = 0   # requests finished by this engine; failures that achieved nothing
        self.stopping = threading.Event()
        self.codec, self.context = None, 0
        self.mean_job_s = 1.0

    # -- HTTP thread ----------------------------------------------------------------------------
    def submit(self, job) -> None:
        if self.state == "failed":
            raise ApiError(503, f"no engine can start: {self.error}", code="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", code="unavailable")
        with_seed(job, random.getrandbits(63))
        with self.lock:
            if len(self.jobs) >= self.cfg.queue_size + self.cfg.max_batch:
                raise queue_full(self.cfg, self.mean_job_s)
            self.jobs[job.id] = job
            if self.live:
                self.engine.channel.send(job_message(job))

    def health(self) -> tuple[dict, int]:
        ready = self.engine.ready if self.engine and self.live else None
        body = {"status": {"serving": "ok"}.get(self.state, self.state), "model": self.cfg.model_id,
                "ranks": len(self.hosts), "hosts": self.hosts, "pids": ready["pids"] if ready else [],
                "allreduce": ready["allreduce"] if ready else None, "restarts": self.restarts,
                "last_failure": self.last_failure, "requests": len(self.jobs), "max_batch": self.cfg.max_batch}
        if self.error:
            body["error"] = self.error
        return body, 503 if self.state == "failed" else 200      # restarting: requests wait, none is lost

    def log(self, msg: str) -> None:
        log(msg)

    # -- main thread ----------------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGINT/SIGTERM; the HTTP side starts once the first engine is ready."""
        http = None
        try:
            while not self.stopping.is_set():
                if self.state == "failed" and not self.devices.refresh():
                    self.stopping.wait(2.0)          # until the hostfile brings devices back
                    continue
                self.devices.refresh()
                outcome = self._launch()
                if not isinstance(outcome, Failure):
                    http = http or self._start_http(outcome)
                    outcome = self._pump()
                if self.stopping.is_set():
                    break
                self._failed(outcome)
                if http is None and self.state == "failed":
                    raise TpiError(outcome.message)    # never served: end as serve without a supervisor would
        finally:
            self.stopping.set()
            if self.ahead:
                self.ahead.finish(None)
            if self.engine:
                self.engine.end(grace=EXIT_GRACE_S)
            self._fail_all(ApiError(503, "the server is shutting down", code="unavailable"))
            if http:
                http.stop()
            self.listener.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def _launch(self) -> dict | Failure:
        self.slots = self.devices.current()
        hosts = [self.devices.slots[i] for i in self.slots]
        self.hosts, self.live, self.finished = hosts, False, 0
        if self.engine is not None:
            self.restarts += 1
        if not hosts:
            return Failure("no device is left", fatal=True)
        argv = [self.launcher, "-n", str(len(hosts)), "--map-by", "slot"]
        if self.devices.hostfile is None:
            argv += ["--oversubscribe"]
        else:
            path = self.dir / "hostfile"
            counts = Counter(hosts)
            path.write_text("".join(f"{h} slots={counts[h]}\n" for h in dict.fromkeys(hosts)))
            argv += ["--hostfile", str(path)]
        ratio = self.devices.ratio_of(self.slots)
        argv += [*self.sup.launcher_args, sys.executable, "-m", "tpi_mpi", "serve", *self.sup.engine_args,
                 *(["--ratio", ratio] if ratio else []), "--channel", str(self.dir / "channel")]
        if self.ahead:
            self.ahead.finish(len(hosts))
        self._drain_listener()
        t0 = time.monotonic()
        log(f"starting the engine on {len(hosts)} rank(s): {', '.join(hosts)}")
        self.engine = Engine(argv, self.listener)
        outcome = self.engine.start(self.stopping, hosts)
        if isinstance(outcome, Failure):
            return outcome
        with self.lock:
            for job in self.jobs.values():           # the requests in flight, with what they have had
                self.engine.channel.send(job_message(job))
            if self.last_failure and self.last_failure.get("recovery_s") is None:
                self.last_failure["recovery_s"] = round(time.time() - self.last_failure["at"], 2)
            self.live, self.state, self.error = True, "serving", None
            resumed = sum(1 for j in self.jobs.values() if j.generated)
        seconds = time.monotonic() - t0
        log(f"engine ready on {len(hosts)} rank(s) in {seconds:.1f} s"
            + (f"; {resumed} answer(s) resumed, {len(self.jobs) - resumed} request(s) sent" if self.jobs else ""))
        world = len(hosts) - 1
        if self.sup.prepare_ahead and world and not self.prepared and not self.devices.ratio and \
                not (self.ahead and self.ahead.world == world):
            self.ahead = Ahead([sys.executable, "-m", "tpi_mpi", "serve", *self.sup.engine_args,
                                "--prepare-for", str(world)], world)
        return outcome

    def _drain_listener(self) -> None:
        """Drop connections a failed engine's rank 0 made too late to be taken: the next engine's
        rank 0 must be the one answered."""
        self.listener.settimeout(0)
        try:
            while True:
                self.listener.accept()[0].close()
        except OSError:
            pass
        finally:
            self.listener.settimeout(0.2)

    def _start_http(self, ready: dict) -> HttpThread:
        self.codec, self.context = TextCodec(ready["codec"]), ready["context"]
        http = HttpThread(Api(self).app(), self.cfg.host, self.cfg.port)
        http.start()
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        log(f"serving {self.cfg.model_id} at http://{host}:{http.port}/v1 on {len(self.hosts)} rank(s), "
            "restarted on the ranks left if one fails")
        return http

    def _pump(self) -> Failure:
        """Relay the engine's answers to the clients until the engine fails or we stop."""
        channel = self.engine.channel
        while not self.stopping.is_set():
            self._cancel_gone(channel)
            try:
                message = channel.recv(timeout=0.2)
            except TimeoutError:
                continue
            if message is None or "failed" in message:
                with self.lock:
                    self.live = False
                return self.engine.failure(message and message["failed"], self.hosts)
            job = self.jobs.get(message.get("id"))
            if job is None:                          # ended or cancelled meanwhile
                continue
            if "token" in message:
                job.generated.append(message["token"])
                if message["text"]:
                    job.send("text", message["text"])
            elif "text" in message:
                job.send("text", message["text"])
            elif "done" in message or "error" in message:
                if "done" in message:
                    job.send("done", message["done"])
                    self.finished += 1
                    self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * (time.monotonic() - job.created)
                else:
                    e = message["error"]
                    job.send("error", ApiError(e["status"], e["message"], code=e["code"]))
                with self.lock:
                    self.jobs.pop(job.id, None)
        return Failure("stopped")

    def _cancel_gone(self, channel: Channel) -> None:
        with self.lock:
            gone = [j for j in self.jobs.values() if j.cancelled]
            for job in gone:
                del self.jobs[job.id]
        for job in gone:
            channel.send({"cancel": job.id})

    def _failed(self, failure: Failure) -> None:
        """Drop the failed ranks' devices, or give up (until the hostfile changes) when starting again
        would fail alike: a setting or the memory, or FAILED_STARTS failures in a row that named no
        device and let no request finish."""
        ranks = [r for r in failure.ranks if 0 < r < len(self.slots)]    # rank 0's host is ours: never dropped
        ranks += [r for r, h in enumerate(self.hosts) if h in failure.hosts and r > 0 and r not in ranks]
        lost = [self.hosts[r] for r in ranks]
        self.fruitless = 0 if lost or self.finished else self.fruitless + 1
        give_up = failure.fatal or self.fruitless >= FAILED_STARTS
        self.last_failure = {"at": round(failure.at, 3), "message": failure.message,
                             "ranks": failure.ranks, "hosts": lost, "recovery_s": None}
        if give_up:
            self.state, self.error = "failed", failure.message
            until = "" if self.devices.hostfile is None else " until the hostfile changes"
            log(f"error: {failure.message}; no engine can start on the {len(self.hosts)} rank(s) left: "
                f"requests get 503{until}")
            self._fail_all(ApiError(503, f"the engine cannot start: {failure.message}", code="unavailable",
                                    headers={"Retry-After": str(RETRY_AFTER_S)}))
            return
        self.devices.dropped.update(self.slots[r] for r in ranks)
        self.state = "restarting"
        if self.fruitless:
            time.sleep(1.0)                  # not at full speed into the same failure
        log(f"the engine failed: {failure.message}; "
            + (f"dropping rank {', '.join(map(str, ranks))} ({', '.join(lost)}), " if lost else "")
            + f"{len(self.jobs)} request(s) wait")

    def _fail_all(self, error: ApiError) -> None:
        with self.lock:
            jobs, self.jobs = list(self.jobs.values()), {}
        for job in jobs:
            job.send("error", error)

    def stop(self, *_) -> None:
        self.stopping.set()


def supervise(cfg: SupervisorConfig) -> None:
    """Run the supervisor in this (main) thread; SIGINT or SIGTERM end it and every process it started."""
    sup = Supervisor(cfg)
    previous = {s: signal.signal(s, sup.stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sup.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
