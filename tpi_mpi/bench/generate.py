"""Benchmarks: timed runs that print a table row and append one JSON line per run.

Never imported by tests. `bench generate` runs under mpirun like `generate`. The memory benchmark and
the transformers reference are in bench/memory.py; `bench serve`, a client of a running server, in bench/serve.py.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import ConfigError
from ..config import RunConfig
from ..generate import run_batch, run_generation
from ..startup import Session
from ..steps import Root, run_steps
from ..sampling import SamplingConfig
from .record import append_json, git_commit, host_fields, print_row  # noqa: F401  (memory, comm, quant, quality import them from here)

GREEDY = SamplingConfig(temperature=0.0)


def link_info(comm) -> dict:
    """The link between the ranks: emulated by tpi_mpi.netem (its TPI_NETEM_* variables), simulated
    by --link-model, or none (the host's own transport)."""
    env = os.environ
    if "TPI_NETEM_RUN" in env:
        return {"kind": "emulated", "delay_ms": float(env.get("TPI_NETEM_DELAY_MS", "nan")),
                "rate_mbit": float(env.get("TPI_NETEM_RATE_MBIT", "nan")),
                "backend": env.get("TPI_NETEM_BACKEND"), "run": env["TPI_NETEM_RUN"]}
    link = comm.link
    if link:
        return {"kind": "simulated", "delay_ms": link.delay * 1e3, "rate_mbit": link.rate / 1e6}
    return {"kind": "none"}


def synthetic_prompt(vocab_size: int, n: int, seed: int = 0) -> list[int]:
    """A fixed pseudo-random prompt: benchmarks time shapes, not meaning."""
    return np.random.default_rng(seed).integers(10, vocab_size - 10, size=n).tolist()


GENERATE_COLUMNS = [("runner", 12, "{}"), ("ranks", 5, "{}"), ("allreduce", 9, "{}"), ("window", 6, "{}"),
                    ("threads", 7, "{}"), ("prefill_tok_s", 13, "{:.1f}"), ("ttft_s", 7, "{:.3f}"),
                    ("s_per_token", 11, "{:.4f}"), ("compute_ms", 10, "{:.2f}"), ("comm_ms", 8, "{:.2f}"),
                    ("wait_ms", 8, "{:.2f}"), ("sent_kB", 8, "{:.1f}"), ("max_rss_MiB", 11, "{:.0f}")]
BATCH_COLUMNS = [("batch", 5, "{}"), ("ranks", 5, "{}"), ("window", 6, "{}"), ("prefill_s", 9, "{:.2f}"),
                 ("s_per_step", 10, "{:.4f}"), ("tokens_per_s", 12, "{:.1f}"), ("speedup", 7, "{:.2f}"),
                 ("compute_ms", 10, "{:.1f}"), ("comm_ms", 8, "{:.1f}"), ("wait_ms", 8, "{:.1f}"),
                 ("disk_MB_per_step", 16, "{:.1f}"), ("max_rss_MiB", 11, "{:.0f}")]


def bench_generate(cfg: RunConfig, prompt_tokens: int, new_tokens: int, warmup: int, out: str | None) -> None:
    """Time prefill and decode on every rank; rank 0 prints the row and writes the JSON line."""
    def work(root: Root):
        prompt = synthetic_prompt(root.session.model_config.vocab_size, prompt_tokens)
        run_generation(root, prompt[:8], GREEDY, warmup, ignore_eos=True)   # warm-up
        # counters cover the decode steps only; prefill is timed as TTFT
        return run_generation(root, prompt, GREEDY, new_tokens, ignore_eos=True, after_prefill=root.reset_stats)

    with Session(cfg) as s:
        g = run_steps(s, work)
        per_rank = s.gather_stats()
    steps = new_tokens - 1     # decode steps counted after prefill
    if s.rank != 0:
        return
    record = {
        **run_fields(s, cfg, prompt_tokens, new_tokens), "allreduce": s.comm.describe(),
        "ttft_s": g.ttft_s, "prefill_tok_s": prompt_tokens / g.ttft_s, "s_per_token": g.s_per_token,
        "tokens_per_s": g.tokens_per_s or None, **step_ms(per_rank, steps),
        "sent_kB": max(per_rank["sent_bytes"]) / steps / 1024,
        "read_MB_per_token": max(per_rank["read_bytes"]) / steps / 1e6,           # blocks read or mapped
        "disk_MB_per_token": max(per_rank["disk_read_bytes"]) / steps / 1e6,      # fetched from storage
        "routed_MB_per_token": max(per_rank["routed_bytes"]) / steps / 1e6,       # MoE: the routed experts' bytes
        # MoE: the blocks read that are no expert (attention, routers) beside them
        "dense_read_MB_per_token": max(r - e for r, e in zip(per_rank["read_bytes"], per_rank["expert_read_bytes"]))
        / steps / 1e6,
        "cpu_per_wall": [c / (g.s_per_token * steps) for c in per_rank["cpu_s"]],
        "read_hidden": [1 - w / r if r else None for w, r in zip(per_rank["wait_s"], per_rank["read_s"])],
        "per_rank": per_rank, "max_rss_MiB": max(per_rank["peak_rss_mib"]),
    }
    print_row(GENERATE_COLUMNS, record)
    append_json(out, record)


def step_ms(per_rank: dict, steps: int) -> dict[str, float]:
    """Rank 0's forward pass per step split into compute, communication (including waiting for slower
    peers) and waiting for weights; communication and waits as the slowest rank had them."""
    return {"compute_ms": 1000 * (per_rank["forward_s"][0] - per_rank["comm_s"][0] - per_rank["wait_s"][0]) / steps,
            "comm_ms": 1000 * max(per_rank["comm_s"]) / steps, "wait_ms": 1000 * max(per_rank["wait_s"]) / steps}


def bench_batch(cfg: RunConfig, sizes: list[int], prompt_tokens: int, new_tokens: int, warmup: int,
                out: str | None) -> None:
    """Decode tokens/s against the batch size: B prompts prefilled together, then steps of B tokens."""
    prompts = []

    def warm_up(root: Root) -> None:
        prompts.extend(synthetic_prompt(root.session.model_config.vocab_size, prompt_tokens, seed=i) for i in range(max(sizes)))
        run_batch(root, [p[:8] for p in prompts], warmup)                   # every slot once

    runs = []
    with Session(cfg) as s:
        run_steps(s, warm_up)
        for b in sizes:             # a job of steps per size: the counters are gathered from every rank between
            run = run_steps(s, lambda root: run_batch(root, prompts[:b], new_tokens, after_prefill=root.reset_stats))
            runs.append((b, run, s.gather_stats()))
    if s.rank != 0:
        return
    base = None
    for i, (b, run, per_rank) in enumerate(runs):
        steps = len(run.step_s)
        step_s = float(np.mean(run.step_s))
        base = base or b / step_s
        record = {**run_fields(s, cfg, prompt_tokens, new_tokens), "allreduce": s.comm.describe(), "batch": b,
                  "prefill_s": run.prefill_s, "s_per_step": step_s, "tokens_per_s": b / step_s,
                  "speedup": b / step_s / base, **step_ms(per_rank, steps),
                  "disk_MB_per_step": max(per_rank["disk_read_bytes"]) / steps / 1e6,
                  "max_rss_MiB": max(per_rank["peak_rss_mib"]), "per_rank": per_rank}
        print_row(BATCH_COLUMNS, record, header=i == 0)
        append_json(out, record)


def run_fields(s: Session, cfg: RunConfig, prompt_tokens: int, new_tokens: int) -> dict:
    """What a `bench generate` JSON line says of its run: model, layout, link, host, commit."""
    return {"runner": "tpi_mpi", "model": cfg.model, "dtype": s.shard.manifest.dtype, "quant": s.shard.manifest.quant,
            "cached": s.window.cached, "ranks": s.comm.size,
            "window": s.windows[0], "windows": s.windows, "resident_blocks": s.pinned,
            "head_on": s.shard.manifest.head_on, "threads": s.threads,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "link": link_info(s.comm),
            "allreduce_payload": cfg.allreduce_payload,
            **host_fields()}


def compare_allreduce(cfg: RunConfig, algorithms: list[str], rounds: int, prompt_tokens: int, new_tokens: int,
                      warmup: int, out: str | None) -> None:
    """End-to-end s/token of several allreduce algorithms in one job: `rounds` rounds of one
    generation per algorithm, in a new random order each round; each algorithm's figure is its
    median round. One job per algorithm, run one after another, met the host's drift instead: on
    2 cores running 4 ranks and the link emulator, rank 0's compute per token ranged over 52-86 ms
    for the same model and algorithm between runs minutes apart, more than the algorithms differ.
    auto keeps what it learnt from round to round, as it would over a long chat; its first round
    (its trial and match, after the warm-up) is in the JSON line (first_round_s_per_token)."""
    def work(root: Root) -> dict[str, list[dict]]:
        prompt = synthetic_prompt(root.session.model_config.vocab_size, prompt_tokens)
        order = np.random.default_rng(0)
        for a in algorithms:            # warm-up: connections and buffers of every algorithm
            root.set_allreduce(a)
            run_generation(root, prompt[:8], GREEDY, warmup, ignore_eos=True)
        runs: dict[str, list[dict]] = {a: [] for a in algorithms}
        for _ in range(rounds):
            for j in order.permutation(len(algorithms)):
                root.set_allreduce(algorithms[j])
                g = run_generation(root, prompt, GREEDY, new_tokens, ignore_eos=True, after_prefill=root.reset_stats)
                runs[algorithms[j]].append(rank0_figures(root.session, g))
        return runs

    with Session(cfg) as s:
        if s.comm.size < 2:
            raise ConfigError("--compare needs 2 ranks or more: run under mpirun -n 2 (or more)")
        runs = run_steps(s, work)
    if s.rank != 0:
        return
    base = {**run_fields(s, cfg, prompt_tokens, new_tokens), "compared": algorithms, "rounds": rounds,
            "order": "shuffled per round", "counters": "rank 0"}
    records = {}
    for i, (a, rs) in enumerate(runs.items()):
        s.comm.mode = a                           # for describe(): auto's picks per message size
        med = {k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        records[a] = {**base, "allreduce": s.comm.describe(), **med,
                      "prefill_tok_s": prompt_tokens / med["ttft_s"], "tokens_per_s": 1 / med["s_per_token"],
                      **{f"round_{k}": [r[k] for r in rs] for k in rs[0]},
                      "first_round_s_per_token": rs[0]["s_per_token"]}
        print_row(GENERATE_COLUMNS, records[a], header=i == 0)
        append_json(out, records[a])
    fixed = {a: r["s_per_token"] for a, r in records.items() if a != "auto"}
    if "auto" in records and fixed:
        best = min(fixed, key=fixed.get)
        print(f"auto / best fixed ({best}): {records['auto']['s_per_token'] / fixed[best]:.2f} "
              f"(medians of {rounds} rounds of {new_tokens} tokens)", flush=True)


def rank0_figures(s: Session, g) -> dict[str, float]:
    """One generation's decode, as rank 0 saw it (its counters were reset after the prefill)."""
    steps = len(g.step_s)
    return {"s_per_token": g.s_per_token, "ttft_s": g.ttft_s,
            "compute_ms": 1000 * (s.forward_s - s.comm.stats.seconds - s.window.wait_s) / steps,
            "comm_ms": 1000 * s.comm.stats.seconds / steps}
