"""`bench serve --distinct N`: N different prompts (plain completions, greedy), each sent alone and then all at once, on a running
server: whether every answer at once equals its solo answer, the wall times, and how many requests
ran and waited at once (from /health, polled). The check that serving many requests from one
shared KV pool changes no answer, on a real model under a real memory cap.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError
from .record import append_json, host_fields, print_row
from .serve_client import Server

PASSAGE = ("Small computers at home can answer questions together when each one holds a slice of every layer "
           "and they add their partial results after each step; the slowest link and the smallest memory set "
           "the pace, so the work is split to fit what each device has and the text never leaves the first one").split()

COLUMNS = [("requests", 8, "{}"), ("prompt_tokens", 13, "{}"), ("max_tokens", 10, "{}"), ("solo_wall_s", 11, "{:.1f}"),
           ("together_wall_s", 15, "{:.1f}"), ("speedup", 7, "{:.2f}"), ("most_running", 12, "{}"),
           ("most_queued", 11, "{}"), ("equal", 5, "{}")]


def distinct_prompts(n: int, words: int) -> list[str]:
    """n prompts of `words` words after "Request i:", each starting somewhere else in the passage."""
    return [f"Request {i}: " + " ".join(PASSAGE[(i * 7 + j) % len(PASSAGE)] for j in range(words)) for i in range(n)]


def words_for(server: Server, model: str, tokens: int) -> int:
    """Words of the passage that make about `tokens` tokens, by the server's count of a 100-word probe
    (tokenizers differ by several times on the same words)."""
    probe = distinct_prompts(1, 100)[0]
    reply = server.stream(server.completion_body(model, probe, 1))
    if not reply.ok:
        raise ConfigError(f"{server.base}: the first request failed (HTTP {reply.status}): {reply.error}")
    return max(1, round(tokens * len(probe.split()) / max(1, reply.prompt_tokens)))


def bench_distinct(server: Server, base: dict, n: int, prompt_tokens: int, max_tokens: int, out: str | None) -> dict:
    words = words_for(server, base["model"], prompt_tokens)
    bodies = [server.completion_body(base["model"], p, max_tokens) for p in distinct_prompts(n, words)]
    t0 = time.perf_counter()
    solo = [server.stream(b) for b in bodies]
    solo_wall = time.perf_counter() - t0
    seen, done = [], threading.Event()

    def poll():
        while not done.is_set():
            h = server.get("/health")
            seen.append((h.get("running") or 0, h.get("queued") or 0))
            time.sleep(0.2)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        together = list(pool.map(server.stream, bodies))
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    failed = [r for r in solo + together if not r.ok]
    record = {"bench": "serve_distinct", **base, "requests": n, "max_tokens": max_tokens,
              "prompt_tokens": solo[0].prompt_tokens, "solo_wall_s": solo_wall, "together_wall_s": wall,
              "speedup": solo_wall / wall, "most_running": max((r for r, _ in seen), default=0),
              "most_queued": max((q for _, q in seen), default=0), "failed": len(failed),
              "first_error": failed[0].error if failed else None,
              "equal": sum(a.ok and b.ok and a.text == b.text for a, b in zip(solo, together)),
              "completion_tokens": [r.completion_tokens for r in together], **host_fields()}
    print_row(COLUMNS, record, header=True)
    if failed:
        print(f"failed requests: {record['first_error']} (first one)", flush=True)
    append_json(out, record)
    return record
