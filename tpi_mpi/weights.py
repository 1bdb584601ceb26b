"""One rank's prepared shard on disk, and the sliding window that streams its blocks.

`Shard` reads and checks a rank's manifest. `WeightWindow` hands the model one block (layer i's
attention or MLP) at a time, in execution order: with `depth=None` every block is read once and
stays resident; with `depth=W` a background thread keeps at most W blocks in memory, reading the
next ones into reused buffers while the current ones compute and communicate. The loader thread
does file I/O only, never MPI; its errors travel through the queue to the main thread.
"""

from __future__ import annotations

import os
import queue
import zlib
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .errors import ShardError
from .budget import Terms
from .parallel import bind, unbind
from .quant import QuantWeight
from .shard_format import (COMMON, EMBED, KINDS, MANIFEST, Manifest, block_file, file_sha256, map_safetensors,
                           quant_weight, read_safetensors)


class Shard:
    """A rank's folder of a prepared model, checked against the run it is used for."""

    def __init__(self, folder: str | Path, rank: int, world: int) -> None:
        self.folder = Path(folder)
        self.manifest = mf = Manifest.load(self.folder)
        if mf.world_size != world:
            raise ShardError(f"{self.folder.parent} was prepared for {mf.world_size} ranks, not {world}: "
                             f"run with -n {mf.world_size} or prepare it again with --world-size {world}")
        if mf.rank != rank:
            raise ShardError(f"{self.folder / MANIFEST} belongs to rank {mf.rank}, not rank {rank}")
        self.rank, self.world = rank, world
        self.model = mf.model
        self.shards = list(mf.shards)
        self.dtype = mf.torch_dtype
        self.files: dict[str, dict] = mf.files
        for name, info in self.files.items():
            p = self.path(name)
            if not p.exists():
                raise ShardError(f"{p} is missing: prepare the model again")
            if p.stat().st_size != info["size"]:
                raise ShardError(f"{p} has {p.stat().st_size} bytes, its manifest says {info['size']}: "
                                 f"the file is truncated or replaced; prepare the model again")

    def path(self, name: str) -> Path:
        p = (self.folder / name).resolve()
        if p.parent != self.folder.resolve():
            raise ShardError(f"{self.folder / MANIFEST} names {name!r}, outside its folder: refusing to read it")
        return p

    def read(self, name: str, buf: Tensor | None = None, verify: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        if name not in self.files:
            raise ShardError(f"{self.folder / MANIFEST} lists no {name}: prepare the model again")
        info = self.files[name]
        return read_safetensors(self.path(name), buf, info["sha256"] if verify else None, info.get("quant"),
                                info.get("packed", ()))

    def map(self, name: str, verify: bool = True) -> dict:
        """A file's tensors as views of its pages in the page cache (see map_safetensors)."""
        info = self.files[name]
        return map_safetensors(self.path(name), info["sha256"] if verify else None, info.get("quant"),
                               info.get("packed", ()))

    def block_bytes(self) -> int:
        return max(self.files[name]["size"] for name in self.manifest.block_files())


class EmbeddingTable:
    """Rank 0's embedding rows, read from disk as tokens need them: a prompt touches a few rows
    of a table that can hold hundreds of MB, so the table is never loaded whole."""

    def __init__(self, shard: Shard) -> None:
        from safetensors import safe_open

        path = shard.path(EMBED)
        info = shard.files[EMBED]
        if file_sha256(path, drop_cache=True) != info["sha256"]:
            raise ShardError(f"{path} does not match its manifest checksum: the file is corrupt; prepare the model again")
        self._file = safe_open(path, framework="pt")
        self._rows = self._file.get_slice("embed.weight")
        self._qtype = info.get("quant", {}).get("embed.weight")     # rows of GGML blocks, dequantized by id
        self.dtype = shard.dtype

    def __getitem__(self, ids: list[int]) -> Tensor:
        rows = torch.cat([self._rows[i:i + 1] for i in ids])                   # (T, dim) or (T, bytes per row)
        if self._qtype is None:
            return rows
        return quant_weight(rows, self._qtype).dequantize(self.dtype)


def dequantized(tensors: dict, dtype: torch.dtype) -> dict[str, Tensor]:
    """A block's tensors with every quantized matrix dequantized to `dtype` (done once, for blocks
    that stay in memory, when the budget holds them so)."""
    return {n: t.dequantize(dtype) if isinstance(t, QuantWeight) else t for n, t in tensors.items()}


def widened_vectors(tensors: dict) -> dict[str, Tensor]:
    """A block's vectors (norm weights, biases) in float32 and its matrices as they are: for 16-bit
    float weights under the kernels, whose activations are float32 (done once, for blocks kept in
    memory; a streamed block's vectors are widened by the ops that use them)."""
    return {n: t.float() if isinstance(t, Tensor) and t.dim() == 1 else t for n, t in tensors.items()}


class WeightWindow:
    """Blocks in execution order: resident (depth None) or streamed with at most `depth` in memory;
    with `pinned`, the first `pinned` blocks stay resident and only the others stream. `resident_form`
    turns a block kept in memory into the form it is computed in, once, at load (dequantized for
    the exact path, interleaved for the int8 kernels).

    Streamed blocks are read into `depth` reused buffers and their pages dropped from the page
    cache, so that the window is all the memory they take: the right thing when memory is short.
    With `cached` (the memory budget holds the whole shard in the page cache), the loader maps each
    block instead, once, in the first pass, and the block stays mapped and bound to its module like a
    resident one: a token then reads nothing from disk, copies nothing, faults no page in again and
    hands nothing between threads (unmapping a block after use and mapping it anew the next token made
    a token 2.6x as slow as resident; handing the kept mappings over from the loader thread, 1.8x).
    Their pages stay the page cache's, which the kernel may take back under memory pressure."""

    def __init__(self, shard: Shard, depth: int | None = None, progress=None, pinned: int = 0,
                 resident_form=None, cached: bool = False, expert_capacity: float = float("inf")) -> None:
        if depth is not None and depth < 1:
            raise ShardError(f"--window {depth}: the window must hold at least 1 block (or 'all')")
        self.shard, self.depth = shard, depth
        self.experts = None
        self.order = [(i, k) for i in range(shard.model.n_layers) for k in KINDS]
        self.wait_s = 0.0          # main thread blocked on the loader
        self.read_s = 0.0          # loader thread reading (and, on the first pass, hashing)
        self.bytes_read = 0
        self.resident: dict[tuple[int, str], dict[str, Tensor]] = {}   # blocks kept in memory
        self._bound: dict[tuple[int, str], object] = {}                 # the module each is bound to
        self._kept: dict[tuple[int, str], dict[str, Tensor]] = {}       # cached: blocks mapped for good
        if depth is None or pinned + depth >= len(self.order):
            self.depth, pinned = None, len(self.order)
        self.pinned = pinned
        self.cached = cached and self.depth is not None
        bar = progress(total=pinned, desc="load", unit="block") if progress and pinned else None
        for i, k in self.order[:pinned]:
            tensors = shard.read(block_file(i, k))[1]
            self.resident[(i, k)] = resident_form(tensors) if resident_form else tensors
            self.bytes_read += shard.files[block_file(i, k)]["size"]
            bar and bar.update()
        bar and bar.close()
        if shard.model.moe_layers:     # an MoE model's experts: read when routed, kept as the budget allows
            from .experts import ExpertStore
            self.experts = ExpertStore(shard, expert_capacity, self, cached, progress)
        if self.depth is None:
            return
        self.streamed = self.order[pinned:]
        self._verified: set[str] = set()     # checksums are checked on the first pass only
        self._mapped: dict[str, dict] = {}    # cached: each block's mapping, made once
        size = shard.block_bytes()
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth):               # a mapped window's slots hold no buffer of their own
            self._free.put(torch.empty(0 if self.cached else size, dtype=torch.uint8))
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loader, name="weight-loader", daemon=True)
        self._thread.start()

    def _loader(self) -> None:
        step = 0
        while True:
            buf = self._free.get()                   # blocks while the window is full
            if buf is None or self._stop.is_set() or self.cached and step == len(self.streamed):
                return                               # (cached: one pass maps every block for good)
            layer, kind = self.streamed[step % len(self.streamed)]
            name = block_file(layer, kind)
            try:
                t0 = time.perf_counter()
                verify = name not in self._verified
                if not self.cached:
                    tensors = self.shard.read(name, buf, verify)[1]
                else:
                    if name not in self._mapped:
                        self._mapped[name] = self.shard.map(name, verify)
                    tensors = self._mapped[name]
                self.read_s += time.perf_counter() - t0
                self._verified.add(name)
                self.bytes_read += self.shard.files[name]["size"]
                self._ready.put((layer, kind, buf, tensors))
            except Exception as e:                   # raised on the main thread, layer named
                self._ready.put(ShardError(f"reading layer {layer} {kind} for rank {self.shard.rank}: {e}"))
                return
            step += 1

    @contextmanager
    def use(self, layer: int, kind: str, module):
        """Bind block (layer, kind) to `module` for the duration of the `with`."""
        held = self.resident.get((layer, kind))
        if held is None:
            held = self._kept.get((layer, kind))
        if held is not None:
            if self._bound.get((layer, kind)) is not module:      # once: nothing unbinds a resident block
                bind(module, held)
                self._bound[(layer, kind)] = module
            yield
            return
        t0 = time.perf_counter()
        item = self._ready.get()
        self.wait_s += time.perf_counter() - t0
        if isinstance(item, Exception):
            raise item
        got_layer, got_kind, buf, tensors = item
        assert (got_layer, got_kind) == (layer, kind), f"window out of order: {got_layer}/{got_kind} for {layer}/{kind}"
        if self.cached:                              # mapped for good: bound from now on as a resident block
            self._kept[(layer, kind)] = tensors
            self._bound[(layer, kind)] = module
            bind(module, tensors)
            self._free.put(buf)
            yield
            return
        bind(module, tensors)
        try:
            yield
        finally:
            unbind(module, tensors)
            del tensors, item
            self._free.put(buf)

    def routed_experts(self, layer: int, ids: list[int]):
        """(expert, tensors) for the experts of MoE layer `layer` the router picked (experts.py)."""
        return self.experts.routed(layer, ids)

    def resident_bytes(self) -> int:
        """File bytes of the blocks kept in memory (all of them when the shard is resident)."""
        return sum(self.shard.files[block_file(i, k)]["size"] for i, k in self.resident) + (
            self.experts.kept_bytes if self.experts else 0)

    def close(self) -> None:
        if self.experts:
            self.experts.close()
        if self.depth is not None:
            self._stop.set()
            self._free.put(None)
            self._thread.join(timeout=5)
            self._mapped.clear()
            self._kept.clear()


