"""Rank 0's serving loop, no HTTP here: requests (`Job`s) from a bounded queue into the batch
(scheduler.Batcher), first come first served, each once the KV pool has the blocks it can use; then
one step at a time for all of them. serve.py puts this loop
behind an HTTP thread; under a supervisor, serve_channel puts it behind the supervisor's channel.

The main thread is the only one that talks to the other ranks. A client that goes away sets
`job.cancelled`; its sequence ends at the next step and frees its slot. An engine error fails the
running and the queued requests (HTTP 5xx) and is raised; behind a supervisor the requests are
left to it, which resumes them on the next engine.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .jobs import ApiError, Job

if TYPE_CHECKING:              # the supervisor imports this module for ServeConfig: no torch there
    from .steps import Root

BUILTIN_MODEL_ID = "smollm2-135m-instruct"
POLL_S = 0.5                 # how often the idle main thread checks that its front still runs
REPORT_S = 2.0               # how often every rank's memory is gathered and the state sent to the front


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 8          # requests waiting while max_batch are answered
    max_batch: int = 8           # requests answered together, each in a KV-cache slot of its own
    prefill_chunk: int = 0       # prompt tokens per step (a multiple of batch.PIECE); 0: default_prefill_chunk
    api_key: str | None = None
    max_tokens: int = 512        # per answer when a request sets no max_tokens
    model_id: str = BUILTIN_MODEL_ID


def model_id(model: str | None) -> str:
    """The name /v1/models gives: the model's folder or file name, or its Hub name as given."""
    from .hub import display_name

    return BUILTIN_MODEL_ID if model is None else display_name(model)


# --- the main thread: admission and steps ----------------------------------------------------------

