"""What a model needs on each rank, for `tpi_mpi info`: bytes held, bytes read per token when the
weights stream, the minimum memory budget for each --quant the source can take, and what serve's
KV pool holds under a budget. The shard plan (parallel.py) or the manifest (shard_format.py) put
through the budget's own arithmetic (budget.py), and the lines that print it; no click here
(cli.py echoes the lines), no weights read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterator, NamedTuple

from .budget import Terms, plan, pool_floor
from .config import KV_BLOCK, ParallelConfig, format_size, kv_dtype_name, parse_ratio
from .errors import ShardError
from .parallel import FFN_UNIT, RankShard, kv_bytes, parameter_count, plan_shards, shard_bytes
from .prepare import QUANT_BYTES, ffn_unit, open_source, resolve_quant
from .experts import AHEAD
from .kv import blocks_for
from .quant import QTYPES
from .shard_format import DTYPE_NAMES, DTYPES, MANIFEST, Manifest, matrix_types, types_label
from .weights import current_rss


class RankNeeds(NamedTuple):
    """One rank's bytes under one --quant."""
    shard: int          # everything it holds: the streamed blocks, the resident tensors, its embedding rows
    rank: RankShard
    block: int          # the largest block the window holds at once
    streamed: int       # read per token when every block streams
    minimum: int        # the smallest --memory-budget it starts with (a window of 1)
    routed: int         # read per token with the routed experts only
    terms: Terms        # what budget.py plans with


