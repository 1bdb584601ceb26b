"""The Llama-family transformer (Llama 2/3, Mistral, SmolLM2, Qwen2), written as single-device code
over the parallel layers of parallel.py.

Each rank builds the model at its own shard's shapes; the weight window (weights.py) binds each
block's tensors just before the block runs. No MPI and no rank branches here: the two allreduces
per layer happen inside `RowParallelLinear`, the logit gather inside `VocabParallelHead`.
The embedding lookup is not here either: only rank 0 holds the table (generate.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .parallel import ColumnParallelLinear, RankShard, RowParallelLinear, VocabParallelHead, bind


class RMSNorm(nn.Module):
    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight: Tensor | None = None   # resident, bound at load

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32, scale in the model dtype, as the reference implementation does
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


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

    def __call__(self, pos: int, T: int) -> tuple[Tensor, Tensor]:
        if pos + T > self.cos.shape[0]:
            n = max(pos + T, 2 * self.cos.shape[0], 256)
            freqs = torch.arange(n, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)                             # (n, head_dim)
            self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self.cos[pos:pos + T, None, :], self.sin[pos:pos + T, None, :]   # (T, 1, head_dim)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (T, heads, head_dim), rotating the two halves of each head (the HF layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of this rank's kv heads, (kv_heads, positions, head_dim), grown on demand.

    Writing at `pos` drops whatever lay beyond it, so a new prompt at position 0 starts afresh.
    """

    def __init__(self) -> None:
        self.k = self.v = None

    def update(self, pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        n_kv, T, d = k.shape
        end = pos + T
        if self.k is None or end > self.k.shape[1]:
            cap = max(end, 2 * (self.k.shape[1] if self.k is not None else 0), 64)
            grown_k, grown_v = k.new_empty(n_kv, cap, d), v.new_empty(n_kv, cap, d)
            if self.k is not None and pos:
                grown_k[:, :pos], grown_v[:, :pos] = self.k[:, :pos], self.v[:, :pos]
            self.k, self.v = grown_k, grown_v
        self.k[:, pos:end], self.v[:, pos:end] = k, v
        return self.k[:, :end], self.v[:, :end]


class Attention(nn.Module):
    def __init__(self, m: ModelConfig, shard: RankShard, comm) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = shard.n_heads, shard.n_kv_heads, m.head_dim
        self.q, self.k, self.v = ColumnParallelLinear(), ColumnParallelLinear(), ColumnParallelLinear()
        self.o = RowParallelLinear(comm)                                         # allreduce inside
        kv_index = shard.kv_index(m.group)
        # when this rank's query heads fill whole GQA groups, SDPA can share kv heads without copies
        self.whole_groups = (kv_index == [i // m.group for i in range(self.n_heads)]
                             and self.n_heads == self.n_kv_heads * m.group)
        self.kv_index = torch.tensor(kv_index)
        self.cache = KVCache()

    def forward(self, x: Tensor, pos: int, cos: Tensor, sin: Tensor) -> Tensor:
        T = x.shape[0]                                                           # x: (T, dim)
        q = apply_rope(self.q(x).view(T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(self.k(x).view(T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.v(x).view(T, self.n_kv_heads, self.head_dim)
        keys, values = self.cache.update(pos, k.transpose(0, 1), v.transpose(0, 1))  # (kv_heads, L, hd)
        if not self.whole_groups:
            keys, values = keys.index_select(0, self.kv_index), values.index_select(0, self.kv_index)
        L = pos + T
        mask = None
        if T > 1:   # queries at pos..pos+T-1 see keys up to their own position
            mask = torch.arange(L)[None, :] <= torch.arange(pos, L)[:, None]
        out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask,
                                             enable_gqa=self.whole_groups)       # (heads, T, hd)
        return self.o(out.transpose(0, 1).reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, comm) -> None:
        super().__init__()
        self.gate, self.up = ColumnParallelLinear(), ColumnParallelLinear()
        self.down = RowParallelLinear(comm)                                      # allreduce inside

    def forward(self, x: Tensor) -> Tensor:                                      # x: (T, dim)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, index: int, m: ModelConfig, shard: RankShard, comm) -> None:
        super().__init__()
        self.index = index
        self.attn_norm, self.attn = RMSNorm(m.norm_eps), Attention(m, shard, comm)
        self.mlp_norm, self.mlp = RMSNorm(m.norm_eps), FeedForward(comm)

    def forward(self, x: Tensor, pos: int, cos: Tensor, sin: Tensor, window) -> Tensor:
        with window.use(self.index, "attn", self.attn):
            x = x + self.attn(self.attn_norm(x), pos, cos, sin)
        with window.use(self.index, "mlp", self.mlp):
            x = x + self.mlp(self.mlp_norm(x))
        return x


class Transformer(nn.Module):
    """Hidden states in, logits out (full vocabulary on rank 0, None on the other ranks)."""

    def __init__(self, m: ModelConfig, shards: list[RankShard], rank: int, comm, window,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(i, m, shards[rank], comm) for i in range(m.n_layers))
        self.norm = RMSNorm(m.norm_eps)
        self.head = VocabParallelHead(comm, [s.vocab for s in shards])
        self.rope = Rope(m, dtype)
        self.window = window

    def load_resident(self, tensors: dict[str, Tensor]) -> None:
        """Norms and the head rows stay in memory for the whole run."""
        bind(self, tensors)

    @torch.inference_mode()
    def forward(self, h: Tensor, pos: int, all_logits: bool = False) -> Tensor | None:
        cos, sin = self.rope(pos, h.shape[0])                                    # h: (T, dim)
        for layer in self.layers:
            h = layer(h, pos, cos, sin, self.window)
        if not all_logits:
            h = h[-1:]
        return self.head(self.norm(h))                                           # (T or 1, vocab)
