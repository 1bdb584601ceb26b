"""The local channel between a supervisor (supervisor.py) and rank 0 of the engine it launched.

One JSON object per line over a Unix socket (both ends are on rank 0's host). Requests go to the
engine as token ids; answers come back token by token, each with the text it completes, so the
supervisor always knows which tokens a client has had and can resume the request on a new engine.

    supervisor -> engine   {"job": {...}}   {"cancel": id}
    engine -> supervisor   {"ready": {...}}   {"failed": {"ranks": [...], "message": str, "fatal": bool}}
                           {"state": {...}} (serving.Engine.engine_state, every REPORT_S)
                           {"id": id, "token": t, "text": str}   {"id": id, "text": str}
                           {"id": id, "done": {...}}   {"id": id, "error": {"status", "message", "code"}}

Closing the channel is the supervisor's stop: the engine ends its requests and stops the workers.
No MPI here; no pickle: ids, numbers and text only.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import threading
from dataclasses import dataclass, replace

from .errors import CommError, PeerFailed, TpiError
from .jobs import ApiError, Job
from .sampling import SamplingConfig


class Channel:
    """A connected Unix socket carrying JSON lines; `send` may be called from any thread. With
    `background`, `send` never blocks: a thread of the channel's own writes the lines, so a stalled
    reader (a frozen rank 0) stalls that thread, not the caller (the supervisor's HTTP loop)."""

    def __init__(self, sock: socket.socket, background: bool = False) -> None:
        sock.settimeout(None)
        self.sock = sock
        self.pending = b""                  # received, not yet a whole line
        self.lock = threading.Lock()
        self.closed = False
        self.outbox: queue.SimpleQueue | None = None
        if background:
            self.outbox = queue.SimpleQueue()
            threading.Thread(target=self._write, name="tpi_mpi-channel-out", daemon=True).start()

    @classmethod
    def connect(cls, path: str) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError as e:
            sock.close()
            raise TpiError(f"cannot reach the supervisor at {path} ({e.strerror}): rank 0 must run on the "
                           "supervisor's host, the first host of the hostfile") from None
        return cls(sock)

    def send(self, message: dict) -> bool:
        """False once the other end has gone."""
        data = (json.dumps(message, ensure_ascii=False) + "\n").encode()
        if self.outbox is not None:
            if self.closed:
                return False
            self.outbox.put(data)
            return True
        with self.lock:
            if self.closed:
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self.closed = True
                return False

    def _write(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.sock.sendall(data)
            except OSError:                 # closed by us (unblocks a stalled sendall) or by the other end
                self.closed = True
                return

    def recv(self, timeout: float | None = None) -> dict | None:
        """The next message; None once the other end has closed; TimeoutError if none came within
        `timeout` seconds (None: wait as long as it takes)."""
        while b"\n" not in self.pending:
            if timeout is not None and not select.select([self.sock], [], [], timeout)[0]:
                raise TimeoutError
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return None
            self.pending += data
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.outbox is not None:
            self.outbox.put(None)
        self.sock.close()


# --- jobs on the wire -------------------------------------------------------------------------------

def job_message(job: Job) -> dict:
    s = job.sampling
    return {"job": {"id": job.id, "prompt": job.prompt_ids, "generated": list(job.generated),
                    "sampling": [s.temperature, s.top_k, s.top_p, s.seed], "max_tokens": job.max_tokens,
                    "stops": job.stops, "ignore_eos": job.ignore_eos}}


def with_seed(job: Job, seed: int) -> None:
    """A sampled request without a seed gets one, so that a resumed answer goes on as it began."""
    if job.sampling.temperature > 0 and job.sampling.seed is None:
        job.sampling = replace(job.sampling, seed=seed)


def error_message(e: ApiError) -> dict:
    return {"status": e.status, "message": e.message, "code": e.code}


def failure_message(e: BaseException) -> dict:
    """What rank 0 tells the supervisor when the engine fails: the ranks to drop, if any, and whether
    it is worth starting again (a rank that died or froze) or not (a setting or a model that does not
    fit: it would fail alike)."""
    if isinstance(e, CommError):
        return {"ranks": e.ranks, "message": str(e), "fatal": False}
    if isinstance(e, PeerFailed):   # another rank's own error at start-up (it printed it): a setting
        return {"ranks": e.ranks, "message": str(e), "fatal": True}
    return {"ranks": [], "message": str(e) or type(e).__name__, "fatal": isinstance(e, TpiError)}


@dataclass(eq=False)
class ChannelJob(Job):
    """A request the supervisor sent: its tokens, text and end go back over the channel."""
    channel: Channel | None = None
    ended: bool = False

    def send(self, kind: str, value) -> None:
        self.ended = kind in ("done", "error")
        if kind == "error":
            value = error_message(value)
        if not self.channel.send({"id": self.id, kind: value}):
            self.cancelled = True

    def token(self, token: int, text: str) -> None:
        if not self.channel.send({"id": self.id, "token": token, "text": text}):
            self.cancelled = True


class ChannelFront:
    """Rank 0's side: a thread reads the supervisor's jobs into the engine's queue. The engine's
    loop asks `is_open()`: False once the supervisor has closed the channel (it is stopping)."""

    resumes = True       # if the engine fails, the supervisor sends its requests to the next one

    def __init__(self, channel: Channel, engine) -> None:
        self.channel, self.engine = channel, engine
        self.jobs: dict[str, ChannelJob] = {}
        self.thread = threading.Thread(target=self._read, name="tpi_mpi-channel", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_open(self) -> bool:
        return not self.channel.closed

    def report(self, state: dict) -> None:
        self.channel.send({"state": state})

    def _read(self) -> None:
        while (message := self.channel.recv()) is not None:
            if "job" in message:
                j = message["job"]
                job = ChannelJob(j["id"], j["prompt"], SamplingConfig(*j["sampling"]), j["max_tokens"], j["stops"],
                                 j["ignore_eos"], generated=j["generated"], channel=self.channel)
                self.jobs = {k: v for k, v in self.jobs.items() if not (v.cancelled or v.ended)} | {job.id: job}
                self.engine.enqueue(job)
            elif "cancel" in message and (job := self.jobs.get(message["cancel"])):
                job.cancelled = True
        for job in self.jobs.values():     # the supervisor has gone or is stopping: end every request
            job.cancelled = True
