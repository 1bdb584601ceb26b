"""The Llama-family transformer (Llama 2/3, Mistral, SmolLM2, Qwen2, Qwen3, and the mixtures of
experts Qwen3-MoE and Mixtral), written as single-device code over the parallel layers of parallel.py.

Each rank builds the model at its own shard's shapes; the weight window (weights.py) binds each
block's tensors just before the block runs. No MPI and no rank branches here: the two allreduces
per layer happen inside `RowParallelLinear` (or `ParallelSum`, after the experts), the logit
gather inside `VocabParallelHead`.
The embedding lookup is not here either: only rank 0 holds the table (generate.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch import Batch, Rows
from .config import ModelConfig
from .kv import Place, new_store
from .parallel import (ColumnParallelLinear, ParallelSum, RankShard, RowParallelLinear, VocabParallelHead, bind, project,
                       unbind)
from .rowops import apply_rope, attend_row, attends_row, decode_attention, decode_mlp, rms_norm, silu_mul


class RMSNorm(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight: Tensor | None = None   # resident, bound at load

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(m: ModelConfig) -> Tensor:
    """Inverse RoPE frequencies (head_dim / 2,), with Llama 3.1's long-context rescaling if asked."""
    d = m.head_dim
    inv = 1.0 / (m.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = m.rope_scaling
    if not s:
        return inv
    factor, lo, hi, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_len / lo, inv / factor, inv)           # long waves: slowed down
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled                  # medium waves: blended
    medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
    return torch.where(medium, blended, scaled)