# -- choosing the window from a memory budget ----------------------------------------------------

def disk_read_bytes() -> int:
    """Bytes this process has had read from storage (page-cache hits excluded), all threads."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration):
        return 0


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_memory() -> int:
    """Memory not yet in use that processes here may take: the system's MemAvailable, or less under a
    cgroup limit: the limit less what the group's processes hold (page cache counts in a cgroup but
    is reclaimable, so only anonymous memory is counted as used)."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    for folder, limit, anon_keys in _limited_cgroups():
        try:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        held = next((int(stat[k]) for k in anon_keys if k in stat), current_rss())
        avail = min(avail, limit - held)
    return max(avail, 0)


def _limited_cgroups() -> list[tuple[Path, int, tuple[str, ...]]]:
    """(folder, limit in bytes, memory.stat keys of its anonymous memory) of each memory cgroup of this
    process that has a limit (v2 and v1)."""
    out = []
    for limit_file, anon_keys in (("memory.max", ("anon",)), ("memory.limit_in_bytes", ("total_rss", "rss"))):
        for folder in _cgroup_folders():
            try:
                limit = (folder / limit_file).read_text().strip()
            except OSError:
                continue
            if limit.isdigit() and int(limit) < 1 << 60:
                out.append((folder, int(limit), anon_keys))
    return out


