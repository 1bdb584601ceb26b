"""The experts of a mixture-of-experts model, read from disk only when the router picks them.

Each expert of each MoE layer is a file of its own per rank (shard_format.expert_file). A step
asks for the experts its tokens were routed to, after the router has run: `routed(layer, ids)`
yields them in the order asked, reading the missing ones in parallel a few ahead of the one being
computed. What the memory budget leaves beside the weight window keeps the most recently used
experts in memory (the experts a model uses often stay; least recently used go first); when it
holds them all, every expert is read once at load. Reads and their waits are counted on the
window's counters, so the benchmarks see them with the blocks'.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

from torch import Tensor

from .errors import ShardError
from .shard_format import expert_file

AHEAD = 4       # experts read ahead of the one computing (parallel reads; each a full expert in memory)


class ExpertStore:
    def __init__(self, shard, capacity: int, counters, cached: bool = False, progress=None) -> None:
        m = shard.model
        self.shard, self.counters, self.cached = shard, counters, cached
        self.sizes = {(i, e): shard.files[expert_file(i, e)]["size"] for i in m.moe_layers for e in range(m.n_experts)}
        self.capacity = capacity
        self.kept: OrderedDict[tuple[int, int], dict[str, Tensor]] = OrderedDict()   # least recently used first
        self.kept_bytes = 0
        self.bytes_read = 0                     # experts' own share of counters.bytes_read
        self.routed_bytes = 0                   # of the experts routed to, read or kept: what a token needs
        # benchmarks only: TPI_MPI_READ_EXPERTS=all reads every expert of a layer at each step (still
        # computing the routed ones), what streaming a layer's experts as one block would read
        self.read_all = os.environ.get("TPI_MPI_READ_EXPERTS") == "all"
        self._verified: set[str] = set()
        self.pool = ThreadPoolExecutor(AHEAD, thread_name_prefix="expert-reader")
        self.resident = sum(self.sizes.values()) <= capacity
        if self.resident and self.sizes:
            bar = progress(total=len(self.sizes), desc="experts", unit="expert") if progress else None
            for key in self.sizes:
                self._keep(key, self._read(*key))
                bar and bar.update()
            bar and bar.close()

    def _read(self, layer: int, expert: int) -> dict[str, Tensor]:
        name = expert_file(layer, expert)
        t0 = time.perf_counter()
        verify = name not in self._verified
        tensors = self.shard.map(name, verify) if self.cached else self.shard.read(name, None, verify)[1]
        self._verified.add(name)
        self.counters.read_s += time.perf_counter() - t0
        self.counters.bytes_read += self.sizes[(layer, expert)]
        self.bytes_read += self.sizes[(layer, expert)]
        return tensors

    def _keep(self, key: tuple[int, int], tensors: dict[str, Tensor]) -> None:
        self.kept[key] = tensors
        self.kept_bytes += self.sizes[key]
        while self.kept_bytes > self.capacity and self.kept:
            old, _ = self.kept.popitem(last=False)
            self.kept_bytes -= self.sizes[old]

    def routed(self, layer: int, ids: list[int]) -> Iterator[tuple[int, dict[str, Tensor]]]:
        """(expert, its tensors) for each of `ids`, in that order."""
        def start(e: int) -> Future | dict:
            key = (layer, e)
            if key in self.kept:
                self.kept.move_to_end(key)
                return self.kept[key]
            return self.pool.submit(self._read, layer, e)

        wanted = set(ids)
        if self.read_all:
            ids = list(range(self.shard.model.n_experts))
        pending = [start(e) for e in ids[:AHEAD]]
        for n, e in enumerate(ids):
            if n + AHEAD < len(ids):
                pending.append(start(ids[n + AHEAD]))
            got = pending[n]
            if isinstance(got, Future):
                t0 = time.perf_counter()
                try:
                    got = got.result()              # a read error is raised here, on the main thread
                except Exception as err:
                    raise ShardError(f"reading layer {layer} expert {e} for rank {self.shard.rank}: {err}") from None
                self.counters.wait_s += time.perf_counter() - t0
                self._keep((layer, e), got)
            pending[n] = None
            if e in wanted:
                self.routed_bytes += self.sizes[(layer, e)]
                yield e, got

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