class Rope:
    """cos/sin tables by position, grown on demand."""

    def __init__(self, m: ModelConfig, dtype: torch.dtype) -> None:
        self.inv_freq, self.dtype = rope_inv_freq(m), dtype
        self.cos = self.sin = torch.empty(0, m.head_dim)

    def __call__(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin (T, 1, head_dim) at each row's position."""
        end = int(positions.max()) + 1
        if end > self.cos.shape[0]:
            n = max(end, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)                             # (n, head_dim)
            self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self.cos[positions, None, :], self.sin[positions, None, :]


class Attention(nn.Module):
    """Each sequence attends over its own positions, which lie in the rank's KV pool (kv.py) where its
    step's `Place` says; `keys` and `values` are this layer's part of the pool, (kv heads, positions, hd)."""

    def __init__(self, m: ModelConfig, shard: RankShard, comm, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = shard.n_heads, shard.n_kv_heads, m.head_dim
        self.q, self.k, self.v = ColumnParallelLinear(), ColumnParallelLinear(), ColumnParallelLinear()
        self.o = RowParallelLinear(comm)                                         # allreduce inside
        # Qwen3: each query and key head RMS-normed (one head_dim weight for all heads) before RoPE
        self.q_norm = RMSNorm(m.norm_eps) if m.qk_norm else None
        self.k_norm = RMSNorm(m.norm_eps) if m.qk_norm else None
        kv_index = shard.kv_index(m.group)
        # when this rank's query heads fill whole GQA groups, SDPA can share kv heads without copies
        self.whole_groups = (kv_index == [i // m.group for i in range(self.n_heads)]
                             and self.n_heads == self.n_kv_heads * m.group)
        self.kv_index = torch.tensor(kv_index)
        self.keys, self.values = keys, values

    def forward(self, x: Tensor, batch: Batch, cos: Tensor, sin: Tensor) -> Tensor:
        partial = decode_attention(self, x, batch, cos, sin)                     # a step of decode rows: one call
        if partial is not None:
            return self.o.reduce(partial)
        T, rows = x.shape[0], batch.rows                                         # x: (T, dim), every sequence's rows
        q, k, v = project(x, (self.q, self.k, self.v), rows)
        q = q.view(T, self.n_heads, self.head_dim)
        k = k.view(T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.view(T, self.n_kv_heads, self.head_dim)
        out = torch.empty_like(q)
        for p in rows.pieces:             # each sequence against its own positions, piece by piece in order
            out[p.start:p.stop] = self._attend(q[p.start:p.stop], k[p.start:p.stop], v[p.start:p.stop], p.pos,
                                               batch.places[p.seq])
        return self.o(out.view(T, self.n_heads * self.head_dim), rows)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, pos: int, place: Place) -> Tensor:
        T = q.shape[0]                                                           # q: (T, heads, hd)
        if T == 1 and attends_row(q, self.keys):                                 # a decode row: one compiled call
            return attend_row(q, k, v, self.keys, self.values, self.kv_index, pos, place)
        L = pos + T
        place.write(self.keys, pos, k.transpose(0, 1))
        place.write(self.values, pos, v.transpose(0, 1))
        keys = place.read(self.keys, L).to(q.dtype)                              # (kv_heads, L, hd); a half-
        values = place.read(self.values, L).to(q.dtype)                          # precision pool: widened
        if not self.whole_groups:
            keys, values = keys.index_select(0, self.kv_index), values.index_select(0, self.kv_index)
        mask = None
        if T > 1:   # queries at pos..pos+T-1 see keys up to their own position
            mask = torch.arange(L)[None, :] <= torch.arange(pos, L)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                             enable_gqa=self.whole_groups)       # (heads, T, hd)
        return out.transpose(0, 1)


class FeedForward(nn.Module):
    def __init__(self, comm) -> None:
        super().__init__()
        self.gate, self.up = ColumnParallelLinear(), ColumnParallelLinear()
        self.down = RowParallelLinear(comm)                                      # allreduce inside

    def forward(self, x: Tensor, batch: Batch) -> Tensor:                        # x: (T, dim)
        partial = decode_mlp(self, x, batch)                                     # a step of decode rows: one call
        if partial is not None:
            return self.down.reduce(partial)
        gate, up = project(x, (self.gate, self.up), batch.rows)
        return self.down(silu_mul(gate, up), batch.rows)


def route(logits: Tensor, k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """Each token's k experts and their weights: softmax over all experts in float32, the top k,
    rescaled to sum to 1 if `normalize` (as Qwen3-MoE's norm_topk_prob and Mixtral do)."""
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    weights, chosen = torch.topk(probs, k, dim=-1)                               # (T, k) each
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, chosen


class Expert(nn.Module):
    """One expert's MLP slice: gate and up split by columns like a dense MLP; its down partial is
    summed with the other experts' before the one allreduce."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = ColumnParallelLinear(), ColumnParallelLinear(), ColumnParallelLinear()

    def forward(self, x: Tensor, rows: Rows | None) -> Tensor:
        gate, up = project(x, (self.gate, self.up), rows)
        return self.down(silu_mul(gate, up), rows)


class MixtureOfExperts(nn.Module):
    """Qwen3-MoE / Mixtral MLP: the router (whole on every rank, so all ranks route alike) picks
    n_routed experts per token; every rank computes its column slice of each routed expert, and the
    weighted sum of all of them is allreduced once, as a dense MLP's down projection is."""

    def __init__(self, m: ModelConfig, comm) -> None:
        super().__init__()
        self.router = ColumnParallelLinear()                                     # (n_experts, dim), not split
        self.experts = nn.ModuleList(Expert() for _ in range(m.n_experts))
        self.k, self.normalize = m.n_routed, m.norm_routed
        self.sum = ParallelSum(comm)                                             # allreduce inside
        self.routed = None      # routed(ids) -> (expert, tensors) of each, read only then (the weight window's)

    def forward(self, x: Tensor, batch: Batch) -> Tensor:                        # x: (T, dim)
        rows = batch.rows
        weights, chosen = route(self.router(x, rows), self.k, self.normalize)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e, tensors in self.routed(chosen.unique().tolist()):                 # ascending: a fixed order of the sum
            token, slot = (chosen == e).nonzero(as_tuple=True)                   # tokens ascending
            bind(self.experts[e], tensors)
            y = self.experts[e](x[token], rows.subset(token))
            unbind(self.experts[e], tensors)
            out.index_add_(0, token, y * weights[token, slot, None])
        return self.sum(out)


class Block(nn.Module):
    def __init__(self, index: int, m: ModelConfig, shard: RankShard, comm, kv: Tensor) -> None:
        super().__init__()
        self.index = index
        self.attn_norm, self.attn = RMSNorm(m.norm_eps), Attention(m, shard, comm, kv[0], kv[1])
        self.mlp_norm = RMSNorm(m.norm_eps)
        self.mlp = MixtureOfExperts(m, comm) if m.is_moe(index) else FeedForward(comm)

    def forward(self, x: Tensor, batch: Batch, cos: Tensor, sin: Tensor, window) -> Tensor:
        with window.use(self.index, "attn", self.attn):
            x = x + self.attn(self.attn_norm(x), batch, cos, sin)
        with window.use(self.index, "mlp", self.mlp):
            x = x + self.mlp(self.mlp_norm(x), batch)
        return x


class Transformer(nn.Module):
    """Hidden states in, logits out (full vocabulary on rank 0, None on the other ranks).

    A step runs a batch of sequences (batch.py), whose keys and values lie in one KV pool of
    `kv_blocks` blocks (kv.py), in `kv_dtype`.
    """

    def __init__(self, m: ModelConfig, shards: list[RankShard], rank: int, comm, window,
                 dtype: torch.dtype, kv_blocks: int, kv_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.kv = new_store(m.n_layers, shards[rank].n_kv_heads, m.head_dim, kv_blocks, kv_dtype or dtype)
        self.layers = nn.ModuleList(Block(i, m, shards[rank], comm, self.kv[i]) for i in range(m.n_layers))
        self.norm = RMSNorm(m.norm_eps)
        self.head = VocabParallelHead(comm, [s.vocab for s in shards])
        self.rope = Rope(m, dtype)
        self.window = window
        for layer in self.layers:
            if isinstance(layer.mlp, MixtureOfExperts):
                layer.mlp.routed = functools.partial(window.routed_experts, layer.index)

    def load_resident(self, tensors: dict[str, Tensor]) -> None:
        """Norms and the head rows stay in memory for the whole run."""
        bind(self, tensors)

    @torch.inference_mode()
    def forward(self, h: Tensor, batch: Batch) -> Tensor | None:
        """h (T, dim): every sequence's rows, one after another. Returns the logits of the rows the
        sequences want (batch.head_rows), (R, vocab) on rank 0."""
        cos, sin = self.rope(batch.positions)
        for layer in self.layers:
            h = layer(h, batch, cos, sin, self.window)
        if not len(batch.head_rows):                                            # a prompt chunk with more to come
            return None
        h = h.index_select(0, batch.head_rows)
        return self.head(self.norm(h), batch.head)

    def kv_bytes(self) -> int:
        """The KV pool's size (its pages take memory as sequences write them)."""
        return self.kv.nbytes
