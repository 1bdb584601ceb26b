"""`bench serve`: load a running server with streamed chat completions at several levels of concurrency.

Per level: the same number of requests from that many client threads; wall time, requests per
minute, completion tokens per second (from the servers' usage), p50/p95 latency and time to first
token, and the speedup over one client at a time. `--long-prompt` adds the probe of serve_probe.py.
A client of the HTTP API only: no torch, no MPI, so it also runs against another OpenAI-compatible
server on this machine.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import ConfigError
from .record import append_json, host_fields, print_row
from .serve_client import Reply, Server

BENCH_PROMPT = "Write a short story about a cluster of small computers."

LEVEL_COLUMNS = [("clients", 7, "{}"), ("requests", 8, "{}"), ("ok", 4, "{}"), ("wall_s", 7, "{:.2f}"),
                 ("req_per_min", 11, "{:.1f}"), ("completion_tok_s", 16, "{:.1f}"), ("p50_s", 6, "{:.2f}"),
                 ("p95_s", 6, "{:.2f}"), ("ttft_p50_s", 10, "{:.2f}"), ("ttft_p95_s", 10, "{:.2f}"),
                 ("speedup", 7, "{:.2f}")]


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def run_level(server: Server, body: dict, clients: int, requests: int) -> tuple[float, list[Reply]]:
    """`requests` streamed completions from `clients` threads; the wall time covers them all."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        replies = list(pool.map(lambda _: server.stream(body), range(requests)))
    return time.perf_counter() - t0, replies


def level_record(clients: int, wall_s: float, replies: list[Reply], sequential_wall_s: float | None) -> dict:
    """The figures of one level; `sequential_wall_s` is level 1's wall time for as many requests."""
    ok = [r for r in replies if r.ok]
    failed = [r for r in replies if not r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {"clients": clients, "requests": len(replies), "ok": len(ok), "failed": len(failed),
            "first_error": f"HTTP {failed[0].status}: {failed[0].error}" if failed else None,
            "prompt_tokens": ok[0].prompt_tokens if ok else None, "completion_tokens": tokens,
            "wall_s": wall_s, "req_per_min": 60 * len(ok) / wall_s, "completion_tok_s": tokens / wall_s,
            "p50_s": percentile([r.latency_s for r in ok], 50), "p95_s": percentile([r.latency_s for r in ok], 95),
            "ttft_p50_s": percentile([r.ttft_s for r in ok], 50), "ttft_p95_s": percentile([r.ttft_s for r in ok], 95),
            "speedup": sequential_wall_s / wall_s if sequential_wall_s else None}


def server_fields(server: Server) -> tuple[str, dict]:
    """The model's name (the first the server lists) and what /health says it runs on, for the record."""
    model = server.get("/v1/models")["data"][0]["id"]
    try:
        health = server.get("/health")
    except ConfigError:                      # not every OpenAI-compatible server has /health
        health = {}
    return model, {"model": model, "ranks": health.get("ranks"), "allreduce": health.get("allreduce"),
                   "windows": health.get("windows"), "url": server.base}


def bench_levels(server: Server, base: dict, clients: tuple[int, ...], requests: int, max_tokens: int,
                 prompt: str, out: str | None) -> list[dict]:
    """Every level of concurrency, fewest clients first, after one untimed request (the warm-up)."""
    body = server.chat_body(base["model"], prompt, max_tokens)
    warm = server.stream(body)
    if not warm.ok:
        raise ConfigError(f"{server.base}: the warm-up request failed (HTTP {warm.status}): {warm.error}")
    records, sequential = [], None
    for i, c in enumerate(sorted(set(clients))):
        wall, replies = run_level(server, body, c, requests)
        if c == 1:
            sequential = wall
        record = {"bench": "serve", **base, "max_tokens": max_tokens, "prompt": prompt,
                  **level_record(c, wall, replies, sequential), **host_fields()}
        if record["ok"] and record["completion_tokens"] != record["ok"] * max_tokens:
            print(f"note: {record['completion_tokens']} completion tokens, not {record['ok']} x {max_tokens}: "
                  "the server may not honour ignore_eos", flush=True)
        print_row(LEVEL_COLUMNS, record, header=i == 0)
        append_json(out, record)
        records.append(record)
    if any(r["failed"] for r in records):
        print(f"failed requests: {next(r['first_error'] for r in records if r['failed'])} (first one)", flush=True)
    return records


def bench_serve(url: str = "http://127.0.0.1:8000", requests: int = 16, clients: tuple[int, ...] = (1, 4, 8),
                max_tokens: int = 32, prompt: str = BENCH_PROMPT, api_key: str | None = None,
                out: str | None = None, timeout: float = 600.0, long_prompt: int = 0, probe_delay: float = 0.3,
                probe_repeats: int = 3, probe_tokens: int = 1) -> dict:
    """The load table (unless `clients` is empty) and, with `long_prompt`, the long-prompt probe.
    Returns {"levels": [records], "probe": record or None}."""
    if not 1 <= requests <= 1000:
        raise ConfigError(f"--requests {requests}: use 1 to 1000")
    if any(c < 1 for c in clients):
        raise ConfigError(f"--clients {','.join(map(str, clients))}: each level must be at least 1")
    if max_tokens < 1 or probe_tokens < 1:
        raise ConfigError(f"--max-tokens {max_tokens} --probe-tokens {probe_tokens}: both must be at least 1")
    server = Server(url, api_key, timeout)
    _, base = server_fields(server)
    levels = bench_levels(server, base, clients, requests, max_tokens, prompt, out) if clients else []
    probe = None
    if long_prompt:
        from .serve_probe import bench_probe

        if levels:
            print()
        probe = bench_probe(server, base, long_prompt, probe_delay, probe_repeats, probe_tokens, out)
    return {"levels": levels, "probe": probe}
