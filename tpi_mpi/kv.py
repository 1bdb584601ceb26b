"""The KV cache as one pool per rank: every layer's keys and values in blocks of KV_BLOCK positions,
shared by all sequences (paged, as vLLM's cache and llama-server's unified one are).

Rank 0 hands the blocks out (`BlockPool`): a request holds the blocks of what it can use, its prompt
and its answer, from admission to its end. Every step names, for each of its sequences, the runs of
blocks its positions lie in (batch.SeqStep.runs), so the other ranks keep no table that could drift
from rank 0's. `Place` turns those runs into where a sequence's positions are in a layer's store:
one run (the usual case: the pool hands out a contiguous run when it has one) is a slice and costs
no copy; several are an index.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import KV_BLOCK
from .errors import ConfigError

Runs = tuple[tuple[int, int], ...]     # (first block, blocks) each, in position order


def blocks_for(positions: int) -> int:
    return math.ceil(positions / KV_BLOCK)


def new_store(n_layers: int, n_kv_heads: int, head_dim: int, blocks: int, dtype: torch.dtype) -> Tensor:
    """Every layer's keys and values, (layers, 2, kv heads, positions, head_dim). Uninitialised: its
    pages take memory only once a sequence writes them."""
    return torch.empty(n_layers, 2, n_kv_heads, blocks * KV_BLOCK, head_dim, dtype=dtype)


class Place:
    """Where one sequence's positions lie in a layer's keys or values, (kv heads, pool positions, hd)."""

    def __init__(self, runs: Runs, needed: int) -> None:
        held = sum(n for _, n in runs) * KV_BLOCK
        if held < needed:
            raise ValueError(f"a sequence's KV blocks hold {held} positions, its step writes up to {needed}")
        if len(runs) == 1:
            self.start, self.index = runs[0][0] * KV_BLOCK, None
        else:
            self.start, self.index = 0, torch.cat([torch.arange(a * KV_BLOCK, (a + n) * KV_BLOCK) for a, n in runs])

    def write(self, store: Tensor, pos: int, x: Tensor) -> None:
        """x (kv heads, T, hd) at positions pos.. (converted to the store's dtype)."""
        if self.index is None:
            store[:, self.start + pos:self.start + pos + x.shape[1]] = x
        else:
            store.index_copy_(1, self.index[pos:pos + x.shape[1]], x.to(store.dtype))

    def read(self, store: Tensor, end: int) -> Tensor:
        """Positions 0..end-1, (kv heads, end, hd): a view for one run, a copy for several."""
        if self.index is None:
            return store[:, self.start:self.start + end]
        return store.index_select(1, self.index[:end])


class KVPoolFull(ConfigError):
    """A sequence needs more blocks than the pool has free (rank 0 admits requests so that it does not)."""


class BlockPool:
    """Rank 0's account of the pool: which blocks each sequence slot holds."""

    def __init__(self, n_blocks: int) -> None:
        self.n_blocks = n_blocks
        self.used = np.zeros(n_blocks, dtype=bool)
        self.held: dict[int, list[tuple[int, int]]] = {}

    @property
    def positions(self) -> int:
        return self.n_blocks * KV_BLOCK

    @property
    def free_blocks(self) -> int:
        return self.n_blocks - int(self.used.sum())

    def blocks_held(self, slot: int) -> int:
        return sum(n for _, n in self.held.get(slot, ()))

    def can_hold(self, slot: int, positions: int) -> bool:
        return blocks_for(positions) - self.blocks_held(slot) <= self.free_blocks

    def hold(self, slot: int, positions: int) -> Runs:
        """Make `slot` hold at least `positions` positions (it keeps what it holds): its runs."""
        runs = self.held.setdefault(slot, [])
        need = blocks_for(positions) - self.blocks_held(slot)
        if need > self.free_blocks:
            raise KVPoolFull(f"the KV pool has {self.free_blocks * KV_BLOCK} free positions of {self.positions}, "
                             f"a sequence needs {need * KV_BLOCK} more: raise --memory-budget or lower --context")
        if need > 0 and runs:            # grow the last run in place while the blocks after it are free
            a, n = runs[-1]
            taken = self.used[a + n:a + n + need]
            k = int(np.argmax(taken)) if taken.any() else len(taken)
            self.used[a + n:a + n + k] = True
            runs[-1], need = (a, n + k), need - k
        if need > 0:
            runs.extend(self._take(need))
        return tuple(runs)

    def release(self, slot: int) -> None:
        for a, n in self.held.pop(slot, ()):
            self.used[a:a + n] = False

    def _take(self, need: int) -> list[tuple[int, int]]:
        """`need` free blocks: the first free run long enough, else the lowest free blocks."""
        free = np.concatenate(([0], (~self.used).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(free))
        starts, ends = edges[0::2], edges[1::2]             # free runs [start, end)
        fits = np.flatnonzero(ends - starts >= need)
        if len(fits):
            chosen = [(int(starts[fits[0]]), need)]
        else:
            chosen = []
            for a, b in zip(starts, ends):
                n = min(int(b - a), need - sum(k for _, k in chosen))
                chosen.append((int(a), n))
                if sum(k for _, k in chosen) == need:
                    break
        for a, n in chosen:
            self.used[a:a + n] = True
        return chosen
