"""The HTTP side of `bench serve`: streamed chat completions, timed on this client's clock.

Standard library only (urllib), never through a proxy, and only to a server on this machine: the
benchmark loads a server, it must not load someone else's. A stream is server-sent events ending
with `data: [DONE]`; asking `stream_options: {"include_usage": true}` makes the server send its
token counts, so one request gives the time to first token, the latency and the tokens.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from ..errors import ConfigError

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVE_HINT = "start one first (mpirun -n 2 python -m tpi_mpi serve --port PORT) and pass --url http://127.0.0.1:PORT"


@dataclass
class Reply:
    """One streamed completion; times are time.perf_counter() seconds, so replies can be ordered."""
    sent: float
    first_token: float | None = None     # the first chunk with text (or the finish, if none had text)
    done: float | None = None            # data: [DONE]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    status: int = 200
    error: str | None = None
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and self.done is not None

    @property
    def latency_s(self) -> float:
        return self.done - self.sent

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.sent


class Server:
    """A running OpenAI-compatible server on this machine: JSON GETs and streamed chat completions."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600.0) -> None:
        self.base = url.rstrip("/").removesuffix("/v1")
        if urllib.parse.urlsplit(self.base).hostname not in LOOPBACK:
            raise ConfigError(f"{url}: the load benchmark only talks to a server on this machine (127.0.0.1)")
        self.headers = {"Content-Type": "application/json"} | (
            {"Authorization": f"Bearer {api_key}"} if api_key else {})
        self.timeout = timeout
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _open(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers=self.headers,
                                     method="GET" if body is None else "POST")
        return self.opener.open(req, timeout=self.timeout)

    def get(self, path: str) -> dict:
        """A GET whose failure ends the benchmark with one line (no server, wrong key, ...)."""
        try:
            with self._open(path) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise ConfigError(f"{self.base}{path} answered HTTP {e.code}: {error_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ConfigError(f"no server at {self.base} ({reason}): {SERVE_HINT}") from None

    def chat_body(self, model: str, prompt: str, max_tokens: int) -> dict:
        """Greedy and ignore_eos: every request makes exactly max_tokens tokens, so runs compare."""
        return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    def completion_body(self, model: str, prompt: str, max_tokens: int) -> dict:
        """A plain completion (no chat template: any model), greedy and ignore_eos as chat_body."""
        return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}

    def stream(self, body: dict) -> Reply:
        """One streamed chat completion (or completion, for a body with a prompt); a refusal or a broken
        stream is noted in the reply, not raised, so one failed request does not end a load run."""
        reply = Reply(sent=time.perf_counter())
        try:
            with self._open("/v1/completions" if "prompt" in body else "/v1/chat/completions", body) as r:
                read_events(r, reply)
        except urllib.error.HTTPError as e:
            reply.status, reply.error = e.code, error_message(e)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reply.status, reply.error = 0, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        return reply


def read_events(lines, reply: Reply) -> None:
    """Read server-sent events up to `data: [DONE]`, noting the first text and the usage."""
    finished = None
    for raw in lines:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue                         # blank separators, comments, event names
        data = line[len("data:"):].strip()
        now = time.perf_counter()
        if data == "[DONE]":
            reply.done = now
            if reply.first_token is None:    # no chunk had text (e.g. one token that decodes to "")
                reply.first_token = finished or now
            return
        chunk = json.loads(data)
        if "error" in chunk:                 # the status was sent already: OpenAI's in-stream error
            reply.error = str(chunk["error"].get("message", chunk["error"]))
            return
        if chunk.get("usage"):
            reply.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
            reply.completion_tokens = chunk["usage"].get("completion_tokens", 0)
        choices = chunk.get("choices") or []
        text = "".join((c.get("delta") or {}).get("content") or c.get("text") or "" for c in choices)
        reply.text += text
        if reply.first_token is None and text:
            reply.first_token = now
        if finished is None and any(c.get("finish_reason") for c in choices):
            finished = now
    reply.error = "the stream ended before data: [DONE]"


def error_message(e: urllib.error.HTTPError) -> str:
    """OpenAI's error body names the problem; fall back to the HTTP reason."""
    try:
        return json.loads(e.read())["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(e.reason)
