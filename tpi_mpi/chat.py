"""Interactive multi-turn chat on rank 0 (the other ranks follow as in `generate`).

The KV caches are kept across turns: each turn renders the whole conversation with the chat
template, and only the tokens after the longest prefix already in the cache are prefilled.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Callable, Iterable, TextIO

from .errors import ConfigError
from .generate import run_generation
from .launcher import launched_by_mpi
from .processes import launcher_input_ended
from .steps import Root
from .sampling import SamplingConfig

HELP = "type a message; /reset starts a new conversation, /exit (or end of input) leaves"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Chat:
    def __init__(self, root: Root, sampling: SamplingConfig, max_new_tokens: int, system: str | None) -> None:
        import numpy as np

        self.root, self.sampling, self.max_new_tokens, self.system = root, sampling, max_new_tokens, system
        self.rng = np.random.default_rng(sampling.seed)
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []        # token ids whose keys and values the caches hold

    def turn(self, text: str, out: TextIO) -> str | None:
        """Answer one user message, streaming to `out`; None when the context is full (the KV cache
        the memory budget reserved: --context positions, at most the model's)."""
        codec, limit = self.root.session.codec, self.root.session.context
        messages = self.messages + [{"role": "user", "content": text}]
        ids = codec.encode_chat(messages)
        if len(ids) + 1 >= limit:
            return None
        g = run_generation(self.root, ids, self.sampling, min(self.max_new_tokens, limit - len(ids) - 1),
                           on_text=lambda t: print(t, end="", file=out, flush=True),
                           cached=common_prefix(self.cached, ids), rng=self.rng)
        print(file=out, flush=True)
        # every token but the last sampled one has been through the model
        self.cached = ids + g.generated_ids[:-1]
        self.messages = messages + [{"role": "assistant", "content": g.text}]
        return g.text


def chat_loop(chat: Chat, lines: Iterable[str], out: TextIO = sys.stdout, interactive: bool = False) -> int:
    """Run turns until /exit or the end of input; returns the number of answered turns."""
    answered = 0
    if interactive:
        print(f"tpi_mpi chat: {HELP}", file=sys.stderr)
    for line in _idle_between(chat.root, lines):
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr, flush=True)
            continue
        if text.startswith("/"):
            print(f"unknown command {text}: {HELP}", file=sys.stderr, flush=True)
            continue
        if chat.turn(text, out) is None:
            print(f"(the context of {chat.root.session.context} tokens is full: /reset to start over, or chat again "
                  "with a larger --context)",
                  file=sys.stderr, flush=True)
            continue
        answered += 1
    return answered


def _idle_between(root: Root, lines: Iterable[str]):
    """Before each wait for input, tell the workers that the wait may be long."""
    it = iter(lines)
    while True:
        root.idle()
        try:
            yield next(it)
        except StopIteration:
            return


def read_lines(prompt: str = "> "):
    """Lines from stdin: with a prompt on a terminal, plainly from a pipe; under mpirun, from a pipe
    that ends when mpirun's own input has (Open MPI 5 does not pass that end on)."""
    if sys.stdin.isatty():
        while True:
            try:
                yield input(prompt)
            except EOFError:
                return
    elif not launched_by_mpi():
        yield from sys.stdin
    elif (ended := launcher_input_ended()) is not None:
        yield from read_until(sys.stdin.fileno(), ended)
    else:
        print("tpi_mpi chat: one message a line; under mpirun the end of this input may never reach rank 0: leave "
              "with /exit (or use --input FILE)", file=sys.stderr, flush=True)
        yield from sys.stdin


GRACE = 0.5    # seconds of quiet on our stdin, once the launcher's input has ended, before it counts as ended


def read_until(fd: int, ended: Callable[[], bool], grace: float = GRACE):
    """Lines from file descriptor `fd` until it ends, or `ended()` says its source has and nothing more
    has come for `grace` seconds."""
    pending, quiet_since = b"", None
    while True:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace") + "\n"
            quiet_since = None
        elif ended():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= grace:
                break
    if pending:
        yield pending.decode(errors="replace")


def check_chat_template(root: Root) -> None:
    if not root.session.codec.template:
        raise ConfigError("this model has no chat template: use `generate` instead of `chat`")
