"""OpenAI-compatible HTTP front on rank 0 (`tpi_mpi serve`); the other ranks follow as in `generate`.

Two threads on rank 0, each with one role:
- the HTTP thread runs uvicorn (Starlette app, its own event loop): it checks the key, parses and
  tokenizes each request, and puts a `Job` on a bounded queue (full: HTTP 429). It never touches MPI.
- the main thread runs the serving loop (serving.py): it moves jobs into the batch's free slots, runs
  one step for all of them at a time and sends each its text through the job's asyncio queue
  (`loop.call_soon_threadsafe`, the one thread-safe way into an event loop).
An engine error fails the requests with HTTP 5xx, stops the HTTP side and is raised, so the job ends
with the command line's one-line message. Under a supervisor (`serve --ranks`, supervisor.py) the
same loop takes its jobs from the supervisor's channel instead (serve_channel).

Streams are server-sent events ending with `data: [DONE]`; the last chunk with a finish_reason
always carries `usage`, and `stream_options: {"include_usage": true}` adds OpenAI's own usage-only
chunk (empty `choices`) before [DONE]. Extensions beyond OpenAI's fields: `top_k` and `ignore_eos`
(as vLLM names them). The request's `model` is not checked: there is one model, named in replies.

Beside the API: `/metrics` (Prometheus, metrics.py), `/cluster` (/health with the engine's state and
the counts: what the page polls) and the page at `/` (static files in web/, no key needed to load it).
"""

from __future__ import annotations

import asyncio
import hmac
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .errors import ConfigError, TpiError
from .jobs import ApiError, HttpJob, Job
from .metrics import CONTENT_TYPE, ServerMetrics, outcome_of_status
from .openai_api import (chat_messages, completion_prompt, error_response, flag_field, number_field, parse_max_tokens,
                         parse_sampling, parse_stops, read_json, sse)
from .serving import BUILTIN_MODEL_ID, Engine, ServeConfig, model_id  # noqa: F401 (the CLI's and the supervisor's)

if TYPE_CHECKING:              # the supervisor imports this module for its HTTP side: no torch there
    from .steps import Root

WEB = Path(__file__).with_name("web")     # the page at / (package data: no build step, no CDN)


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
        self.metrics = ServerMetrics(front)

    def app(self) -> Starlette:
        def route(path, fn, method, counted=False):
            return Route(path, self._guarded(fn, counted), methods=[method])

        async def http_error(request: Request, exc: HTTPException) -> Response:
            return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

        async def page(request: Request) -> Response:    # no key: the page asks for one when the API does
            return FileResponse(WEB / "index.html")

        return Starlette(routes=[
            route("/health", self.health, "GET"),
            route("/metrics", self.prometheus, "GET"),
            route("/cluster", self.cluster, "GET"),
            route("/v1/models", self.models, "GET"),
            route("/v1/chat/completions", self.chat_completions, "POST", counted=True),
            route("/v1/completions", self.completions, "POST", counted=True),
            Route("/", page, methods=["GET"]),
            Mount("/static", StaticFiles(directory=WEB), name="static"),
        ], exception_handlers={HTTPException: http_error})

    def _guarded(self, fn, counted: bool):
        """`fn` behind the key check, its errors as OpenAI's error bodies; `counted`: a completion
        route, whose every request is counted by how it ended (metrics.py)."""
        def count(request: Request, status: int) -> None:
            if not counted:
                return
            job = getattr(request.state, "job", None)
            if job is None:
                self.metrics.refused(status)
            else:
                self.metrics.ended(job, outcome_of_status(status))

        async def handle(request: Request) -> Response:
            try:
                self._check_key(request)
                return await fn(request)
            except ApiError as e:
                count(request, e.status)
                return error_response(e)
            except Exception as e:               # a bug here must not look like a hang to the client
                count(request, 500)
                self.front.log(f"internal error in {request.url.path}: {type(e).__name__}: {e}")
                return error_response(ApiError(500, f"internal error {type(e).__name__}: {e}"))
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

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    async def cluster(self, request: Request) -> Response:
        """/health and what the engine and the counters add: the web page's one poll."""
        body, status = self.front.health()
        engine = self.front.engine_state()
        return JSONResponse(body | {"engine": engine, "context": self.context} | self.metrics.totals(),
                            status_code=status)

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
        request.state.job = job                  # its errors are counted as its end (_guarded)
        self.front.submit(job)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        try:
            first = await job.events.get()       # headers wait for the first token: errors keep their status
        except BaseException:
            job.cancelled = True
            watcher.cancel()
            self.metrics.ended(job, "cancelled")
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
        except BaseException:
            self.metrics.ended(job, "cancelled")
            raise
        finally:
            watcher.cancel()
        if item[0] == "error":
            raise item[1]
        text, done = "".join(parts), item[1]
        self.metrics.ended(job, done["finish_reason"])
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
                self.metrics.ended(job, outcome_of_status(item[1].status))
                yield sse(item[1].body())
                return
            done = item[1]
            self.metrics.ended(job, done["finish_reason"])
            yield sse(chunk(None, done["finish_reason"]) | {"usage": done["usage"]})
            if include_usage:
                yield sse(chunk(None) | {"choices": [], "usage": done["usage"]})
            yield sse("[DONE]")
        finally:                                 # normal end, or the client has gone
            job.cancelled = True
            watcher.cancel()
            self.metrics.ended(job, "cancelled")     # unless it ended above


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

    def report(self, state: dict) -> None:
        """The engine's state, sent every REPORT_S: the HTTP thread reads it from the engine itself."""

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
        root.session.log(f"serving {cfg.model_id} at http://{host}:{http.port}/v1 on {root.session.comm.size} rank(s); "
                   f"{cfg.max_batch} request(s) at a time, queue of {cfg.queue_size}, prompts "
                   f"{engine.batch.chunk} tokens per step{', API key required' if cfg.api_key else ''}")
        engine.loop(http)
    finally:
        http.stop()                              # lets the failed requests' answers go out first


def serve_channel(root: Root, cfg: ServeConfig, channel) -> None:
    """Rank 0 under a supervisor (supervisor.py, through supervised.py): take requests from `channel`
    until it closes."""
    from .channel import ChannelFront

    engine = Engine(root, cfg)
    front = ChannelFront(channel, engine)
    s = root.session
    channel.send({"ready": {"ranks": s.comm.size, "pids": s.pids, "context": engine.context,
                            "codec": str(s.shard.folder), "allreduce": s.comm.mode, "windows": s.windows}})
    front.start()
    engine.loop(front)
