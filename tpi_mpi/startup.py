"""Bringing a rank up: comm, the prepared shards (located or prepared by rank 0, shipped to the
others), the model at this rank's shard shapes, and its weight window. `Session` is everything one
rank holds for a run; what happens next, step by step, is steps.py's.

Each start-up step is a vote (`on_all_ranks`): a step that fails on one rank fails on every rank
at once, with the failing rank's own message, so no rank is left waiting in a collective.
"""

from __future__ import annotations

import functools
import gc
import os
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from . import cache, hub
from .batch import Batch
from .comm import make_comm
from .budget import plan, pool_floor
from .config import KV_BLOCK, RunConfig, format_size, kv_dtype_name
from .errors import PeerFailed, TpiError
from .draft import NgramDraft
from .kv import BlockPool
from .local_comm import CommStats
from .model import Transformer
from .parallel import kv_bytes
from . import quant_int8
from .ship import ship
from .progress import progress_bar
from .shard_format import COMMON, DTYPES
from .text import TextCodec
from .weights import (EmbeddingTable, Shard, WeightWindow, budget_terms, current_rss, default_budget, dequantized,
                      disk_read_bytes, memory_domain, slot_bytes, widened_vectors)

PATH_BYTES = 4096      # the prepared folder's path, broadcast by rank 0 as raw bytes
# a start-up wait for another rank's long work (rank 0 preparing or shipping, a rank reading its
# shard from a slow disk): patient, but not forever. Under a supervisor a frozen rank is named
# sooner, by its missing heartbeats (heartbeat.py)
START_WAIT_S = 600.0
PREPARE_WAIT_S = 3600.0      # the others wait this long for rank 0 to prepare a model (a 7B on a slow device)


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
        error = PeerFailed(f"rank {bad} failed", [bad])
    error.coordinated = True      # every rank knows: exit quietly, no MPI_Abort needed
    raise error