class Sizing:
    """A model source (a model folder, .gguf file, synthetic source or prepared folder) planned for
    `world_size` ranks; `plan(mode)` gives each rank's needs under --quant `mode`."""

    def __init__(self, source, world_size: int, ratio: str | None, dtype: str, head_on: str, quant: str,
                 context: int) -> None:
        self.opened, self.prepared = None, None
        self.modes: dict[str, float | None] = {}     # --quant -> bytes per matrix value (None: floats)
        if isinstance(source, (str, Path)) and (Path(source) / "rank0" / MANIFEST).exists():   # prepared
            mf = Manifest.load(Path(source) / "rank0")
            self.model, self.stored, self.quant, self.prepared = mf.model, mf.dtype, mf.quant, list(mf.shards)
            world_size, ratio = mf.world_size, ",".join(map(str, mf.ratio))
            self.matrix_types = matrix_types(Path(source) / "rank0", mf)
            blocks = mf.block_files()
            self.modes[self.quant] = (sum(mf.files[b]["size"] for b in blocks) / sum(
                mf.files[b].get("dequantized", mf.files[b]["size"]) for b in blocks)
                * DTYPES[self.stored].itemsize) if self.quant != "none" else None
        else:
            self.opened = open_source(source) if isinstance(source, (str, Path)) else source
            self.model, self.stored = self.opened.config, DTYPE_NAMES[self.opened.dtype]
            self.quant = resolve_quant(self.opened, quant)
            self.modes = {"none": None, **({"keep": self.opened.matrix_bytes()}
                                           if hasattr(self.opened, "matrix_bytes") else {}), **QUANT_BYTES}
        self.compute = self.stored if dtype == "auto" or self.prepared else dtype     # a prepared folder keeps its own
        self.itemsize = DTYPES[self.compute].itemsize
        if self.opened:                  # the types prepare will store the matrices in
            own = self.opened.matrix_types() if self.quant == "keep" else Counter()
            self.matrix_types = Counter({(t if t in QTYPES else self.compute): n for t, n in own.items()} if own
                                        else {self.quant.upper() if self.quant != "none" else self.compute: 1})
        self.kv_dtype = kv_dtype_name("auto", dtype, self.stored)      # the cache a run keeps by default
        self.par = ParallelConfig(world_size, parse_ratio(ratio))
        self.head_on = head_on
        self.context = min(context, self.model.max_seq_len)
        self.baseline = current_rss()    # this process after importing torch: about what a rank starts with

    def kv_bytes(self, s: RankShard, positions: int) -> int:
        return kv_bytes(self.model, s, positions, DTYPES[self.kv_dtype].itemsize)

    def plan(self, mode: str) -> list[RankNeeds]:
        m, per = self.model, self.modes[mode]
        shards = self.prepared or plan_shards(m, self.par, self.head_on,
                                              ffn_unit(self.opened, mode, m) if self.opened else FFN_UNIT)
        rows = []
        for s in shards:
            b = shard_bytes(m, s, self.itemsize, per)
            dense = shard_bytes(m, s, self.itemsize)       # a quantized block computes one matrix dequantized at a time
            block = max(b["attn"], b["mlp"], max(dense["attn"], dense["mlp"]) // 2 if per else 0)
            experts = len(m.moe_layers) * m.n_experts * b["expert"]     # of which a token needs the routed ones
            streamed = m.n_layers * (b["attn"] + b["mlp"]) + experts
            routed = streamed - experts * (1 - m.n_routed / max(m.n_experts, 1))
            in_flight = (AHEAD + 1) * b["expert"] if m.moe_layers else 0
            terms = Terms([b["attn"], b["mlp"]] * m.n_layers, block, self.baseline + b["common"] + in_flight)
            minimum = terms.window(1, 0) + self.kv_bytes(s, self.context)        # window 1, KV of one context
            rows.append(RankNeeds(streamed + b["common"] + b["embed"], s, block, streamed, minimum, routed, terms))
        return rows

    def serve_plan(self, budget: int, max_batch: int) -> list[tuple[str, int] | None]:
        """Per rank under `budget`, as serve plans it: (the weights kept, the KV pool's positions), or
        None where the budget is too small."""
        out = []
        for r in self.plan(self.quant):
            try:
                p = plan(r.terms, budget, self.kv_bytes(r.rank, 1), pool_floor(self.context, max_batch),
                         max_batch * self.context, rank=r.rank.rank)
            except ShardError:
                out.append(None)
                continue
            kept = "resident" if p.depth is None else f"window {p.depth} + {p.pinned} of {len(r.terms.sizes)} blocks"
            out.append((kept, p.kv_blocks * KV_BLOCK))
        return out


def report(sizing: Sizing, budget: int | None = None, max_batch: int = 8, request: int = 0) -> Iterator[str]:
    """The lines `info` prints: the architecture, a table of the ranks under the source's --quant,
    what serve's KV pool holds (under `budget` per rank, for --max-batch requests of `request`
    tokens), and, when the source can take others, the largest rank under each --quant."""
    m = sizing.model
    n = parameter_count(m)
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    yield (f"{m.arch}: {count} parameters, {m.n_layers} layers, dim {m.dim}, "
           f"{m.n_heads} query / {m.n_kv_heads} kv heads of {m.head_dim}, ffn {m.ffn_dim}, "
           f"vocabulary {m.vocab_size}, context {m.max_seq_len}")
    compute = sizing.compute        # 16-bit floats: float32 under the kernels (floats.c), as stored on the exact path
    if compute in ("bf16", "fp16"):
        compute = f"fp32 ({compute} with --matmul exact)"
    yield (f"--quant {sizing.quant}: weight matrices stored as {types_label(sizing.matrix_types)}; norms as "
           f"{sizing.compute}; compute dtype {compute}")
    if m.n_experts:
        yield (f"mixture of experts in {len(m.moe_layers)} layers: {m.n_experts} experts of {m.expert_ffn_dim} "
               f"columns, {m.n_routed} routed per token; every rank holds a column slice of every expert")
    yield (f"{'rank':>4} {'heads':>7} {'kv':>5} {'ffn cols':>11} {'shard':>11} {'largest block':>14} "
           f"{'KV/token':>10} {'min budget':>11}")
    for r in sizing.plan(sizing.quant):
        s = r.rank
        cols = s.expert_ffn if m.n_experts and len(m.moe_layers) == m.n_layers else s.ffn   # each expert's, if all MoE
        yield (f"{s.rank:>4} {s.heads[0]:>3}-{s.heads[1]:<3} {s.n_kv_heads:>5} {cols[0]:>5}-{cols[1]:<5} "
               f"{format_size(r.shard):>11} {format_size(r.block):>14} {format_size(sizing.kv_bytes(s, 1)):>10} "
               f"{format_size(r.minimum):>11}")
    yield "heads and ffn cols are half-open ranges [lo, hi): 0-2 is heads 0 and 1"
    yield (f"min budget = runtime baseline ({format_size(sizing.baseline)}) + resident tensors + 2 blocks + "
           f"KV cache for {sizing.context} tokens in {sizing.kv_dtype}: --memory-budget below it is refused")
    yield from _serve_lines(sizing, budget, max_batch, request or sizing.context)
    if len(sizing.modes) > 1:
        routed_col = f" {'routed experts only':>19}" if m.n_experts else ""
        yield (f"\nper --quant, for the largest rank: {'bytes/value':>11} {'shard':>11} {'read per token':>15} "
               f"{'min budget':>11}{routed_col}")
        for mode, per in sizing.modes.items():
            r = max(sizing.plan(mode), key=lambda row: row.shard)
            yield (f"{mode:>33} {per or sizing.itemsize:>11.3f} {format_size(r.shard):>11} "
                   f"{format_size(r.streamed):>15} {format_size(r.minimum):>11}"
                   + (f" {format_size(r.routed):>19}" if m.n_experts else ""))
        yield ("read per token: every block streamed once per token (a window smaller than the shard)"
               + ("; routed experts only: the dense parts and the routed experts, what a token reads "
                  "when no expert is kept in memory" if m.n_experts else ""))


def _serve_lines(sizing: Sizing, budget: int | None, max_batch: int, request: int) -> Iterator[str]:
    """What generate reserves, and what serve's pool holds: under `budget` per rank, or the budget
    that keeps the weights resident beside a pool for every request."""
    plan = sizing.plan(sizing.quant)
    largest = max(plan, key=lambda r: r.terms.resident() + sizing.kv_bytes(r.rank, 1))
    per = sizing.kv_bytes(largest.rank, 1)
    blocks = blocks_for(request) * KV_BLOCK                        # a request holds whole blocks
    yield (f"KV cache: {format_size(per)} per token on rank {largest.rank.rank} in {sizing.kv_dtype}; generate and chat "
           f"reserve their prompt and answer, serve one pool shared by its requests")
    if budget is None:
        need = largest.terms.resident() + max_batch * blocks * per
        yield (f"serve --max-batch {max_batch}, requests of {request} tokens (prompt + answer): "
               f"--memory-budget {format_size(need)} per rank keeps the weights resident beside a pool for all "
               f"{max_batch} at once (give --memory-budget to see what a budget holds)")
        return
    yield f"serve under --memory-budget {format_size(budget)} per rank, requests of {request} tokens (prompt + answer):"
    yield f"{'rank':>4} {'weights':>26} {'KV pool':>16} {'requests':>9}"
    for r, planned in zip(plan, sizing.serve_plan(budget, max_batch)):
        if planned is None:
            yield f"{r.rank.rank:>4} {'the budget is too small':>26}"
            continue
        kept, positions = planned
        yield (f"{r.rank.rank:>4} {kept:>26} {f'{positions} tokens':>16} "
               f"{min(max_batch, positions // blocks):>9}")
