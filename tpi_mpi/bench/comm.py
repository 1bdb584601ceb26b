"""`bench comm`: ping-pong latency and every allreduce algorithm over a range of message sizes.

Run under mpirun with 2 or more ranks. Everything goes through comm.MpiComm (no mpi4py here), so
the numbers include what the model pays: its polling waits, its float32 sums, `--link-model`.

Per message size and algorithm: warm-up calls, then samples, as many of each algorithm as fit
`budget` seconds per algorithm on average (`min_repeats` at least, `repeats` at most; a median of
8 samples of an 8-rank 2 MiB allreduce, p10-p90 205-344 ms, is not precise to 10%, so
tools/allreduce_edge.sh asks for 20 at least). The samples are taken in rounds of one per
algorithm, in a new random order each round (the same on every rank), each after a barrier:
whatever one algorithm leaves behind (ranks out of step, a link's state) falls on all of them
alike. (Turns of several samples per algorithm, in rotating order, timed auto and its own pick up
to 12% apart, in both directions.)
A sample is a block of back-to-back calls lasting about 0.1 s (one call where one lasts longer).
Blocks of at most 10 calls, as before, made decode samples of 6 ms at 2 ranks and 0 ms, on a host
running two ranks and the link forwarder on 2 cores: their p10-p90 spanned 0.43-0.97 ms around a
median of 0.58, and auto, on recursive doubling, timed 13% slower than recursive doubling. A block
is timed with perf_counter on every rank; its time per call is the mean over ranks of their block
times, over the calls. Timing single calls would charge a call the skew between ranks: a rank done
early waits for its peers inside the next call. The slowest rank's block is no better: ranks take
turns being early (at 2 ranks and 5 ms recursive doubling's two ranks swap every call), so after
the barrier one rank of an odd-length block carries a whole one-way delay more: blocks of 7 calls
timed 13% slower than blocks of 8, and auto (7-call blocks) 11% slower than the recursive doubling
it ran (8). The mean counts each rank's lead once, whatever the block's length; the JSON lines
keep the slowest rank's median (slowest_rank_median_s) beside it. Its one bias: a block of one
call (2 MiB) ends on each rank when that rank has the total, and the star's hub has it one
transfer before the others (2 ranks, 0 ms, 2 MiB: the star at 87 ms by the mean, 116 by the
slowest rank).
The table shows the median over samples, the JSON lines p10 and p90 too. `auto` is timed once it
has settled (tried its contenders on real calls); the calls and seconds that took, its start-up
trial included, are in the JSON lines (settle_calls, settle_s).

Ping-pong: rank 0 and each other rank in turn, one-way = round trip / 2.
Idle CPU: rank 0 computes for `idle_s` seconds while the others wait in an allreduce; their CPU
seconds per wall second (time.process_time, all threads) show whether a waiting rank spins.

Sizes are float32 values written TOKENSxHIDDEN (1x576: one decode token of SmolLM2-135M) or a
number of bytes (8, 1MiB), for ping-pongs.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..allreduce_auto import AutoChoice
from .generate import append_json, git_commit, link_info
from ..comm import MpiComm, make_comm
from ..config import format_size, parse_size
from ..errors import ConfigError
from ..shard_format import MANIFEST, Manifest

# one decode token of SmolLM2-135M (hidden 576) up to a 2048-token prefill of hidden 8192, about x4 a step
DEFAULT_SIZES = "1x576,1x2048,1x8192,8x4096,32x4096,128x4096,512x4096,2048x4096,2048x8192"
ALGORITHMS = ("star", "mpi", "ring", "recdouble", "auto")
BLOCK_S, MAX_BLOCK = 0.1, 1000        # an allreduce sample: back-to-back calls lasting about BLOCK_S


@dataclass(frozen=True, order=True)
class Size:
    elements: int                   # float32 values
    tokens: int | None = None
    hidden: int | None = None

    @property
    def nbytes(self) -> int:
        return 4 * self.elements

    @property
    def label(self) -> str:
        return f"{self.tokens}x{self.hidden}" if self.tokens else format_size(self.nbytes).replace(" ", "")


def parse_sizes(text: str) -> list[Size]:
    sizes = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "x" in item.lower():
            t, h = item.lower().split("x")
            if not (t.isdigit() and h.isdigit() and int(t) > 0 and int(h) > 0):
                raise ConfigError(f"--sizes {item!r}: write TOKENSxHIDDEN, e.g. 1x576")
            sizes.append(Size(int(t) * int(h), int(t), int(h)))
        else:
            nbytes = parse_size(item)
            if nbytes <= 0 or nbytes % 4:
                raise ConfigError(f"--sizes {item!r}: bytes must be a positive multiple of 4 (float32 values)")
            sizes.append(Size(nbytes // 4))
    return sizes


def hidden_size(path: str) -> int:
    """The hidden size of a prepared folder (its manifest), a Hugging Face folder or a .gguf file."""
    p = Path(path)
    if (p / "rank0" / MANIFEST).exists():
        return Manifest.load(p / "rank0").model.dim
    if (p / "config.json").exists():
        return int(json.loads((p / "config.json").read_text())["hidden_size"])
    if p.suffix == ".gguf" and p.exists():
        from ..gguf import config_from_gguf, read_header

        meta, tensors = read_header(p)
        return config_from_gguf(meta, {t.name: t for t in tensors}, str(p)).dim
    raise ConfigError(f"--model {path}: neither a prepared folder (rank0/manifest.json), a folder with "
                      f"config.json nor a .gguf file")


def describe_link(link: dict) -> str:
    if link["kind"] == "none":
        return "no link model (the host's own transport)"
    extra = f", {link['backend']}" if link.get("backend") else ""
    return f"{link['kind']} {link['delay_ms']:g} ms one way, {link['rate_mbit']:g} Mbit/s{extra}"


def percentiles(times: np.ndarray) -> dict:
    p10, median, p90 = np.percentile(times, [10, 50, 90])
    return {"median_s": float(median), "p10_s": float(p10), "p90_s": float(p90), "repeats": int(times.size)}


def busy(seconds: float) -> None:
    """A single-threaded numpy loop standing in for a rank's compute."""
    a = np.random.default_rng(0).random(4096)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        np.sin(a, out=a)


