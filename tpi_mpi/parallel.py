"""Tensor-parallel layers and the pure math that decides which rank holds what.

Terms, defined once (Megatron's): a torch `Linear` weight is (out_features, in_features).
**Column-parallel** splits the output features (weight dim 0) and needs no communication;
**row-parallel** splits the input features (weight dim 1), so each rank holds a partial sum
that `comm.allreduce` adds up. Only `RowParallelLinear`, `ParallelSum` and `VocabParallelHead` talk to `comm`.

Weights are not parameters: the weight window (weights.py) binds tensors to `weight`/`bias`
right before a block runs and unbinds them afterwards. A weight may be a float tensor or a
`QuantWeight` (a GGUF block format, quant.py); `linear` computes with either.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import Rows, split_rows
from .config import ModelConfig, ParallelConfig
from .quant import QuantWeight, matmul
from .quant_int8 import int8_on, matmul_int8, matmul_int8_many, takes

FFN_UNIT = 32   # MLP columns move between ranks in multiples of this (a quant block; 256 for K-quants)


def split_by_ratio(total: int, ratio: Sequence[float], unit: int = 1) -> list[tuple[int, int]]:
    """Half-open [start, stop) per rank, sizes proportional to `ratio`, in multiples of `unit`.

    The last rank also takes any remainder below `unit`. Every rank gets at least one unit
    when there are enough units to go round.
    """
    n = len(ratio)
    units = total // unit
    cuts = np.rint(np.cumsum(ratio) / sum(ratio) * units).astype(int)
    cuts[-1] = units
    if units >= n:
        for i in range(n):                          # at least one unit each, in order
            lo = (cuts[i - 1] if i else 0) + 1
            hi = units - (n - 1 - i)
            cuts[i] = min(max(cuts[i], lo), hi)
    bounds = [int(c) * unit for c in cuts]
    bounds[-1] = total
    starts = [0, *bounds[:-1]]
    return list(zip(starts, bounds))


@dataclass(frozen=True)
class RankShard:
    """What one rank holds. All ranges are half-open [lo, hi)."""
    rank: int
    heads: tuple[int, int]      # query heads
    kv_heads: tuple[int, int]   # kv heads those query heads read (copies when shared)
    ffn: tuple[int, int]        # MLP intermediate columns
    vocab: tuple[int, int]      # output-head rows (logit columns)
    expert_ffn: tuple[int, int] = (0, 0)   # each expert's MLP columns (mixture of experts: every expert split alike)

    @property
    def n_heads(self) -> int:
        return self.heads[1] - self.heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def kv_index(self, group: int) -> list[int]:
        """For each local query head, the local kv head it attends with."""
        return [h // group - self.kv_heads[0] for h in range(*self.heads)]

    def to_json(self) -> dict:
        return asdict(self)


def plan_shards(m: ModelConfig, par: ParallelConfig, head_on: str = "split", ffn_unit: int = FFN_UNIT) -> list[RankShard]:
    """Deal heads, MLP columns and vocabulary rows out to ranks by the ratio.

    head_on="rank0" keeps the whole output head on rank 0 instead of splitting it. `ffn_unit`: the
    MLP columns a rank holds start at multiples of it, so that `down`, split along its input
    columns, splits at whole quantization blocks (256 values for K-quants).
    """
    par.check(m)
    heads = split_by_ratio(m.n_heads, par.parts)
    ffn = split_by_ratio(m.ffn_dim, par.parts, ffn_unit)
    experts = split_by_ratio(m.expert_ffn_dim, par.parts, ffn_unit) if m.n_experts else [(0, 0)] * par.world
    if head_on == "rank0":
        vocab = [(0, m.vocab_size)] + [(m.vocab_size, m.vocab_size)] * (par.world - 1)
    else:
        vocab = split_by_ratio(m.vocab_size, par.parts)
    shards = []
    for r, (h0, h1) in enumerate(heads):
        kv = (h0 // m.group, (h1 - 1) // m.group + 1)
        shards.append(RankShard(r, (h0, h1), kv, ffn[r], vocab[r], experts[r]))
    return shards


class ColumnParallelLinear(nn.Module):
    """Y = X A^T + b, with A's output features split over ranks: this rank's slice of Y."""

    def __init__(self) -> None:
        super().__init__()
        self.weight: Tensor | None = None   # (out_local, in)
        self.bias: Tensor | None = None     # (out_local,)

    def forward(self, x: Tensor, rows: Rows | None = None) -> Tensor:
        return linear(x, self.weight, self.bias, rows)


def project(x: Tensor, layers: Sequence[ColumnParallelLinear], rows: Rows | None = None) -> list[Tensor]:
    """Each layer applied to the same x (a layer's q, k and v; gate and up). Weights the int8 kernels
    take go in one call: x quantized once, one call's overhead instead of several."""
    weights = [layer.weight for layer in layers]
    if len(layers) <= 4 and all(_kernel(w) for w in weights):
        out = []
        for y, layer in zip(matmul_int8_many(x.reshape(-1, x.shape[-1]), weights), layers):
            y = y.to(x.dtype).view(*x.shape[:-1], -1)
            out.append(y if layer.bias is None else y + layer.bias)
        return out
    return [layer(x, rows) for layer in layers]


class RowParallelLinear(nn.Module):
    """Y = sum over ranks of X_r A_r^T, then + b: the input features are split, partials allreduced."""

    def __init__(self, comm) -> None:
        super().__init__()
        self.comm = comm
        self.weight: Tensor | None = None   # (out, in_local)
        self.bias: Tensor | None = None     # (out,), added once after the sum

    def forward(self, x: Tensor, rows: Rows | None = None) -> Tensor:
        return self.reduce(linear(x, self.weight, None, rows))

    def reduce(self, partial: Tensor) -> Tensor:
        """The sum of every rank's X_r A_r^T (one allreduce for the whole step), then + b."""
        y = self.comm.allreduce(partial)
        return y if self.bias is None else y + self.bias


class ParallelSum(nn.Module):
    """The sum over ranks of partial results (what RowParallelLinear ends with), for a layer that adds
    several row-parallel products before summing: a mixture of experts' weighted experts."""

    def __init__(self, comm) -> None:
        super().__init__()
        self.comm = comm

    def forward(self, x: Tensor) -> Tensor:
        return self.comm.allreduce(x)


class VocabParallelHead(nn.Module):
    """Logits for this rank's vocabulary rows, gathered into the full vocabulary on rank 0.

    Returns (T, vocab) float32 on rank 0 and None elsewhere.
    """

    def __init__(self, comm, vocab_bounds: list[tuple[int, int]]) -> None:
        super().__init__()
        self.comm = comm
        self.counts = [hi - lo for lo, hi in vocab_bounds]
        self.weight: Tensor | None = None   # (vocab_local, dim)

    def forward(self, x: Tensor, rows: Rows | None = None) -> Tensor | None:
        local = linear(x, self.weight, None, rows).float()
        return self.comm.gather_columns(local, self.counts)


def linear(x: Tensor, weight: Tensor | QuantWeight, bias: Tensor | None = None, rows: Rows | None = None) -> Tensor:
    """x @ weight^T + bias, for a float or a quantized weight. With invariant `rows` (batch.py),
    each piece of rows is computed as if it were alone in the step, whatever the others are."""
    if rows is not None and rows.invariant:
        y = split_rows(x, rows.pieces, lambda r: linear_rows(r, weight), lambda r: linear(r, weight))
        return y if bias is None else y + bias
    if rows is not None and rows.alone and x.shape[0] > 1 and not _kernel(weight):
        # BLAS (and the exact path's many-row products) give a row other bits among several rows than
        # alone: a row at a time. The int8 kernels compute every row alone whatever the call.
        return torch.cat([linear(row[None], weight, bias) for row in x])
    if isinstance(weight, QuantWeight):     # the int8 kernels or the exact path, as quant.matmul says
        y = matmul(x, weight)
        return y if bias is None else y + bias
    if _kernel(weight):                     # a 16-bit float matrix
        y = matmul_int8(x.reshape(-1, x.shape[-1]), weight).to(x.dtype).view(*x.shape[:-1], -1)
        return y if bias is None else y + bias
    if weight.dtype != x.dtype:             # 16-bit rows the kernels do not take (columns not whole 32s)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.linear(x, weight, bias)


def _kernel(weight: Tensor | QuantWeight) -> bool:
    """Whether the run's kernels (--matmul int8) multiply by this weight (quant_int8.takes)."""
    return int8_on() and takes(weight)


BLOCK_ROWS = (4, 8, 16)    # row counts tried for the fixed-size products of one-row pieces, in order
PROBE_ROWS = 8             # random rows `_fixed_rows` tries at every place of a block


def linear_rows(x: Tensor, weight: Tensor | QuantWeight) -> Tensor:
    """x @ weight^T with every row of x computed as it would be alone (batch invariant), in one pass
    over the weight for up to a block of rows.

    Weights the run's kernels take (`_kernel`): those; other quantized weights: numba's row kernels.
    Other float weights: BLAS on blocks of exactly the same number of rows (zero padded): its result
    for a row depends on how many rows the product has (and, at some counts, on the row's place), but
    not, for a fixed count, on the place or the other rows: `_fixed_rows` finds such a count once per
    shape; where none is found, a call per row."""
    if _kernel(weight):                     # the int8 kernels compute every row alone whatever the call
        return matmul_int8(x, weight).to(x.dtype)
    if isinstance(weight, QuantWeight):
        from .quant_numba import matmul_numba
        return matmul_numba(x, weight)
    weight = weight.to(x.dtype)             # 16-bit rows the kernels do not take: see linear
    n = _fixed_rows(tuple(weight.shape), weight.dtype, x.dtype, torch.get_num_threads())
    if n is None:
        return torch.cat([F.linear(row[None].clone(), weight) for row in x])
    blocks = x.new_zeros(-(-x.shape[0] // n) * n, x.shape[1])
    blocks[:x.shape[0]] = x
    return torch.cat([F.linear(b, weight) for b in blocks.split(n)])[:x.shape[0]]


@functools.cache
def _fixed_rows(shape: tuple[int, int], w_dtype: torch.dtype, x_dtype: torch.dtype, threads: int) -> int | None:
    """A row count (of BLOCK_ROWS) at which BLAS gives a row the same bits at every place of the
    product and whatever the other rows hold: checked on random numbers, not assumed (several rows
    at every place, since rounding to bf16 often hides a different order of the sum)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g).to(w_dtype)
    for n in BLOCK_ROWS:
        for _ in range(PROBE_ROWS):
            row = torch.randn(shape[1], generator=g).to(x_dtype)
            results = []
            for place in range(n):
                rows = torch.randn(n, shape[1], generator=g).to(x_dtype)
                rows[place] = row
                results.append(F.linear(rows, w)[place])
            if not all(torch.equal(results[0], r) for r in results[1:]):
                break
        else:
            return n
    return None


def bind(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Point `module`'s weights at `tensors` ("q.weight" -> module.q.weight)."""
    for name, t in tensors.items():
        owner, attr = name.rsplit(".", 1)
        setattr(module.get_submodule(owner), attr, t)


def unbind(module: nn.Module, names) -> None:
    for name in names:
        owner, attr = name.rsplit(".", 1)
        setattr(module.get_submodule(owner), attr, None)


def shard_bytes(m: ModelConfig, s: RankShard, itemsize: int, matrix_bytes: float | None = None) -> dict[str, int]:
    """Bytes of each kind of tensor a rank holds (before file headers): one attention block, one
    MLP block (of an MoE model: the largest, a dense MLP or a router), one expert's slice, the
    resident rest (norms, head rows) and, on rank 0, the embedding table. Weight matrices take
    `matrix_bytes` per value when quantized (18/32 for Q4_0), the rest `itemsize`."""
    hd = m.head_dim
    per = itemsize if matrix_bytes is None else matrix_bytes
    q, kv, ffn = s.n_heads * hd, s.n_kv_heads * hd, s.ffn[1] - s.ffn[0]
    attn = (2 * q * m.dim + 2 * kv * m.dim) * per + ((q + 2 * kv) * m.qkv_bias + m.dim * m.o_bias
                                                     + 2 * hd * m.qk_norm) * itemsize
    mlp = 3 * ffn * m.dim * per + (2 * ffn + m.dim) * m.mlp_bias * itemsize
    if m.moe_layers:            # an MoE layer's MLP block is its router; its experts are files of their own
        mlp = max(mlp if len(m.moe_layers) < m.n_layers else 0, m.n_experts * m.dim * itemsize)
    expert = 3 * (s.expert_ffn[1] - s.expert_ffn[0]) * m.dim * per
    common = (2 * m.n_layers + 1) * m.dim * itemsize + (s.vocab[1] - s.vocab[0]) * m.dim * per
    embed = m.vocab_size * m.dim * per if s.rank == 0 else 0
    return {k: int(v) for k, v in {"attn": attn, "mlp": mlp, "expert": expert, "common": common, "embed": embed}.items()}


def kv_bytes(m: ModelConfig, s: RankShard, positions: int, itemsize: int) -> int:
    """A rank's KV cache of `positions` positions: keys and values of its kv heads, every layer (the
    one place this is counted: the memory budget and `info` both ask here)."""
    return 2 * m.n_layers * s.n_kv_heads * m.head_dim * positions * itemsize


def parameter_count(m: ModelConfig) -> int:
    """Parameters of the model as stored (a tied head counted once)."""
    q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
    layer = 2 * q * m.dim + 2 * kv * m.dim + 2 * m.dim
    layer += (q + 2 * kv) * m.qkv_bias + m.dim * m.o_bias + (2 * m.ffn_dim + m.dim) * m.mlp_bias + 2 * m.head_dim * m.qk_norm
    head = 0 if m.tie_embeddings else m.vocab_size * m.dim
    mlps = ((m.n_layers - len(m.moe_layers)) * 3 * m.ffn_dim * m.dim
            + len(m.moe_layers) * m.n_experts * (3 * m.expert_ffn_dim + 1) * m.dim)
    return mlps + m.n_layers * layer + m.vocab_size * m.dim + head + m.dim
