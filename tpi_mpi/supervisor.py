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

Devices are slots: the hostfile's, in order, or N slots on this host (devices.py). A dropped slot
comes back when the hostfile changes (it is re-read at each launch). Rank 0 runs on the first slot,
which must be this host: if it goes, so does the supervisor. The launched processes, and which rank
a failure names, are engine_process.py's; the engine's own side of the channel is supervised.py's.
This module is the state machine over them (launch, relay, fail, drop, launch again) and the
HTTP front's jobs.
"""

from __future__ import annotations

import os
import random
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import click

from .channel import Channel, job_message, with_seed
from .config import parse_ratio
from .devices import Devices
from .engine_process import EXIT_GRACE_S, Ahead, EngineProcess, Failure
from .errors import ConfigError, TpiError
from .heartbeat import BEAT_S, MIN_TIMEOUT_S
from .jobs import ApiError
from .launcher import launched_by_mpi
from .serve import Api, HttpThread
from .serving import ServeConfig, health_body, refuse_when_full
from .text import TextCodec

FAILED_STARTS = 3      # launches in a row that never got ready, with no device to blame: give up
RETRY_AFTER_S = 10     # Retry-After while no engine can start
# --comm-timeout under a supervisor when none is given: how long a rank may be silent (no heartbeat,
# no message in a step) before it is dropped. Healthy waits are far shorter (docs/supervisor.md)
SERVE_COMM_TIMEOUT_S = 10.0

# the serve options only the supervisor reads; it passes every other one on to the engine
SUPERVISOR_ONLY = {"host", "port", "api_key", "ranks", "hostfile", "launcher_args", "channel", "ratio", "prepare_ahead",
                   "prepare_for", "comm_timeout"}


def log(msg: str) -> None:
    print(f"tpi_mpi: supervisor: {msg}", file=sys.stderr, flush=True)


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
    comm_timeout: float = SERVE_COMM_TIMEOUT_S     # a rank silent this long is dropped

    @classmethod
    def from_command(cls, serve: ServeConfig, ctx) -> SupervisorConfig:
        """From the serve command's options (`ctx`: its click context): the supervisor's own, and
        every other one given, other than its default, passed on as the engine's command line."""
        opts = ctx.params
        ratio = parse_ratio(opts["ratio"])
        if launched_by_mpi():
            raise ConfigError("serve --ranks launches mpirun itself: run it without mpirun")
        if opts["ranks"] < 1:
            raise ConfigError(f"--ranks {opts['ranks']}: must be at least 1")
        timeout = opts["comm_timeout"]
        if ctx.get_parameter_source("comm_timeout") == click.core.ParameterSource.DEFAULT:
            timeout = SERVE_COMM_TIMEOUT_S           # the serve default: seconds, not the batch commands' minute
        elif timeout < MIN_TIMEOUT_S:
            raise ConfigError(f"--comm-timeout {timeout:g}: under --ranks use at least {MIN_TIMEOUT_S:g} s (the ranks "
                              f"beat every {BEAT_S:g} s)")
        engine_args = ["--comm-timeout", f"{timeout:g}"]
        for p in ctx.command.params:
            value = opts.get(p.name)
            if p.name in SUPERVISOR_ONLY or not p.expose_value or value is None or value == p.get_default(ctx):
                continue
            engine_args += [p.opts[0]] if getattr(p, "is_flag", False) else [p.opts[0], str(value)]
        return cls(serve, opts["ranks"], opts["hostfile"], engine_args, shlex.split(opts["launcher_args"]), ratio,
                   opts["model"], opts["prepare_ahead"], timeout)


class Supervisor:
    """The HTTP front's jobs, relayed to the engine; restarts the engine when it fails. The HTTP
    thread calls submit/health; everything else runs on the main thread."""

    def __init__(self, cfg: SupervisorConfig) -> None:
        self.cfg = cfg.serve
        self.sup = cfg
        self.devices = Devices(cfg.ranks, cfg.hostfile, cfg.ratio, log=log)
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
        self.engine: EngineProcess | None = None
        self.state_of_engine: dict | None = None   # the engine's last report (serving.Engine.engine_state)
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
            raise ApiError(503, f"the service is down: {self.error}", code="unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", code="unavailable")
        with_seed(job, random.getrandbits(63))
        with self.lock:
            refuse_when_full(len(self.jobs), self.cfg, self.mean_job_s)
            self.jobs[job.id] = job
            if self.live:
                self.engine.channel.send(job_message(job))

    def health(self) -> tuple[dict, int]:
        ready = self.engine.ready if self.engine and self.live else {}
        held = len(self.jobs)                # the engine answers up to max_batch of them, the rest wait
        body = health_body({"serving": "ok"}.get(self.state, self.state), self.cfg,
                           running=min(held, self.cfg.max_batch), queued=max(0, held - self.cfg.max_batch),
                           ranks=len(self.hosts), hosts=self.hosts, pids=ready.get("pids"),
                           allreduce=ready.get("allreduce"), windows=ready.get("windows"), restarts=self.restarts,
                           last_failure=self.last_failure, error=self.error)
        return body, 503 if self.state == "failed" else 200      # restarting: requests wait, none is lost

    def engine_state(self) -> dict | None:
        """The running engine's last report; None while none runs."""
        return self.state_of_engine if self.live else None

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
        self.hosts, self.live, self.finished, self.state_of_engine = hosts, False, 0, None
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
        self.engine = EngineProcess(argv, self.listener, hosts, self.sup.comm_timeout)
        outcome = self.engine.start(self.stopping)
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
                                "--prepare-for", str(world)], world, log)
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
                message = {}
            if message is None or "failed" in message:
                with self.lock:
                    self.live = False
                return self.engine.failure(message and message["failed"], self.hosts)
            if silent := self.engine.silence():        # a rank frozen or cut off, busy or idle
                with self.lock:
                    self.live = False
                return silent
            if not message:
                continue
            if "state" in message:
                self.state_of_engine = message["state"]
                continue
            job = self.jobs.get(message.get("id"))
            if job is None:                          # ended or cancelled meanwhile
                continue
            if "token" in message:
                job.generated.append(message["token"])
                job.token(message["token"], message["text"])
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
            until = (" until the hostfile changes" if self.devices.hostfile else
                     ": without --hostfile no device comes back, restart the server")
            self.state, self.error = "failed", f"{failure.message} (no engine can start on the {len(self.hosts)} " \
                                               f"rank(s) left{until})"
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