class CommBench:
    """The measurements; every rank calls the same methods in the same order (they communicate)."""

    def __init__(self, comm: MpiComm, repeats: int, min_repeats: int, warmup: int, budget: float,
                 idle_s: float) -> None:
        self.comm, self.rank, self.n = comm, comm.rank, comm.size
        self.repeats, self.warmup, self.budget, self.idle_s = max(repeats, 1), max(warmup, 1), budget, idle_s
        self.min_repeats = min(max(min_repeats, 1), self.repeats)

    # -- agreeing across ranks, with MpiComm's broadcasts only --
    def from_rank0(self, value: float) -> float:
        buf = np.array([value], dtype=np.float64)
        return float(self.comm.bcast(buf, root=0)[0])

    def over_ranks(self, mine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Element-wise mean and maximum over ranks of each rank's timings, on every rank."""
        total, top = np.zeros(mine.shape), np.full(mine.shape, -np.inf)
        for r in range(self.n):
            buf = mine.astype(np.float64) if r == self.rank else np.empty(mine.shape)
            theirs = self.comm.bcast(buf, root=r)
            total += theirs
            np.maximum(top, theirs, out=top)
        return total / self.n, top

    def slowest(self, mine: np.ndarray) -> np.ndarray:
        return self.over_ranks(mine)[1]

    def count(self, sample_s: float) -> int:
        """Samples that fit the budget, from one sample's expected seconds (rank 0 decides)."""
        fit = int(self.budget / max(sample_s, 1e-6))
        return int(self.from_rank0(max(self.min_repeats, min(self.repeats, fit))))

    # -- measurements --
    def pingpong(self, size: Size) -> dict:
        buf = np.zeros(size.elements, dtype=np.float32)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        per_peer, pooled = [], []
        for peer in range(1, self.n):
            partner = peer if self.rank == 0 else 0
            warm = self.comm.pingpong(partner, buf, self.warmup) if self.rank in (0, peer) else []
            reps = self.count(2 * max(warm, default=0.0))
            times = self.comm.pingpong(partner, buf, reps) if self.rank in (0, peer) else []
            self.comm.barrier()             # the ranks left out of this pair wait here
            per_peer.append(float(np.median(times)) if times else None)
            pooled += times
        cpu = self.comm.gather_floats((time.process_time() - cpu0) / (time.perf_counter() - wall0))
        if self.rank != 0:
            return {}
        return {"kind": "pingpong", **percentiles(np.array(pooled)), "per_peer_median_s": per_peer,
                "rank_cpu_per_wall": [round(c, 3) for c in cpu]}

    def allreduce(self, size: Size, algorithms: list[str]) -> dict[str, dict]:
        """Every algorithm on one size, its samples interleaved with the others' in random order."""
        comm = self.comm
        x = torch.zeros(size.elements)      # zeros: repeated in-place sums stay finite
        plan, settle = {}, None
        for a in algorithms:
            comm.mode = a
            first = time.perf_counter()
            for _ in range(self.warmup):    # auto times its candidates on the first call
                t0 = time.perf_counter()
                comm.allreduce(x)
                warm = time.perf_counter() - t0
            if a == "auto":                 # time the pick it settles on; report what settling took
                calls = self.settle_auto(comm.allreduce.auto.choice(size.nbytes), x)
                settle = calls, float(self.slowest(np.array([time.perf_counter() - first]))[0])
            warm = float(self.slowest(np.array([warm]))[0])
            block = int(self.from_rank0(min(MAX_BLOCK, max(1, round(BLOCK_S / max(warm, 1e-6))))))
            plan[a] = block, block * warm
        # the same number of samples of each, so that every sample is taken among samples of all
        # the others (with counts per algorithm, auto, sampled on alone for the last 39 of its 100
        # samples, timed 11% slower than the recursive doubling it ran: 2 ranks, 0 ms, 1x576)
        count = self.count(sum(sample_s for _, sample_s in plan.values()) / len(plan))
        samples: dict[str, list[float]] = {a: [] for a in algorithms}
        order = np.random.default_rng(size.elements)          # the same seed, so the same order, on every rank
        for _ in range(count):
            for j in order.permutation(len(algorithms)):
                a = algorithms[j]
                block = plan[a][0]
                comm.mode = a
                comm.barrier()
                t0 = time.perf_counter()
                for _ in range(block):      # back to back, as the layers of a forward pass call it
                    comm.allreduce(x)
                samples[a].append((time.perf_counter() - t0) / block)
        records = {}
        for a, (block, _) in plan.items():
            times, slowest = self.over_ranks(np.array(samples[a]))
            records[a] = {"kind": "allreduce", "algorithm": a, **percentiles(times), "calls_per_sample": block,
                          "order": "shuffled per round", "over_ranks": "mean",
                          "slowest_rank_median_s": float(np.median(slowest))}
            if a == "auto":
                choice = comm.allreduce.auto.choice(size.nbytes)
                records[a].update(settle_calls=settle[0], settle_s=settle[1], chosen=choice.pick,
                                  trial_pick=choice.first_pick, auto_trials_s=choice.trial,
                                  auto_observed_s=choice.observed, auto_window_calls=choice.window,
                                  auto_windows_s=choice.explored, auto_rematches=choice.rematches,
                                  auto_changes=choice.changes)
        return records

    def settle_auto(self, choice: AutoChoice, x: torch.Tensor) -> int:
        """Calls auto with `x` until `choice`, its pick for x's size, has tried its contenders on real
        calls; returns its calls so far, the trial's excluded. The ranks agree when the match ends,
        at the same call on each, so they stop together."""
        while choice.exploring:
            self.comm.allreduce(x)
        return choice.calls

    def idle_cpu(self, algorithm: str) -> dict:
        """Rank 0 computes, the others wait for it in an allreduce of one decode token."""
        comm = self.comm
        comm.mode = algorithm
        x = torch.zeros(576)
        comm.allreduce(x)                   # warm-up (auto: its trials)
        comm.barrier()
        if self.rank == 0:
            busy(self.idle_s)
            comm.allreduce(x)
            mine = -1.0
        else:
            cpu0, wall0 = time.process_time(), time.perf_counter()
            comm.allreduce(x)
            mine = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
        per_rank = comm.gather_floats(mine)
        if self.rank != 0:
            return {}
        return {"kind": "idle_cpu", "algorithm": algorithm, "busy_s": self.idle_s,
                "idle_cpu_per_wall": max(per_rank[1:]), "per_rank": [round(c, 4) for c in per_rank[1:]]}


# --- the table ----------------------------------------------------------------------------------------

ABBREV = {"recdouble": "recdbl"}


def header(algorithms: list[str], pingpong: bool) -> str:
    cols = [f"{'size':>10} {'bytes':>10} |"]
    if pingpong:
        cols.append(f"{'ping ms':>8} |")
    cols += [f"{ABBREV.get(a, a) + ' ms':>9}" for a in algorithms]
    if "auto" in algorithms:
        cols.append("| auto chose")
    return " ".join(cols)


def row(size: Size, ping: dict | None, results: dict[str, dict]) -> str:
    cells = [f"{size.label:>10} {format_size(size.nbytes):>10} |"]
    if ping is not None:
        cells.append(f"{ping['median_s'] * 1e3:>8.3f} |")
    cells += [f"{results[a]['median_s'] * 1e3:>9.3f}" for a in results]
    if "auto" in results:
        cells.append(f"| {results['auto'].get('chosen')}")
    return " ".join(cells)


# --- the command --------------------------------------------------------------------------------------

def bench_comm(sizes: str | None, model: str | None, prefill_tokens: int, algorithms: str, pingpong_only: bool,
               repeats: int, min_repeats: int, warmup: int, budget: float, idle_seconds: float, hub: int,
               link_model: str | None, comm_timeout: float, threads: int, out: str | None) -> None:
    chosen = [a.strip() for a in algorithms.split(",") if a.strip()]
    bad = [a for a in chosen if a not in ALGORITHMS]
    if bad:
        raise ConfigError(f"--algorithms {','.join(bad)}: choose from {','.join(ALGORITHMS)}")
    todo = parse_sizes(sizes or DEFAULT_SIZES)
    if model:
        h = hidden_size(model)
        todo += [Size(h, 1, h), Size(prefill_tokens * h, prefill_tokens, h)]
    todo = sorted({s.elements: s for s in reversed(todo)}.values())    # one per element count
    torch.set_num_threads(threads)
    comm = make_comm("star", comm_timeout, hub, link_model)
    if not isinstance(comm, MpiComm):
        raise ConfigError("bench comm needs 2 ranks or more: mpirun -n 2 python -m tpi_mpi bench comm")
    b = CommBench(comm, repeats, min_repeats, warmup, budget, idle_seconds)
    netns = comm.gather_floats(float(os.stat("/proc/self/ns/net").st_ino))
    link = link_info(comm)
    base = {"bench": "comm", "ranks": comm.size, "hub": hub, "link": link, "threads": threads,
            "net_namespaces": len(set(netns)) if netns else None, "host": platform.node(),
            "cpus": os.cpu_count(), "commit": git_commit()}

    def emit(record: dict, size: Size | None = None) -> dict:
        if comm.rank == 0 and record:
            if size is not None:
                record = {"tokens": size.tokens, "hidden": size.hidden, "elements": size.elements,
                          "bytes": size.nbytes, **record}
            record = {"kind": record["kind"], **base, **record,
                      "load_avg": [round(x, 2) for x in os.getloadavg()], "time": time.strftime("%FT%T")}
            append_json(out, record)
        return record

    if comm.rank == 0:
        print(f"bench comm: {comm.size} ranks, {describe_link(link)}; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; median ms per call, mean over ranks", flush=True)
    algos = [] if pingpong_only else chosen
    idle = {}
    if idle_seconds > 0:
        idle = {a: emit(b.idle_cpu(a)) for a in algos}
    if comm.rank == 0:
        print(header(algos, True), flush=True)
    for size in todo:
        ping = emit(b.pingpong(size), size)
        results = {a: emit({**r, "idle_cpu_per_wall": idle.get(a, {}).get("idle_cpu_per_wall")}, size)
                   for a, r in (b.allreduce(size, algos) if algos else {}).items()}
        if comm.rank == 0:
            print(row(size, ping, results), flush=True)
    if comm.rank == 0 and idle:
        print(f"idle CPU of a waiting rank while rank 0 computes {idle_seconds:g} s (CPU s per wall s): "
              + ", ".join(f"{a} {r['idle_cpu_per_wall']:.1%}" for a, r in idle.items()), flush=True)
    comm.barrier()
