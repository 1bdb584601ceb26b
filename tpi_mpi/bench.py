"""Benchmarks: timed runs that print a table row and append one JSON line per run.

Never imported by tests. `bench generate` runs under mpirun like `generate`; `bench transformers`
runs the same model through transformers in one process (the reference a user would compare
against; transformers is a bench-only import here).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .generate import Root, RunConfig, Session, follow, peak_rss_mib, run_generation
from .sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def link_info(comm) -> dict:
    """The link between the ranks: emulated by tpi_mpi.netem (its TPI_NETEM_* variables), simulated
    by --link-model, or none (the host's own transport)."""
    env = os.environ
    if "TPI_NETEM_RUN" in env:
        return {"kind": "emulated", "delay_ms": float(env.get("TPI_NETEM_DELAY_MS", "nan")),
                "rate_mbit": float(env.get("TPI_NETEM_RATE_MBIT", "nan")),
                "backend": env.get("TPI_NETEM_BACKEND"), "run": env["TPI_NETEM_RUN"]}
    link = getattr(comm, "link", None)
    if link:
        return {"kind": "simulated", "delay_ms": link.delay * 1e3, "rate_mbit": link.rate / 1e6}
    return {"kind": "none"}


def synthetic_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: benchmarks time shapes, not meaning."""
    return np.random.default_rng(seed).integers(10, vocab_size - 10, size=n).tolist()


def append_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def print_row(record: dict, header: bool = True) -> None:
    cols = [("runner", 12, "{}"), ("ranks", 5, "{}"), ("allreduce", 9, "{}"), ("window", 6, "{}"),
            ("threads", 7, "{}"), ("prefill_tok_s", 13, "{:.1f}"), ("ttft_s", 7, "{:.3f}"),
            ("s_per_token", 11, "{:.4f}"), ("compute_ms", 10, "{:.2f}"), ("comm_ms", 8, "{:.2f}"),
            ("wait_ms", 8, "{:.2f}"), ("sent_kB", 8, "{:.1f}"), ("max_rss_MiB", 11, "{:.0f}")]
    if header:
        print(" ".join(name.rjust(w) for name, w, _ in cols))
    cells = []
    for name, w, fmt in cols:
        v = record.get(name)
        cells.append((fmt.format(v) if v is not None else "-").rjust(w))
    print(" ".join(cells), flush=True)


def bench_generate(cfg: RunConfig, prompt_tokens: int, new_tokens: int, warmup: int, out: str | None) -> None:
    """Time prefill and decode on every rank; rank 0 prints the row and writes the JSON line."""
    s = Session(cfg)
    try:
        if s.rank == 0:
            prompt = synthetic_prompt(s.m.vocab_size, prompt_tokens)

            def work(root: Root):
                run_generation(root, prompt[:8], GREEDY, warmup, ignore_eos=True)   # warm-up
                # counters cover the decode steps only; prefill is timed as TTFT
                return run_generation(root, prompt, GREEDY, new_tokens, ignore_eos=True,
                                      after_prefill=root.reset_stats)

            g = Root(s).run(work)
        else:
            follow(s)
        steps = new_tokens - 1     # decode steps counted after prefill
        per_rank = s.gather_stats()
    finally:
        s.close()
    if s.rank != 0:
        return
    comm_ms = 1000 * max(per_rank["comm_s"]) / steps
    wait_ms = 1000 * max(per_rank["wait_s"]) / steps
    record = {
        "runner": "tpi_mpi", "model": cfg.model, "dtype": s.shard.dtype_name, "ranks": s.comm.size,
        "allreduce": s.comm.describe(), "window": s.windows[0], "windows": s.windows,
        "head_on": s.shard.manifest["head_on"], "threads": s.threads,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
        "ttft_s": g.ttft_s, "prefill_tok_s": prompt_tokens / g.ttft_s, "s_per_token": g.s_per_token,
        "tokens_per_s": 1 / g.s_per_token if g.s_per_token else None,
        # rank 0's view of a forward pass, split: communication includes waiting for slower peers
        "compute_ms": 1000 * per_rank["forward_s"][0] / steps - 1000 * per_rank["comm_s"][0] / steps
        - 1000 * per_rank["wait_s"][0] / steps,
        "comm_ms": comm_ms, "wait_ms": wait_ms,
        "sent_kB": max(per_rank["sent_bytes"]) / steps / 1024,
        "read_MB_per_token": max(per_rank["read_bytes"]) / steps / 1e6,
        "cpu_per_wall": [c / (g.s_per_token * steps) for c in per_rank["cpu_s"]],
        "read_hidden": [1 - w / r if r else None for w, r in zip(per_rank["wait_s"], per_rank["read_s"])],
        "per_rank": per_rank, "max_rss_MiB": max(per_rank["peak_rss_mib"]),
        "link": link_info(s.comm), "load_avg": [round(x, 2) for x in os.getloadavg()],
        "host": platform.node(), "cpus": os.cpu_count(), "commit": git_commit(), "time": time.strftime("%FT%T"),
    }
    print_row(record)
    append_json(out, record)


def bench_transformers(model: str, threads: int, prompt_tokens: int, new_tokens: int, warmup: int,
                       dtype: str, out: str | None) -> None:
    """The same measurement with transformers in one process, KV cache on, greedy."""
    try:
        import transformers
    except ImportError:
        raise ConfigError("bench transformers needs transformers: pip install 'tpi_mpi[bench]'") from None
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers renaming its cache argument
    torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    path = Path(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent if kw else path, dtype=torch_dtype, **kw).eval()
    prompt = synthetic_prompt(m.config.vocab_size, prompt_tokens)

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        out = m(torch.tensor([ids]), use_cache=True)
        token = out.logits[0, -1].argmax()
        ttft = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for _ in range(n - 1):
            t = time.perf_counter()
            out = m(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            steps.append(time.perf_counter() - t)
        return ttft, steps

    run(prompt[:8], warmup)
    ttft, steps = run(prompt, new_tokens)
    record = {
        "runner": "transformers", "model": model, "dtype": dtype, "ranks": 1, "threads": threads,
        "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "ttft_s": ttft,
        "prefill_tok_s": prompt_tokens / ttft, "s_per_token": float(np.mean(steps)),
        "tokens_per_s": 1 / float(np.mean(steps)), "max_rss_MiB": peak_rss_mib(),
        "transformers": transformers.__version__, "host": platform.node(), "cpus": os.cpu_count(),
        "commit": git_commit(), "time": time.strftime("%FT%T"),
    }
    print_row(record)
    append_json(out, record)


CGROUP_ROOT = "/sys/fs/cgroup/memory"


def disk_read_bandwidth(folder: Path, limit: int = 2 << 30) -> float:
    """Bytes per second of a cold sequential read of up to `limit` bytes of the model's block
    files (their pages dropped from the cache first)."""
    files = sorted(folder.glob("rank*/layer*.safetensors"))
    chosen, total = [], 0
    for f in files:
        if total >= limit:
            break
        chosen.append(f)
        total += f.stat().st_size
    for f in chosen:
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    t0 = time.perf_counter()
    for f in chosen:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return total / (time.perf_counter() - t0)


def bench_memory(model: str, ranks: int, windows: list[str], cap: int | None, prompt_tokens: int,
                 new_tokens: int, out: str | None) -> None:
    """One `bench generate` run per window size, each rank in a memory cgroup of its own capped at
    `cap` bytes (page cache counts there too, so a streamed run is not served from memory)."""
    bandwidth = disk_read_bandwidth(Path(model))
    print(f"disk, cold sequential read: {bandwidth / 1e9:.2f} GB/s", flush=True)
    groups = [f"{CGROUP_ROOT}/tpi_bench_{r}" for r in range(ranks)] if cap else []
    for g in groups:
        os.makedirs(g, exist_ok=True)
        Path(g, "memory.limit_in_bytes").write_text(str(cap))
    join = ('echo $$ > ' + CGROUP_ROOT + '/tpi_bench_$OMPI_COMM_WORLD_RANK/cgroup.procs && exec "$@"') if cap else 'exec "$@"'
    records = []
    try:
        for w in windows:
            tmp = Path(f"/tmp/tpi-bench-memory-{os.getpid()}.jsonl")
            tmp.unlink(missing_ok=True)
            cmd = ["mpirun", "--oversubscribe", "-n", str(ranks), "sh", "-c", join, "sh", sys.executable, "-m",
                   "tpi_mpi", "bench", "generate", "--model", model, "--window", w, "--allreduce", "star",
                   "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--quiet", "--out", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
            if r.returncode != 0 or not tmp.exists():
                print(f"window {w}: failed ({r.returncode}): {r.stderr.strip().splitlines()[-1:] or ''}", flush=True)
                continue
            rec = json.loads(tmp.read_text().splitlines()[-1])
            tmp.unlink()
            pr = rec["per_rank"]
            depth = ranks and (None if w == "all" else int(w))
            bound = [b + 1.25 * ((depth or 0) + 1) * blk + kv + res if depth else None
                     for b, blk, kv, res in zip(pr["baseline_mib"], pr["block_mib"], pr["kv_mib"], pr["resident_mib"])]
            read_per_token = sum(pr["read_bytes"]) / max(new_tokens - 1, 1)   # every rank reads the same disk here
            rec.update(runner="bench memory", memory_cap=cap, rss_bound_mib=bound, disk_GB_s=bandwidth / 1e9,
                       s_per_token_over_read_time=rec["s_per_token"] / (read_per_token / bandwidth) if read_per_token else None,
                       rss_within_bound=None if depth is None else all(p <= b for p, b in zip(pr["peak_rss_mib"], bound)))
            records.append(rec)
            append_json(out, rec)
    finally:
        for g in groups:
            try:
                os.rmdir(g)
            except OSError:
                pass
    print(f"{'window':>6} {'TTFT s':>7} {'s/token':>8} {'read MB/token':>13} {'hidden':>7} "
          f"{'peak RSS MiB per rank':>28} {'bound MiB (rank 0)':>18} {'s/token / read time':>19}")
    for rec in records:
        hidden = [h for h in rec["read_hidden"] if h is not None]
        hidden_text = f"{100 * min(hidden):.0f}%" if hidden else "-"
        rss_text = ", ".join(f"{x:.0f}" for x in rec["per_rank"]["peak_rss_mib"])
        bound = rec["rss_bound_mib"][0]
        bound_text = f"{bound:.0f}" if bound else "-"
        ratio = rec["s_per_token_over_read_time"]
        print(f"{str(rec['window']):>6} {rec['ttft_s']:7.2f} {rec['s_per_token']:8.3f} {rec['read_MB_per_token']:13.1f} "
              f"{hidden_text:>7} {rss_text:>28} {bound_text:>18} {(f'{ratio:.2f}' if ratio else '-'):>19}")


# -- serve: a load client for a server running on this machine -----------------------------------

BENCH_PROMPT = "Write a short story about a cluster of small computers."
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def bench_serve(url: str = "http://127.0.0.1:8000", requests: int = 16, clients: tuple[int, ...] = (1, 4),
                max_tokens: int = 32, prompt: str = BENCH_PROMPT, api_key: str | None = None,
                out: str | None = None, timeout: float = 600.0) -> list[dict]:
    """`requests` chat completions of `max_tokens` tokens (ignore_eos) at each level of concurrency:
    prints requests per minute and p50/p95 latency, appends one JSON line per level to `out`."""
    import urllib.error
    import urllib.parse
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    base = url.rstrip("/").removesuffix("/v1")
    if urllib.parse.urlsplit(base).hostname not in LOOPBACK:
        raise ConfigError(f"{url}: the load benchmark only talks to a server on this machine (127.0.0.1)")
    if not 1 <= requests <= 1000:
        raise ConfigError(f"--requests {requests}: use 1 to 1000")
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # never through a proxy

    def call(method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(base + path, data=data, headers=headers, method=method)
        with opener.open(req, timeout=timeout) as r:
            return json.loads(r.read())

    model = call("GET", "/v1/models")["data"][0]["id"]
    health = call("GET", "/health")              # what the server runs on, for the record
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}

    def one(_) -> tuple[float, int, int]:
        t0 = time.perf_counter()
        try:
            usage = call("POST", "/v1/chat/completions", body)["usage"]
        except urllib.error.HTTPError as e:
            return time.perf_counter() - t0, 0, e.code
        return time.perf_counter() - t0, usage["completion_tokens"], 200

    one(None)                                    # warm-up, not timed
    records = []
    print(f"{'clients':>7} {'requests':>8} {'ok':>4} {'req_per_min':>11} {'p50_s':>7} {'p95_s':>7} {'tok_s':>7}")
    for c in clients:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=c) as pool:
            results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - t0
        ok = [(lat, n) for lat, n, status in results if status == 200]
        lat = np.array([x for x, _ in ok]) if ok else np.array([np.nan])
        record = {"bench": "serve", "model": model, "ranks": health.get("ranks"),
                  "allreduce": health.get("allreduce"), "windows": health.get("windows"), "clients": c,
                  "requests": requests, "ok": len(ok), "rejected": requests - len(ok), "max_tokens": max_tokens, "prompt": prompt,
                  "wall_s": wall, "req_per_min": 60 * len(ok) / wall,
                  "p50_s": float(np.percentile(lat, 50)), "p95_s": float(np.percentile(lat, 95)),
                  "completion_tok_s": sum(n for _, n in ok) / wall, "url": base, "git_commit": git_commit()}
        print(f"{c:>7} {requests:>8} {len(ok):>4} {record['req_per_min']:>11.1f} {record['p50_s']:>7.2f} "
              f"{record['p95_s']:>7.2f} {record['completion_tok_s']:>7.1f}", flush=True)
        append_json(out, record)
        records.append(record)
    return records