def use_int8_matmul(cfg: RunConfig) -> bool:
    """Apply --matmul to this process (quant_int8.use_int8, as quant_int8.int8_chosen says)."""
    on = quant_int8.int8_chosen(cfg.matmul, cfg.dtype)
    quant_int8.use_int8(on)
    return on


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM rather than ru_maxrss, which keeps the peak of
    the process that forked us across exec."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_file_mib() -> float:
    """The part of this process's resident memory that is mapped file pages (page cache, reclaimable)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024
    except (OSError, StopIteration):
        return 0.0


class Session:
    """Everything one rank holds for a run: comm, shard, model, weight window; text and embeddings on
    rank 0. Use as a context manager (the window's loader thread stops on exit)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        # serving several sequences at once: each computed as if alone (batch.py), on every rank
        self.batch_invariant = cfg.max_batch > 1
        self.comm = comm = make_comm(cfg.allreduce, cfg.comm_timeout, cfg.hub, cfg.link_model, cfg.allreduce_payload)
        self.rank = comm.rank
        if self.batch_invariant and comm.size > 1 and not comm.allreduce.keep_sum_order():
            self.log(f"--allreduce {cfg.allreduce} adds in an order that follows the message size: an answer may "
                     f"differ in a batch from alone (auto or star keep it the same)")
        self.threads = cfg.threads or max(1, len(os.sched_getaffinity(0)) // comm.ranks_on_this_host())
        torch.set_num_threads(self.threads)
        self.int8 = on_all_ranks(comm, lambda: use_int8_matmul(cfg), timeout=cfg.comm_timeout)
        self.start_wait = max(START_WAIT_S, cfg.comm_timeout)

        self.prepared = self._find_prepared()         # the prepared folder (rank 0's; Root is rank 0's driver)
        # without a shared filesystem a rank gets its shard from rank 0 over MPI
        self.local_root = cache.rank_root(cfg, self.prepared, self.rank)
        ship(comm, self.prepared, self.local_root, progress=self._progress(), log=self.log, wait=self.start_wait)

        self.baseline = current_rss()   # the process before any weights: the budget's start
        # every rank is here, none has loaded weights: measure the free memory. The last rank shipped to
        # comes last, the first waits the others' shipping
        comm.agree(True, self.start_wait)
        self.budget = cfg.memory_budget or default_budget(comm.ranks_on_this_host(memory_domain()))
        # reading a whole shard from a slow disk can take minutes: be patient, but not forever
        on_all_ranks(comm, self._load, timeout=self.start_wait)
        windows = comm.gather_floats(-1 if self.window.depth is None else self.window.depth)
        pinned = comm.gather_floats(self.window.pinned)
        pids = comm.gather_floats(os.getpid())          # so a supervisor can tell which process is which rank
        hosts = comm.gather_names(socket.gethostname())   # serve's page and /cluster show them
        kv_blocks = comm.gather_floats(self.kv_blocks)
        if self.rank == 0:
            # the pool every rank holds (some may hold more); serve's requests are at most what it holds
            self.kv_pool = BlockPool(int(min(kv_blocks)))
            self.context = min(self.context, self.kv_pool.positions)
            if cfg.max_batch > 1:
                self.log(f"KV pool: {self.kv_pool.positions} positions per rank in {self.kv_dtype_name} "
                         f"({format_size(self.kv_pool.positions * self.kv_position_bytes)} on rank 0), shared by up to "
                         f"{cfg.max_batch} requests of up to {self.context} tokens each")
            self.pids = [int(p) for p in pids]
            self.hosts = hosts
            self.windows = ["all" if w < 0 else int(w) for w in windows]
            self.pinned = [int(p) for p in pinned]
            if cfg.window == "auto":
                per_rank = ", ".join(str(w) if w == "all" else f"{w} (+{p} resident)" for w, p in zip(self.windows, self.pinned))
                self.log(f"weight window per rank (blocks in memory): {per_rank} "
                         f"(--memory-budget {format_size(self.budget)}{'' if cfg.memory_budget else ': its share of the free memory'})")
        experts = self.window.experts
        if experts and not experts.resident:
            self.log(f"experts: read when routed, up to {format_size(experts.capacity)} of the most recently used kept "
                     f"in memory (rank 0; all experts: {format_size(sum(experts.sizes.values()))})")
        self.forward_s = 0.0      # time inside the model: compute + communication + weight waits
        self.cpu_at_reset = time.process_time()
        self.disk_at_reset = disk_read_bytes()

    def _find_prepared(self) -> Path:
        """Rank 0 locates (or prepares) the model; every rank learns the folder's path."""
        def locate() -> Path | None:
            if self.rank != 0:
                return None
            if self.cfg.draft not in (None, "ngram"):    # a Hub draft downloads here, where no time limit runs
                hub.resolve(self.cfg.draft, self.log, self.cfg.quiet)
            return cache.locate(self.cfg, self.comm.size, self.log, self._progress())

        root = on_all_ranks(self.comm, locate, timeout=max(PREPARE_WAIT_S, self.cfg.comm_timeout))
        buf = np.zeros(PATH_BYTES, dtype=np.uint8)
        if self.rank == 0:
            raw = str(root).encode()
            buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        self.comm.bcast(buf)
        return Path(bytes(buf).rstrip(b"\0").decode())

    def _load(self) -> None:
        cfg = self.cfg
        self.shard = Shard(self.local_root / f"rank{self.rank}", self.rank, self.comm.size)
        self.model_config, stored = self.shard.model, self.shard.dtype
        # under the kernels, 16-bit float weights stay 16-bit and meet float32 activations (floats.c), as
        # quantized ones do; torch's exact path computes in the stored dtype
        floats = self.int8 and stored in quant_int8.FLOAT_TYPES
        self.dtype = torch.float32 if floats else stored
        self.kv_dtype_name = kv_dtype_name(cfg.kv_dtype, cfg.dtype, self.shard.manifest.dtype)
        self.kv_dtype = DTYPES[self.kv_dtype_name]
        if floats or self.int8 and any(info.get("quant") for info in self.shard.files.values()):
            # the int8 kernels take the cores with threads of their own; torch's OpenMP threads, spinning
            # after each small op, would take them back (attention took 29 ms a call at 7B): torch keeps one
            quant_int8.set_threads(self.threads)
            torch.set_num_threads(1)
        self.context = min(cfg.context, self.model_config.max_seq_len)   # positions per sequence
        # the budget, planned (budget.py): the weights beside the KV pool's floor, then the pool
        budget, terms = self.budget, budget_terms(self.shard, self.baseline)
        self.kv_position_bytes = per_position = kv_bytes(self.model_config, self.shard.shards[self.rank], 1,
                                                         self.kv_dtype.itemsize)
        # quantized blocks that stay in memory are dequantized once if the budget holds them so, for the
        # exact path, or interleaved for the int8 kernels; a window asked for where the budget holds the
        # whole shard keeps the pages in the page cache
        planned = plan(terms, budget, per_position, cfg.kv_pool or pool_floor(self.context, cfg.max_batch),
                       cfg.kv_pool or cfg.max_batch * self.context, cfg.window, not self.int8, self.rank)
        form = (functools.partial(dequantized, dtype=self.dtype) if planned.dequantize
                else widened_vectors if floats else quant_int8.interleaved if self.int8 else None)
        self.kv_blocks = planned.kv_blocks
        # an MoE model's routed experts: kept as the budget allows beside the window (all with --window all)
        capacity = (float("inf") if cfg.window is None or not self.model_config.moe_layers else
                    max(0, budget - planned.weights - self.kv_blocks * KV_BLOCK * per_position))
        self.window = WeightWindow(self.shard, planned.depth, progress=self._progress(), pinned=planned.pinned,
                                   resident_form=form, cached=planned.cached, expert_capacity=capacity)
        self.model = Transformer(self.model_config, self.shard.shards, self.rank, self.comm, self.window, self.dtype,
                                 self.kv_blocks, self.kv_dtype)
        common = self.shard.read(COMMON)[1]
        self.model.load_resident(form(common) if form else common)
        if self.rank == 0:
            self.codec = TextCodec(self.shard.folder)
            self.embed = EmbeddingTable(self.shard)
            self.drafts = self._drafts()
        # what is loaded lives as long as the run: out of the garbage collector's sight, whose full
        # passes over the model's objects took ~12% of a SmolLM2 decode token
        gc.collect()
        gc.freeze()

    def _drafts(self):
        """Rank 0's maker of a sequence's draft for --draft (scheduler.Batcher), or None."""
        cfg = self.cfg
        if cfg.draft is None:
            return None
        if cfg.draft == "ngram":
            return lambda slot: NgramDraft()
        from .draft_model import DraftModel, ModelDraft

        self.draft_model = DraftModel(cfg.draft, cfg, self.codec, self.model_config.vocab_size,
                                      cfg.max_batch * self.context, self.log, self._progress())
        return lambda slot: ModelDraft(self.draft_model, slot)

    def reset_stats(self) -> None:
        self.comm.stats = CommStats()
        self.window.wait_s = self.window.read_s = 0.0
        self.window.bytes_read = 0
        if self.window.experts:
            self.window.experts.routed_bytes = self.window.experts.bytes_read = 0
        self.forward_s = 0.0
        self.cpu_at_reset = time.process_time()
        self.disk_at_reset = disk_read_bytes()

    def forward(self, h: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        t0 = time.perf_counter()
        logits = self.model(h, batch)
        self.forward_s += time.perf_counter() - t0
        return logits

    def _progress(self):
        """A tqdm factory for rank 0's progress bars, or None when quiet."""
        return progress_bar(self.rank != 0 or self.cfg.quiet)

    def gather_stats(self) -> dict[str, list[float]] | None:
        """Every rank's counters since the last reset, as lists on rank 0 (None elsewhere)."""
        mine = {
            "forward_s": self.forward_s,             # inside the model: compute + communication + weight waits
            "comm_s": self.comm.stats.seconds,       # communicating, including waiting for slower peers
            "wait_s": self.window.wait_s,            # waiting for the weight loader
            "sent_bytes": float(self.comm.stats.bytes_sent),
            "read_bytes": float(self.window.bytes_read),                     # blocks the loader read or mapped
            # an MoE model's routed experts, read or kept: what reading only the routed experts needs
            "routed_bytes": float(self.window.experts.routed_bytes if self.window.experts else 0),
            "expert_read_bytes": float(self.window.experts.bytes_read if self.window.experts else 0),
            "disk_read_bytes": float(disk_read_bytes() - self.disk_at_reset),  # of which fetched from storage
            "read_s": self.window.read_s,
            "cpu_s": time.process_time() - self.cpu_at_reset,   # all threads: a waiting rank must not spin
            "peak_rss_mib": peak_rss_mib(),
            "rss_file_mib": rss_file_mib(),          # of the resident set, mapped file pages (page cache)
            "baseline_mib": self.baseline / 2**20,
            "block_mib": slot_bytes(self.shard) / 2**20,
            "resident_mib": self.shard.files[COMMON]["size"] / 2**20,
            # blocks kept in memory beside a streaming window (all of them when resident)
            "pinned_mib": self.window.resident_bytes() / 2**20,
            "kv_mib": self.model.kv_bytes() / 2**20,
        }
        return {k: self.comm.gather_floats(v) for k, v in mine.items()}

    def gather_memory(self) -> tuple[list[float], list[float]] | None:
        """Every rank's resident and peak resident memory in bytes, on rank 0 (None elsewhere)."""
        rss, peak = self.comm.gather_floats(current_rss()), self.comm.gather_floats(peak_rss_mib() * 2**20)
        return None if rss is None else (rss, peak)

    def log(self, msg: str) -> None:
        if self.rank == 0 and not self.cfg.quiet:
            print(f"tpi_mpi: {msg}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.window.close()
        if getattr(self, "draft_model", None):
            self.draft_model.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
