"""A rank's memory budget, planned: which weight window fits, and what it leaves for the KV pool.
The one place of this arithmetic; `Session` plans a run with it and `info` (sizing.py) the same
numbers from the shard plan, before any weights exist.

Peak = baseline (the process before weights) + resident tensors (norms, head rows) + an MoE
model's experts in flight + the weights kept (every block, or (window + 1) blocks and the blocks
pinned beside them: one slot more for the temporaries of the block computing) + the KV pool.

The pool holds `floor` positions at least, planned before the weights: a generate run's whole
reservation (its prompt and answer), or for serve one request of up to POOL_FLOOR tokens. Serve's
pool then takes what the budget leaves beside the weights, up to --max-batch requests of --context.
So the weights stay resident wherever they fit beside a modest pool, and the pool, not the window,
is what a small budget makes small.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import KV_BLOCK, format_size
from .errors import ShardError

MAX_WINDOW = 2     # deeper prefetch gained nothing at 7B (bench memory: windows 2 and 4 alike); more memory keeps blocks resident
POOL_FLOOR = 1024  # serve: positions planned for the KV pool before the weights (one request of this many tokens)


@dataclass(frozen=True)
class Terms:
    """The numbers the peak adds up, for one rank."""
    sizes: list[int]        # the blocks, in execution order
    slot: int               # what a window slot stands for (weights.slot_bytes)
    fixed: int              # baseline + resident tensors + experts in flight
    dequantized: int = 0    # the peak with every block and the resident tensors dequantized (the exact path's form)

    def resident(self) -> int:
        return self.fixed + sum(self.sizes) + self.slot

    def window(self, depth: int, pinned: int) -> int:
        return self.fixed + (depth + 1) * self.slot + sum(self.sizes[:pinned])


def pool_floor(context: int, max_batch: int) -> int:
    """Positions the pool must hold before the weights are planned: a single sequence's whole context
    (generate, chat), or serve's first request of up to POOL_FLOOR tokens."""
    return context if max_batch == 1 else min(context, POOL_FLOOR)


def plan_window(t: Terms, budget: int, kv: int, rank: int = 0) -> tuple[int | None, int]:
    """(window, resident blocks) whose peak with `kv` bytes of KV pool fits `budget`; (None, all)
    when the whole shard fits. The window is the largest that fits, up to MAX_WINDOW; what the budget
    leaves beside it keeps the first blocks of a pass resident, so that only the others are read
    every token."""
    if t.resident() + kv <= budget:
        return None, len(t.sizes)
    window = (budget - kv - t.fixed) // t.slot - 1
    if window < 1:
        raise ShardError(f"a memory budget of {format_size(budget)} is too small for rank {rank}: it needs at least "
                         f"{format_size(t.fixed + kv + 2 * t.slot)} (window 1, KV pool of {format_size(kv)}); "
                         f"add ranks, prepare with a smaller --dtype, or lower --context")
    window = min(int(window), MAX_WINDOW)
    spare, pinned = budget - kv - t.window(window, 0), 0
    while pinned < len(t.sizes) and t.sizes[pinned] <= spare:
        spare -= t.sizes[pinned]
        pinned += 1
    return window, pinned


def weights_peak(t: Terms, depth: int | None, pinned: int, *, whole_in_cache: bool = False,
                 dequantized: bool = False) -> int:
    """The peak without the KV pool: every block resident (dequantized, or in the page cache for a
    window that maps them), or the window and its pinned blocks."""
    if dequantized:
        return t.dequantized
    if depth is None or whole_in_cache:
        return t.resident()
    return t.window(depth, pinned)


@dataclass(frozen=True)
class Plan:
    """A rank's memory, planned: the window (None: every block resident) and its pinned blocks, the
    form of a resident shard, the peak of the weights and the KV pool's blocks."""
    depth: int | None
    pinned: int
    dequantize: bool        # resident blocks dequantized once (the exact path, where the budget holds them so)
    cached: bool            # a window whose whole shard the budget holds as page cache (mapped, not read)
    weights: int            # the peak without the pool
    kv_blocks: int


def plan(t: Terms, budget: int, per_position: int, floor: int, most: int, window: int | None | str = "auto",
         may_dequantize: bool = False, rank: int = 0) -> Plan:
    """The whole plan: the weights beside a pool of `floor` positions (`window` as asked, or "auto"),
    then the pool from what the budget leaves, up to `most` positions."""
    kv = floor * per_position
    depth, pinned = plan_window(t, budget, kv, rank) if window == "auto" else (window, 0)
    dequantize = may_dequantize and depth is None and t.dequantized + kv <= budget
    cached = depth is not None and t.resident() + kv <= budget
    weights = weights_peak(t, depth, pinned, whole_in_cache=cached, dequantized=dequantize)
    return Plan(depth, pinned, dequantize, cached, weights, pool_blocks(budget, weights, per_position, floor, most))


def pool_blocks(budget: int, weights: int, per_position: int, floor: int, most: int) -> int:
    """KV_BLOCK-position blocks of the pool: what the budget leaves beside `weights` bytes, at least
    `floor` positions and at most `most` (serve: --max-batch x --context)."""
    spare_positions = max(0, budget - weights) // per_position
    return max(math.ceil(floor / KV_BLOCK), min(math.ceil(most / KV_BLOCK), spare_positions // KV_BLOCK))
