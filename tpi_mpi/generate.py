"""Start-up and the generation loop: where rank 0 and the other ranks differ.

Rank 0 (`Root`) owns the tokenizer, the embedding table, sampling and the text; it sends every
step as a fixed control header plus hidden states. The other ranks (`follow`) only ever receive
headers and float hidden states, run their slice of every layer, and send back partial sums and
their share of the logits.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .comm import ALLREDUCE_MODES, CommStats, make_comm
from .config import ParallelConfig, format_size, normalized_ratio, parse_ratio
from .errors import CommError, ConfigError, TpiError
from .model import Transformer
from .prepare import DTYPES, HEAD_PLACES, cache_key, prepare, source_fingerprint
from .sampling import SamplingConfig, sample
from .ship import ship
from .text import Streamer, TextCodec
from .weights import EmbeddingTable, Shard, WeightWindow, available_memory, block_file, current_rss, plan_window

CMD_FORWARD, CMD_STOP, CMD_RESET_STATS, CMD_IDLE, CMD_ALLREDUCE = 1, 2, 3, 4, 5
HEADER = 4                    # int64 [command, position, n_tokens, all_logits]; CMD_ALLREDUCE: [cmd, mode]
PATH_BYTES = 4096


class PeerFailed(TpiError):
    """Another rank failed during start-up and has reported why."""


def on_all_ranks(comm, fn, timeout: float | None = None):
    """Run a start-up step everywhere; if it failed anywhere, the lowest failing rank raises its own
    error (one message for the whole job) and every other rank raises PeerFailed. `timeout`: how
    long the fastest rank waits for the slowest (None: preparing a model may take any time)."""
    try:
        result, error = fn(), None
    except TpiError as e:
        result, error = None, e
    bad = comm.agree(error is None, timeout)
    if bad < 0:
        return result
    if comm.rank != bad:
        error = PeerFailed(f"rank {bad} failed")
    error.coordinated = True      # every rank knows: exit quietly, no MPI_Abort needed
    raise error


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tpi_mpi"


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM rather than ru_maxrss, which keeps the peak of
    the process that forked us across exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True)
class RunConfig:
    model: str | None = None            # None = the built-in SmolLM2-135M-Instruct
    allreduce: str = "auto"
    hub: int = 0                        # the star allreduce's hub rank
    window: int | None | str = "auto"   # blocks in memory; None = whole shard resident; "auto" = fit memory
    memory_budget: int | None = None    # bytes per rank for "auto" (default: 80% of what is available)
    context: int = 4096                 # tokens of KV cache the budget reserves (capped at the model's)
    cache_dir: str | None = None
    ratio: str | None = None
    dtype: str = "auto"
    head_on: str = "split"
    threads: int = 0               # 0 = cores on this host / ranks on this host
    comm_timeout: float = 60.0
    link_model: str | None = None       # "2ms,300mbit": charge each message that link's time (comm.py)
    quiet: bool = False


def _locate(cfg: RunConfig, world: int, log, progress=None) -> Path:
    """Rank 0: the prepared folder (holding rank0/, rank1/, ...) for `cfg.model`, preparing it into
    the cache on first use. A cache hit reads no tensor and parses no checkpoint."""
    if cfg.model is None:
        from .gguf import builtin_model_path

        path = builtin_model_path()
    else:
        path = Path(cfg.model).expanduser()
    if (path / "rank0" / "manifest.json").exists():
        _check_prepared(path, cfg, world)
        return path
    if (path / "manifest.json").exists():
        raise ConfigError(f"{path} is one rank's folder: give its parent, which holds rank0/, rank1/, ...")
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist: check the path")
    par = ParallelConfig(world, parse_ratio(cfg.ratio))
    if cfg.head_on not in HEAD_PLACES:
        raise ConfigError(f"--head-on {cfg.head_on!r}: use one of {', '.join(HEAD_PLACES)}")
    key = cache_key(source_fingerprint(path), par, cfg.dtype, cfg.head_on)
    out = _cache_dir(cfg, 0) / f"{path.resolve().name}-{key}"
    if not (out / "rank0" / "manifest.json").exists():
        log(f"preparing {path} for {world} rank(s) into {out}")
        prepare(path, out, par, cfg.dtype, cfg.head_on, progress=progress)
    return out


def _cache_dir(cfg: RunConfig, rank: int) -> Path:
    """--cache-dir may hold "{rank}": a cache of its own per rank, as on hosts that share no disk."""
    return Path((cfg.cache_dir or str(default_cache_dir())).format(rank=rank)).expanduser()


def _rank_root(cfg: RunConfig, root: Path, rank: int) -> Path:
    """Where this rank keeps its copy of the prepared model found by rank 0 at `root`."""
    if root.parent == _cache_dir(cfg, 0):
        return _cache_dir(cfg, rank) / root.name
    return root


def _check_prepared(path: Path, cfg: RunConfig, world: int) -> None:
    """A prepared folder given by hand must match this run and still match its source."""
    try:
        mf = json.loads((path / "rank0" / "manifest.json").read_text())
        if mf["world_size"] != world:
            raise ConfigError(f"{path} was prepared for {mf['world_size']} ranks, not {world}: run with "
                              f"-n {mf['world_size']}, or give the original model to prepare it for {world}")
        if cfg.ratio and list(normalized_ratio(ParallelConfig(world, parse_ratio(cfg.ratio)).parts)) != mf["ratio"]:
            raise ConfigError(f"{path} was prepared with ratio {','.join(f'{r:g}' for r in mf['ratio'])}, not "
                              f"{cfg.ratio}: drop --ratio or prepare the model again with it")
        src = Path(mf["source"]["path"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path / 'rank0' / 'manifest.json'} is damaged ({e}): prepare the model again") from None
    if src.exists() and source_fingerprint(src) != mf["source"]["fingerprint"]:
        raise ConfigError(f"{path} was prepared from an older version of {src}: prepare it again")


class Session:
    """Everything one rank holds for a run: comm, shard, model, weight window; text and embeddings on rank 0."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.comm = comm = make_comm(cfg.allreduce, cfg.comm_timeout, cfg.hub, cfg.link_model)
        self.rank = comm.rank
        threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // comm.ranks_on_this_host())
        torch.set_num_threads(threads)
        self.threads = threads

        def locate() -> Path | None:
            return _locate(cfg, comm.size, self.log, self._progress()) if self.rank == 0 else None

        root = on_all_ranks(comm, locate)
        buf = np.zeros(PATH_BYTES, dtype=np.uint8)
        if self.rank == 0:
            raw = str(root).encode()
            buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        comm.bcast(buf)
        self.root = Path(bytes(buf).rstrip(b"\0").decode())
        # without a shared filesystem a rank gets its shard from rank 0 over MPI
        self.local_root = _rank_root(cfg, self.root, self.rank)
        ship(comm, self.root, self.local_root, progress=self._progress(), log=self.log)

        self.baseline = baseline = current_rss()   # the process before any weights: the budget's start

        def load() -> None:
            self.shard = Shard(self.local_root / f"rank{self.rank}", self.rank, comm.size)
            self.m = self.shard.model
            self.dtype = DTYPES[self.shard.dtype_name]
            depth, pinned = self._choose_window(baseline)
            self.window = WeightWindow(self.shard, depth, progress=self._progress(), pinned=pinned)
            self.model = Transformer(self.m, self.shard.shards, self.rank, comm, self.window, self.dtype)
            self.model.load_resident(self.shard.read("common.safetensors")[1])
            if self.rank == 0:
                self.codec = TextCodec(self.shard.folder)
                self.embed = EmbeddingTable(self.shard)

        # reading a whole shard from a slow disk can take minutes: be patient, but not forever
        on_all_ranks(comm, load, timeout=max(600.0, cfg.comm_timeout))
        windows = comm.gather_floats(-1 if self.window.depth is None else self.window.depth)
        pinned = comm.gather_floats(self.window.pinned)
        if self.rank == 0:
            self.windows = ["all" if w < 0 else int(w) for w in windows]
            self.pinned = [int(p) for p in pinned]
            if cfg.window == "auto":
                per_rank = ", ".join(str(w) if w == "all" else f"{w} (+{p} resident)" for w, p in zip(self.windows, self.pinned))
                self.log(f"weight window per rank (blocks in memory): {per_rank} "
                         f"({'--memory-budget ' + format_size(cfg.memory_budget) if cfg.memory_budget else '80% of available memory'})")
        self.forward_s = 0.0      # time inside the model: compute + communication + weight waits
        self.cpu_at_reset = time.process_time()

    def _choose_window(self, baseline: int) -> int | None:
        cfg = self.cfg
        if cfg.window != "auto":
            if cfg.memory_budget:
                raise ConfigError("give --window or --memory-budget, not both")
            return cfg.window, 0
        budget = cfg.memory_budget or int(0.8 * available_memory())
        return plan_window(self.shard, budget, min(cfg.context, self.m.max_seq_len), baseline)

    def reset_stats(self) -> None:
        self.comm.stats = CommStats()
        self.window.wait_s = self.window.read_s = 0.0
        self.window.bytes_read = 0
        self.forward_s = 0.0
        self.cpu_at_reset = time.process_time()

    def forward(self, h: torch.Tensor, pos: int, all_logits: bool) -> torch.Tensor | None:
        t0 = time.perf_counter()
        logits = self.model(h, pos, all_logits)
        self.forward_s += time.perf_counter() - t0
        return logits

    def _progress(self):
        """A tqdm factory for rank 0's progress bars, or None when quiet."""
        if self.rank != 0 or self.cfg.quiet:
            return None
        from tqdm import tqdm

        return lambda **kw: tqdm(file=sys.stderr, **kw)

    def gather_stats(self) -> dict[str, list[float]] | None:
        """Every rank's counters since the last reset, as lists on rank 0 (None elsewhere)."""
        mine = {
            "forward_s": self.forward_s,             # inside the model: compute + communication + weight waits
            "comm_s": self.comm.stats.seconds,       # communicating, including waiting for slower peers
            "wait_s": self.window.wait_s,            # waiting for the weight loader
            "sent_bytes": float(self.comm.stats.bytes_sent),
            "read_bytes": float(self.window.bytes_read),
            "read_s": self.window.read_s,
            "cpu_s": time.process_time() - self.cpu_at_reset,   # all threads: a waiting rank must not spin
            "peak_rss_mib": peak_rss_mib(),
            "baseline_mib": self.baseline / 2**20,
            "block_mib": self.shard.block_bytes() / 2**20,
            "resident_mib": self.shard.files["common.safetensors"]["size"] / 2**20,
            # blocks kept in memory beside a streaming window (all of them when resident)
            "pinned_mib": sum(self.shard.files[block_file(i, k)]["size"] for i, k in self.window.resident) / 2**20,
            "kv_mib": sum(layer.attn.cache.k.nbytes * 2 for layer in self.model.layers
                          if layer.attn.cache.k is not None) / 2**20,
        }
        return {k: self.comm.gather_floats(v) for k, v in mine.items()}

    def log(self, msg: str) -> None:
        if self.rank == 0 and not self.cfg.quiet:
            print(f"tpi_mpi: {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.window.close()


class Root:
    """Rank 0's side of a step: embed, send the header and hidden states, run its own slice."""

    def __init__(self, s: Session) -> None:
        self.s = s
        self.header = np.zeros(HEADER, dtype=np.int64)

    def forward(self, ids: list[int], pos: int, all_logits: bool = False) -> torch.Tensor:
        s = self.s
        self.header[:] = (CMD_FORWARD, pos, len(ids), int(all_logits))
        s.comm.bcast(self.header)
        h = s.embed[ids]                                                     # (T, dim)
        s.comm.bcast(h.view(torch.uint8).numpy())
        return s.forward(h, pos, all_logits)

    def reset_stats(self) -> None:
        """Zero the timing counters on every rank (benchmarks call this after warm-up)."""
        self.header[:] = (CMD_RESET_STATS, 0, 0, 0)
        self.s.comm.bcast(self.header)
        self.s.reset_stats()

    def set_allreduce(self, mode: str) -> None:
        """Switch every rank to another allreduce algorithm (benchmarks compare them in one job)."""
        self.header[:] = (CMD_ALLREDUCE, ALLREDUCE_MODES.index(mode), 0, 0)
        self.s.comm.bcast(self.header)
        self.s.comm.mode = mode

    def idle(self) -> None:
        """Tell the workers the next step may be long in coming (rank 0 waits for a person or a
        client): they wait for it without a time limit. Otherwise a silent rank 0 is an error."""
        self.header[:] = (CMD_IDLE, 0, 0, 0)
        self.s.comm.bcast(self.header)

    def stop(self, failed: bool = False) -> None:
        """Release the workers; `failed` makes them exit non-zero too (rank 0 reports the error)."""
        self.header[:] = (CMD_STOP, int(failed), 0, 0)
        self.s.comm.bcast(self.header)

    def run(self, work):
        """Run `work(self)` on rank 0, then stop the workers, failed or not."""
        try:
            result = work(self)
        except CommError:
            raise                 # a peer is gone: nobody to tell; the entry point aborts the job
        except BaseException as e:
            self.stop(failed=True)
            e.coordinated = True
            raise
        self.stop()
        return result


def follow(s: Session) -> None:
    """A worker's whole life: obey rank 0's headers until told to stop."""
    header = np.zeros(HEADER, dtype=np.int64)
    patient = True                               # before the first step rank 0 may be tokenizing a long prompt
    while True:
        s.comm.bcast(header, timeout=None if patient else True)
        cmd, pos, T, all_logits = (int(x) for x in header)
        patient = cmd == CMD_IDLE
        if patient:
            continue
        if cmd == CMD_STOP:
            if pos:
                e = PeerFailed("rank 0 failed")
                e.coordinated = True
                raise e
            return
        if cmd == CMD_RESET_STATS:
            s.reset_stats()
            continue
        if cmd == CMD_ALLREDUCE:
            s.comm.mode = ALLREDUCE_MODES[pos]
            continue
        h = torch.empty(T, s.m.dim, dtype=s.dtype)
        s.comm.bcast(h.view(torch.uint8).numpy())
        s.forward(h, pos, bool(all_logits))


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    first_logits: np.ndarray | None = None     # (vocab,) the first new token is sampled from
    prompt_logits: np.ndarray | None = None    # (prompt_len, vocab) when asked for

    @property
    def s_per_token(self) -> float:
        return float(np.mean(self.step_s)) if self.step_s else 0.0


def run_generation(root: Root, prompt_ids: list[int], sampling: SamplingConfig, max_new_tokens: int,
                   ignore_eos: bool = False, on_text=None, keep_prompt_logits: bool = False,
                   after_prefill=None, cached: int = 0, rng: np.random.Generator | None = None,
                   should_stop=None) -> Generation:
    """Prefill the prompt in one pass, then decode token by token (rank 0).

    `cached`: how many leading prompt tokens the KV caches already hold (a chat's earlier turns);
    only the rest is prefilled. `on_text(delta)` receives the text as it grows; `should_stop(text)`
    is asked after every token (a stop string, a client gone) and ends the generation when true.
    """
    s = root.s
    m = s.m
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give some text with --prompt")
    if len(prompt_ids) >= m.max_seq_len:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the model's context is {m.max_seq_len}: shorten it")
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    rng = rng or np.random.default_rng(sampling.seed)
    eos = set(m.eos_ids) | s.codec.stop_ids()
    streamer = Streamer(s.codec)
    g = Generation(list(prompt_ids))
    start = 0 if keep_prompt_logits else min(cached, len(prompt_ids) - 1)
    t0 = time.perf_counter()
    logits = root.forward(g.prompt_ids[start:], start, all_logits=keep_prompt_logits)
    g.first_logits = logits[-1].numpy().copy()
    if keep_prompt_logits:
        g.prompt_logits = logits.numpy().copy()
    token = sample(g.first_logits, sampling, rng)
    g.ttft_s = time.perf_counter() - t0
    if after_prefill:
        after_prefill()
    pos = len(g.prompt_ids)
    while True:
        g.generated_ids.append(token)
        delta = streamer.push(token)
        if on_text and delta:
            on_text(delta)
        done = (token in eos and not ignore_eos) or len(g.generated_ids) >= max_new_tokens \
            or pos + 1 >= m.max_seq_len or (should_stop is not None and should_stop(streamer.shown))
        if done:
            break
        t = time.perf_counter()
        logits = root.forward([token], pos)
        token = sample(logits[-1].numpy(), sampling, rng)
        g.step_s.append(time.perf_counter() - t)
        pos += 1
    rest = streamer.finish()
    if on_text and rest:
        on_text(rest)
    g.text = streamer.shown
    return g