class Engine:
    """The main thread's side: jobs from a bounded queue into the batch's slots, one step at a time."""

    def __init__(self, root: Root, cfg: ServeConfig) -> None:
        from .scheduler import Batcher

        self.root, self.cfg, self.codec = root, cfg, root.session.codec
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting: Job | None = None      # the queue's head, taken out, waiting for the pool's blocks
        self.admitted = 0                    # jobs queued or running: at most queue_size + max_batch
        self.lock = threading.Lock()
        self.failed: str | None = None       # why the engine stopped; new requests get 503
        self.mean_job_s = 1.0                # running mean, for Retry-After
        s = root.session
        self.context = s.context                 # positions per request (--context, capped at the model's)
        chunk = cfg.prefill_chunk or default_prefill_chunk(s)
        self.batch = Batcher(root, cfg.max_batch, chunk, self.context, set(s.model_config.eos_ids) | s.codec.stop_ids(),
                             draft=s.drafts)
        self.memory: tuple[list[float], list[float]] | None = None   # every rank's (resident, peak), REPORT_S old
        self.reported_at = -REPORT_S

    @property
    def busy(self) -> int:
        return len(self.batch.running)

    def submit(self, job: Job) -> None:
        """HTTP thread: queue a job or refuse it."""
        if self.failed:
            raise ApiError(503, f"the server is shutting down: {self.failed}", code="unavailable")
        with self.lock:
            refuse_when_full(self.admitted, self.cfg, self.mean_job_s)
            self._put(job)

    def enqueue(self, job: Job) -> None:
        """Queue a job unconditionally (a supervisor in front has admitted it already)."""
        with self.lock:
            self._put(job)

    def _put(self, job: Job) -> None:
        self.admitted += 1
        self.jobs.put_nowait(job)

    def health(self) -> tuple[dict, int]:
        s = self.root.session
        queued = self.jobs.qsize() + (self.waiting is not None)
        body = health_body("failed" if self.failed else "ok", self.cfg, running=self.busy, queued=queued,
                           ranks=s.comm.size, pids=s.pids, allreduce=s.comm.mode, windows=s.windows, error=self.failed)
        return body, 503 if self.failed else 200

    def engine_state(self) -> dict:
        """What the engine alone knows, for /cluster and /metrics (any thread): the KV pool's blocks,
        each rank's host name, the blocks it keeps resident beside its window, and its memory."""
        pool, s = self.batch.pool, self.root.session
        rss, peak = self.memory or ([], [])
        return {"kv_blocks_used": pool.n_blocks - pool.free_blocks, "kv_blocks_total": pool.n_blocks,
                "hosts": list(s.hosts), "resident": list(s.pinned), "rss_bytes": [int(x) for x in rss],
                "peak_rss_bytes": [int(x) for x in peak]}

    def log(self, msg: str) -> None:
        self.root.session.log(msg)

    def _report(self, front) -> None:
        """Every REPORT_S, between steps: every rank's memory (a collective of a few numbers), and the
        engine's state to the front (a supervisor keeps it; the HTTP thread reads engine_state() itself)."""
        now = time.monotonic()
        if now - self.reported_at >= REPORT_S:
            self.reported_at = now
            self.memory = self.root.memory()
            front.report(self.engine_state())

    def loop(self, front) -> None:
        """Main thread: step the batch until the front (HTTP thread or supervisor channel) closes or
        the engine fails. `front.is_open()` is False once it asked to stop, and raises if it died."""
        try:
            while self._admit(block=not self.batch.running, front=front):
                for seq in self.batch.step():
                    self._ended(seq)
                self._report(front)
        except BaseException as e:
            self.failed = str(e) or type(e).__name__
            if front.resumes:                    # a supervisor sends them again to the next engine
                raise
            self.batch.fail(ApiError(500, f"the cluster failed: {e}", code="engine_error"))
            if self.waiting:
                self.jobs.put(self.waiting)
            while True:                          # nobody will answer the queued requests
                try:
                    self.jobs.get_nowait().send("error", ApiError(503, f"the server stopped: {self.failed}",
                                                                  code="unavailable"))
                except queue.Empty:
                    break
            raise

    def _admit(self, block: bool, front) -> bool:
        """Move queued jobs, in order, into the batch while it has a slot and the pool their blocks;
        with nothing running, wait for one (the workers are told that the next step may be long in
        coming). False: the front has closed, nothing runs."""
        if block:
            self.root.idle()
        while self.batch.free_slots:
            if self.waiting is None:
                try:
                    self.waiting = self.jobs.get(timeout=POLL_S) if block else self.jobs.get_nowait()
                except queue.Empty:
                    if block:
                        if not front.is_open():
                            return False
                        self._report(front)
                        continue
                    return True
            job, self.waiting = self.waiting, None
            if job.cancelled:
                job.send("error", ApiError(499, "the client closed the request"))
                self._release()
            elif self.batch.fits(job):
                self.batch.admit(job)
                block = False
            elif self.batch.running:
                self.waiting = job               # it waits, first in line, for the blocks of a request that ends
                return True
            else:                                # cannot happen: a request's positions are at most the pool's
                job.send("error", ApiError(400, f"the request needs {self.batch.positions(job)} KV positions, the "
                                                f"pool holds {self.batch.pool.positions}", code="context_length_exceeded"))
                self._release()
        return True

    def _ended(self, seq) -> None:
        self._release()
        seconds = time.perf_counter() - seq.started
        self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * seconds
        drafted = seq.speculation.stats() if seq.speculation else None
        self.root.session.log(f"{seq.job.id}: {len(seq.job.prompt_ids)} prompt + {len(seq.generated)} new tokens "
                              f"in {seconds:.2f} s, {'client gone' if seq.reason == 'gone' else seq.reason}"
                              + (f" ({drafted['accepted']} of {drafted['proposed']} drafted accepted)" if drafted else ""))

    def _release(self) -> None:
        with self.lock:
            self.admitted -= 1


def refuse_when_full(held: int, cfg: ServeConfig, mean_job_s: float) -> None:
    """Admission, for serve and for a supervisor in front of it: with `held` requests answered or
    waiting already, a new one is refused with 429 and a Retry-After from the mean request time."""
    if held >= cfg.queue_size + cfg.max_batch:
        wait = max(1, math.ceil(mean_job_s * cfg.queue_size / cfg.max_batch))
        raise ApiError(429, f"{cfg.queue_size} request(s) are waiting already (--queue-size): retry in {wait} s",
                       code="queue_full", headers={"Retry-After": str(wait)})


def health_body(status: str, cfg: ServeConfig, *, running: int, queued: int, ranks: int, pids: list[int] | None = None,
                allreduce: str | None = None, windows: list | None = None, hosts: list[str] | None = None,
                restarts: int = 0, last_failure: dict | None = None, error: str | None = None) -> dict:
    """/health's one schema, the same for `serve` and for `serve --ranks` (the supervisor): every key
    is always there, null where that server cannot know it (a plain serve knows no hosts)."""
    return {"status": status, "model": cfg.model_id, "ranks": ranks, "hosts": hosts, "pids": pids or [],
            "allreduce": allreduce, "windows": windows, "max_batch": cfg.max_batch, "running": running,
            "queued": queued, "restarts": restarts, "last_failure": last_failure, "error": error}


def default_prefill_chunk(s) -> int:
    """Prompt tokens per step: few when the weights are in memory (a step is cheap, so a short
    request waits little behind a long prompt); many when they stream (a step reads every weight)."""
    return 64 if all(w == "all" for w in s.windows) else 512