def default_budget(ranks_sharing: int) -> int:
    """This rank's memory budget when none is given: what it holds now plus its share of 90% of the
    free memory, shared with the `ranks_sharing` ranks that draw from the same memory (this host's,
    or the same cgroup: see memory_domain). Measured before any rank loads weights. Under a cgroup
    limit, never more than its share of 90% of the limit: the budget is compared with resident
    memory, which counts library pages the group was not charged for, so `held + free` can
    overshoot the limit (a 430 MiB cap gave 491 MiB, and an MoE run reading experts was killed)."""
    budget = current_rss() + int(0.9 * available_memory() / ranks_sharing)
    limits = [limit for _, limit, _ in _limited_cgroups()]
    return min([budget] + [int(0.9 * limit / ranks_sharing) for limit in limits])


def memory_domain() -> int:
    """Which memory this process draws from, as a number ranks can compare: 0 for the host's, else
    (the cgroup with a limit) a hash of that cgroup's path; ranks with the same number share it."""
    limited = _limited_cgroups()
    return 1 + zlib.crc32(str(limited[0][0]).encode()) % (1 << 30) if limited else 0


def _cgroup_folders() -> list[Path]:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" or "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup") / ("memory" if controllers else "")
            out.append(base / path.lstrip("/"))
    return out


def dequantized_bytes(shard: Shard, name: str) -> int:
    """A file's tensors in memory once dequantized (its size when it holds no quantized matrix)."""
    info = shard.files[name]
    return info.get("dequantized", info["size"])


def budget_terms(shard: Shard, baseline: int) -> Terms:
    """What this shard adds to a rank's peak memory (budget.py's formula)."""
    sizes = [shard.files[name]["size"] for name in shard.manifest.block_files()]
    fixed = baseline + shard.files[COMMON]["size"] + experts_in_flight(shard)   # embeddings stay on disk
    dequantized = baseline + sum(dequantized_bytes(shard, n) for n in [COMMON, *shard.manifest.block_files()])
    return Terms(sizes, slot_bytes(shard), fixed, dequantized)


def experts_in_flight(shard: Shard) -> int:
    """An MoE model's experts being read and computed at once (experts.AHEAD ahead of the one computing)."""
    from .experts import AHEAD

    names = shard.manifest.expert_files()
    return (AHEAD + 1) * max(shard.files[n]["size"] for n in names) if names else 0


def slot_bytes(shard: Shard) -> int:
    """Memory a window slot stands for: the largest block, or for quantized blocks the temporaries
    of computing one (a matrix dequantized at a time, counted as half a block dequantized)."""
    names = shard.manifest.block_files()
    return max(shard.block_bytes(), max(dequantized_bytes(shard, n) for n in names) // 2)
