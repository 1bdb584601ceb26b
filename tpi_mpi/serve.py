"""OpenAI-compatible HTTP front on rank 0 (`tpi_mpi serve`); the other ranks follow as in `generate`.

Two threads on rank 0, each with one role:
- the HTTP thread runs uvicorn (Starlette app, its own event loop): it checks the key, parses and
  tokenizes each request, and puts a `Job` on a bounded queue (full: HTTP 429). It never touches MPI.
- the main thread is the only one that talks to the other ranks: it moves jobs into the batch's
  free slots (up to --max-batch answered together, batching.py), runs one step for all of them at a
  time and sends each its text through the job's asyncio queue (`loop.call_soon_threadsafe`, the
  one thread-safe way into an event loop).
A client that goes away sets `job.cancelled`; its sequence ends at the next step and frees its slot. An
engine error fails the running and the queued requests with HTTP 5xx, stops the HTTP side and is
raised, so the job ends with the command line's one-line message. Under a supervisor (`serve
--ranks`, supervisor.py) the same engine takes its jobs from the supervisor's channel instead of the
HTTP thread (serve_channel), and an engine error leaves the requests to the supervisor to resume.

Streams are server-sent events ending with `data: [DONE]`; the last chunk with a finish_reason
always carries `usage`, and `stream_options: {"include_usage": true}` adds OpenAI's own usage-only
chunk (empty `choices`) before [DONE]. Extensions beyond OpenAI's fields: `top_k` and `ignore_eos`
(as vLLM names them). The request's `model` is not checked: there is one model, named in replies.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .jobs import HttpJob, Job
from .errors import ConfigError, TpiError
from .openai_api import (ApiError, chat_messages, completion_prompt, flag_field, number_field, parse_max_tokens,
                         parse_sampling, parse_stops, read_json, sse)

if TYPE_CHECKING:              # the supervisor imports this module for its HTTP side: no torch there
    from .steps import Root

BUILTIN_MODEL_ID = "smollm2-135m-instruct"
POLL_S = 0.5                 # how often the idle main thread checks that the HTTP thread still runs


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
    """The name /v1/models gives: the model's folder or file name."""
    return BUILTIN_MODEL_ID if model is None else Path(model).expanduser().name


# --- the main thread: admission and steps ----------------------------------------------------------

class Engine:
    """The main thread's side: jobs from a bounded queue into the batch's slots, one step at a time."""

    def __init__(self, root: Root, cfg: ServeConfig) -> None:
        from .batching import Batcher

        self.root, self.cfg, self.codec = root, cfg, root.s.codec
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.admitted = 0                    # jobs queued or running: at most queue_size + max_batch
        self.lock = threading.Lock()
        self.failed: str | None = None       # why the engine stopped; new requests get 503
        self.mean_job_s = 1.0                # running mean, for Retry-After
        s = root.s
        self.context = s.context                 # positions per request (--context, capped at the model's)
        chunk = cfg.prefill_chunk or default_prefill_chunk(s)
        self.batch = Batcher(root, cfg.max_batch, chunk, self.context, set(s.m.eos_ids) | s.codec.stop_ids())

    @property
    def busy(self) -> int:
        return len(self.batch.running)

    def submit(self, job: Job) -> None:
        """HTTP thread: queue a job or refuse it."""
        if self.failed:
            raise ApiError(503, f"the server is shutting down: {self.failed}", code="unavailable")
        with self.lock:
            full = self.admitted >= self.cfg.queue_size + self.cfg.max_batch
            if not full:
                self._put(job)
        if full:
            raise queue_full(self.cfg, self.mean_job_s)

    def enqueue(self, job: Job) -> None:
        """Queue a job unconditionally (a supervisor in front has admitted it already)."""
        with self.lock:
            self._put(job)

    def _put(self, job: Job) -> None:
        self.admitted += 1
        self.jobs.put_nowait(job)

    def health(self) -> tuple[dict, int]:
        if self.failed:
            return {"status": "error", "error": self.failed}, 503
        s = self.root.s
        return {"status": "ok", "model": self.cfg.model_id, "busy": self.busy > 0, "running": self.busy,
                "max_batch": self.cfg.max_batch, "queued": self.jobs.qsize(), "ranks": s.comm.size,
                "allreduce": s.comm.mode, "windows": s.windows}, 200

    def log(self, msg: str) -> None:
        self.root.s.log(msg)

    def loop(self, front) -> None:
        """Main thread: step the batch until the front (HTTP thread or supervisor channel) closes or
        the engine fails. `front.is_open()` is False once it asked to stop, and raises if it died."""
        try:
            while self._admit(block=not self.batch.running, front=front):
                for seq in self.batch.step():
                    self._ended(seq)
        except BaseException as e:
            self.failed = str(e) or type(e).__name__
            if front.resumes:                    # a supervisor sends them again to the next engine
                raise
            self.batch.fail(ApiError(500, f"the cluster failed: {e}", code="engine_error"))
            while True:                          # nobody will answer the queued requests
                try:
                    self.jobs.get_nowait().send("error", ApiError(503, f"the server stopped: {self.failed}",
                                                                  code="unavailable"))
                except queue.Empty:
                    break
            raise

    def _admit(self, block: bool, front) -> bool:
        """Move queued jobs into free slots; with nothing running, wait for one (the workers are told
        that the next step may be long in coming). False: the front has closed, nothing runs."""
        if block:
            self.root.idle()
        while self.batch.free_slots:
            try:
                job = self.jobs.get(timeout=POLL_S) if block else self.jobs.get_nowait()
            except queue.Empty:
                if block:
                    if not front.is_open():
                        return False
                    continue
                return True
            if job.cancelled:
                job.send("error", ApiError(499, "the client closed the request"))
                self._release()
                continue
            self.batch.admit(job)
            block = False
        return True

    def _ended(self, seq) -> None:
        self._release()
        seconds = time.perf_counter() - seq.started
        self.mean_job_s = 0.8 * self.mean_job_s + 0.2 * seconds
        self.root.s.log(f"{seq.job.id}: {len(seq.job.prompt_ids)} prompt + {len(seq.generated)} new tokens "
                        f"in {seconds:.2f} s, {'client gone' if seq.reason == 'gone' else seq.reason}")

    def _release(self) -> None:
        with self.lock:
            self.admitted -= 1


