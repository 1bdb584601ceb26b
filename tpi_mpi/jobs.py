"""A request as the engine sees it (`Job`) and where its answer goes: to this process's HTTP
handler (`HttpJob`) or, under a supervisor, over the channel (channel.ChannelJob). No torch here:
the supervisor builds jobs too.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .sampling import SamplingConfig

if TYPE_CHECKING:
    import numpy as np


class ApiError(Exception):
    """How a request fails, in HTTP's terms and OpenAI's shape: {"error": {"message", "type", "param",
    "code"}}. The engine ends requests with it too (499, 500, 503), so it lives here, not with the
    HTTP code (openai_api.error_response turns it into a response)."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


@dataclass(eq=False)
class Job:
    """One request as the engine sees it; where its answer goes is a subclass's affair (serve.py: to
    the HTTP handler; channel.py: to the supervisor)."""
    id: str
    prompt_ids: list[int]
    sampling: SamplingConfig
    max_tokens: int
    stops: list[str]
    ignore_eos: bool
    # a request resumed on a new engine: the tokens its client has had already (their text is not resent)
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False      # set by the front when the client has gone
    cached: int = 0              # prompt tokens the slot's KV cache holds already (a chat's earlier turns)
    keep_prompt_logits: bool = False    # every prompt position's logits, not only the last (perplexity, tests)
    rng: np.random.Generator | None = None   # the sampler's generator (a chat's, across turns); None: from the seed

    def send(self, kind: str, value) -> None:
        """Engine -> the request's client: ("text", str), ("done", dict) or ("error", ApiError)."""
        raise NotImplementedError

    def token(self, token: int, text: str) -> None:
        """A new token and the text it completes (empty while a character or a stop string is pending)."""
        if text:
            self.send("text", text)


@dataclass(eq=False)
class HttpJob(Job):
    """A request of this process's HTTP thread: events go into its handler's asyncio queue."""
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    created: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)   # when each new token came (metrics.py's latencies)
    outcome: str | None = None   # how it ended, once counted (metrics.py)

    def token(self, token: int, text: str) -> None:
        self.token_times.append(time.monotonic())
        super().token(token, text)

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:     # the event loop has closed: nobody is listening
            self.cancelled = True