def queue_full(cfg: ServeConfig, mean_job_s: float) -> ApiError:
    wait = max(1, math.ceil(mean_job_s * cfg.queue_size / cfg.max_batch))
    return ApiError(429, f"{cfg.queue_size} request(s) are waiting already (--queue-size): retry in {wait} s",
                    code="queue_full", headers={"Retry-After": str(wait)})


def default_prefill_chunk(s) -> int:
    """Prompt tokens per step: few when the weights are in memory (a step is cheap, so a short
    request waits little behind a long prompt); many when they stream (a step reads every weight)."""
    return 64 if all(w == "all" for w in s.windows) else 512


# --- the HTTP side ---------------------------------------------------------------------------

async def _watch_disconnect(request: Request, job: Job) -> None:
    """Mark the job cancelled once the client has gone (while queued or while answered)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled = True
            return


class Api:
    """The routes; runs in the HTTP thread. `front` takes the jobs: the Engine on rank 0, or a
    supervisor (supervisor.py) that relays them to the engine it runs."""

    def __init__(self, front) -> None:
        self.front, self.cfg, self.codec = front, front.cfg, front.codec
        self.context = front.context                  # per request: the KV-cache slot's positions
        self.created = int(time.time())

    def app(self) -> Starlette:
        def route(path, fn, method):
            return Route(path, self._guarded(fn), methods=[method])

        async def http_error(request: Request, exc: HTTPException) -> Response:
            return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

        return Starlette(routes=[
            route("/health", self.health, "GET"),
            route("/v1/models", self.models, "GET"),
            route("/v1/chat/completions", self.chat_completions, "POST"),
            route("/v1/completions", self.completions, "POST"),
        ], exception_handlers={HTTPException: http_error})

    def _guarded(self, fn):
        async def handle(request: Request) -> Response:
            try:
                self._check_key(request)
                return await fn(request)
            except ApiError as e:
                return e.response()
            except Exception as e:               # a bug here must not look like a hang to the client
                self.front.log(f"internal error in {request.url.path}: {type(e).__name__}: {e}")
                return ApiError(500, f"internal error {type(e).__name__}: {e}").response()
        return handle

    def _check_key(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")

    async def health(self, request: Request) -> Response:
        body, status = self.front.health()
        return JSONResponse(body, status_code=status)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.cfg.model_id, "object": "model", "created": self.created, "owned_by": "tpi_mpi"}]})

    async def chat_completions(self, request: Request) -> Response:
        body = await read_json(request)
        messages = chat_messages(body)
        try:
            ids = await run_in_threadpool(self.codec.encode_chat, messages)
        except ConfigError as e:                 # no template, or the template refuses these messages
            raise ApiError(400, str(e), param="messages") from None
        job = self._job(body, ids, "chatcmpl", ("max_completion_tokens", "max_tokens"))
        return await self._answer(request, body, job, chat=True)

    async def completions(self, request: Request) -> Response:
        body = await read_json(request)
        ids = await run_in_threadpool(self.codec.encode, completion_prompt(body))
        job = self._job(body, ids, "cmpl", ("max_tokens",))
        return await self._answer(request, body, job, chat=False)

    def _job(self, body: dict, ids: list[int], prefix: str, max_keys: tuple[str, ...]) -> Job:
        if number_field(body, "n", 1, int) != 1:
            raise ApiError(400, "n must be 1: one answer per request", param="n")
        if len(ids) >= self.context:
            raise ApiError(400, f"the prompt has {len(ids)} tokens, a request's context is {self.context} "
                                "(serve --context): shorten it", param="messages" if prefix == "chatcmpl" else "prompt",
                           code="context_length_exceeded")
        max_tokens = parse_max_tokens(body, max_keys) or self.cfg.max_tokens
        return HttpJob(id=f"{prefix}-{uuid.uuid4().hex[:24]}", prompt_ids=ids, sampling=parse_sampling(body),
                       max_tokens=max_tokens, stops=parse_stops(body), ignore_eos=flag_field(body, "ignore_eos"),
                       loop=asyncio.get_running_loop())

    async def _answer(self, request: Request, body: dict, job: Job, chat: bool) -> Response:
        stream = flag_field(body, "stream")
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.front.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await job.events.get()       # headers wait for the first token: errors keep their status
        except BaseException:
            job.cancelled = True
            watcher.cancel()
            raise
        if first[0] == "error":
            watcher.cancel()
            raise first[1]
        if stream:
            return StreamingResponse(self._events(job, first, watcher, chat, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        parts, item = [], first
        try:
            while item[0] == "text":
                parts.append(item[1])
                item = await job.events.get()
        finally:
            watcher.cancel()
        if item[0] == "error":
            raise item[1]
        text, done = "".join(parts), item[1]
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": done["finish_reason"]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}
        return JSONResponse({"id": job.id, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.cfg.model_id,
                             "choices": [choice], "usage": done["usage"]})

    async def _events(self, job: Job, first: tuple, watcher: asyncio.Task, chat: bool, include_usage: bool):
        created = int(time.time())

        def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({} if text is None else {"content": text})
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            return {"id": job.id, "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": created, "model": self.cfg.model_id, "choices": [choice]}

        try:
            if chat:
                yield sse(chunk("", role=True))
            item = first
            while item[0] == "text":
                yield sse(chunk(item[1]))
                item = await job.events.get()
            if item[0] == "error":               # the status is sent already: OpenAI's in-stream error
                yield sse(item[1].body())
                return
            done = item[1]
            yield sse(chunk(None, done["finish_reason"]) | {"usage": done["usage"]})
            if include_usage:
                yield sse(chunk(None) | {"choices": [], "usage": done["usage"]})
            yield sse("[DONE]")
        finally:                                 # normal end, or the client has gone
            job.cancelled = True
            watcher.cancel()


class HttpThread:
    """uvicorn in a daemon thread with its own event loop, on a socket bound beforehand (so a busy
    port is a clear error before any request is accepted)."""

    resumes = False      # if the engine fails, nobody sends its requests again: they get a 5xx

    def __init__(self, app: Starlette, host: str, port: int) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): choose another --port or --host") from None
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="tpi_mpi-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise TpiError("the HTTP server did not start (see the messages above)")
            time.sleep(0.01)

    def is_open(self) -> bool:
        """The engine's front stays open while uvicorn runs (it stops only with the process)."""
        if not self.thread.is_alive():
            raise TpiError("the HTTP server stopped unexpectedly")
        return True

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(root: Root, cfg: ServeConfig) -> None:
    """Rank 0: serve HTTP until stopped or until the cluster fails (raised)."""
    engine = Engine(root, cfg)
    http = HttpThread(Api(engine).app(), cfg.host, cfg.port)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    try:
        http.start()
        root.s.log(f"serving {cfg.model_id} at http://{host}:{http.port}/v1 on {root.s.comm.size} rank(s); "
                   f"{cfg.max_batch} request(s) at a time, queue of {cfg.queue_size}, prompts "
                   f"{engine.batch.chunk} tokens per step{', API key required' if cfg.api_key else ''}")
        engine.loop(http)
    finally:
        http.stop()                              # lets the failed requests' answers go out first


def serve_channel(root: Root, cfg: ServeConfig, channel) -> None:
    """Rank 0 under a supervisor (supervisor.py): take requests from `channel` until it closes."""
    from .channel import ChannelFront

    engine = Engine(root, cfg)
    front = ChannelFront(channel, engine)
    s = root.s
    channel.send({"ready": {"ranks": s.comm.size, "pids": s.pids, "context": engine.context,
                            "codec": str(s.shard.folder), "allreduce": s.comm.mode, "windows": s.windows}})
    front.start()
    engine.loop(front)
