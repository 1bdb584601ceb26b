"""A decode layer's small float steps in compiled code (tpi_mpi/csrc/rowops.c and layer.c, part of
tpi_mpi._qdot): RMSNorm, RoPE, SiLU-and-multiply and the attention of a one-row piece, each one call;
and for a step of decode rows only, each half-layer (attention, MLP) in one call.

Under the int8 kernels torch spent most of a small model's token in per-op overhead: SmolLM2's 30
layers ran ~70 ops each, 5-10 us apiece, around 0.3 ms of products (docs/quant-kernels.md). These
are taken with the int8 kernels (quant_int8.use_int8) on float32 rows, the fast path; the exact path
keeps torch's ops, whose bits the parity tests compare with transformers'.

Bits: a row is computed alone whatever the other rows of the step hold (batch.py). The half-layer
calls run the same compiled steps in the same order as the step-by-step path, so a decode row gets
the same bits in a step of decode rows as beside a prompt's piece. One-row pieces (decode tokens, a
draft's checked tokens) attend here, longer pieces (prompts) through torch's attention, as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .quant_int8 import _qdot, describe, int8_on, kernel_threads, takes

KV_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}     # qdot.h's KV_F32, KV_F16, KV_BF16


def fast(x: Tensor) -> bool:
    """Whether x's rows take the compiled steps: the int8 path, float32 rows, the extension built."""
    return int8_on() and x.dtype == torch.float32 and _qdot() is not None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * x / rms(x) over the last dimension (normalised in float32, scaled in x's dtype, as the
    reference implementation does)."""
    if fast(x) and _f32(weight) and x.is_contiguous():
        y = torch.empty_like(x)
        _qdot().rmsnorm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
        return y
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (T, heads, head_dim) rotated by each row's cos and sin (T, 1, head_dim), the two halves of each
    head (the HF layout). The compiled step rotates x in place and returns it."""
    if fast(x) and x.is_contiguous() and _f32(cos) and _f32(sin):
        T, heads, hd = x.shape
        _qdot().rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), T, heads, hd)
        return x
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, the MLP's gating."""
    if fast(gate) and gate.is_contiguous() and _f32(up) and up.shape == gate.shape:
        out = torch.empty_like(gate)
        _qdot().silu_mul(gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
        return out
    return F.silu(gate) * up


def attends_row(q: Tensor, keys: Tensor) -> bool:
    """Whether a one-row piece's attention runs here: the fast path, and a pool this code reads."""
    return fast(q) and q.is_contiguous() and _pool(keys)


def attend_row(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, kv_index: Tensor, pos: int,
               place) -> Tensor:
    """One query row at position `pos`: its k and v (1, kv heads, hd) written to the pool where `place`
    (kv.Place) says, then each query head's softmax(q k^T / sqrt(hd)) v over positions 0..pos of its kv
    head (kv_index). q (1, heads, hd) float32; keys and values: a layer's (kv heads, positions, hd)."""
    _, heads, hd = q.shape
    out = torch.empty_like(q)
    k, v = k.contiguous(), v.contiguous()
    index = place.index
    _qdot().attend(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), heads, keys.shape[0], hd,
                   kv_index.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), KV_CODES[keys.dtype],
                   place.start, 0 if index is None else index.data_ptr(), pos, kernel_threads())
    return out


# ---- a half-layer in one call, for steps of decode rows -------------------------------------------

def decode_attention(attn, x: Tensor, batch, cos: Tensor, sin: Tensor) -> Tensor | None:
    """The attention's partial output (T, dim) before its allreduce, in one call, for a step whose every
    row is a one-row piece; None where the step-by-step path must run (see `_mats`)."""
    if not (batch.decode_rows and fast(x) and x.is_contiguous() and _f32(cos) and _f32(sin)):
        return None
    fixed = _fixed(attn, (attn.q, attn.k, attn.v, attn.o), _attention_args)
    if fixed is None:
        return None
    qkv, biases, norms, heads, o = fixed
    T, dim = x.shape
    y = torch.empty(T, o[2], dtype=torch.float32)
    pos, start, index = batch.row_places
    _qdot().attention_rows(x.data_ptr(), T, dim, qkv, biases, norms, (cos.data_ptr(), sin.data_ptr()), heads,
                           (pos.data_ptr(), start.data_ptr(), index.data_ptr()), o, y.data_ptr(), kernel_threads())
    return y


def decode_mlp(mlp, x: Tensor, batch) -> Tensor | None:
    """The MLP's partial output (T, dim) before its allreduce, in one call, for a step of decode rows."""
    if not (batch.decode_rows and fast(x) and x.is_contiguous()):
        return None
    fixed = _fixed(mlp, (mlp.gate, mlp.up, mlp.down), _mlp_args)
    if fixed is None:
        return None
    gate_up, biases, down = fixed
    T, dim = x.shape
    y = torch.empty(T, down[2], dtype=torch.float32)
    _qdot().mlp_rows(x.data_ptr(), T, dim, gate_up, biases, down, y.data_ptr(), kernel_threads())
    return y


def _fixed(module, layers, build):
    """`build(module)`'s arguments for the module's bound weights, built once per binding (a resident
    block's weights stay bound for the whole run; a streamed block's change every step): at SmolLM2's
    sizes building them took as long as a layer's products."""
    weights = tuple(layer.weight for layer in layers)
    known = module.__dict__.get("_fixed_args")           # plain attributes: nn.Module's own are slower
    if known is None or any(a is not b for a, b in zip(known[0], weights)):
        known = module.__dict__["_fixed_args"] = (weights, build(module))
    return known[1]


def _attention_args(attn) -> tuple | None:
    mats = _mats((attn.q, attn.k, attn.v, attn.o))
    qn, kn = attn.q_norm, attn.k_norm
    if mats is None or not _pool(attn.keys) or not _norms_ok(qn, kn):
        return None
    biases = tuple(_ptr(layer.bias) for layer in (attn.q, attn.k, attn.v))
    norms = (_ptr(qn and qn.weight), _ptr(kn and kn.weight), qn.eps if qn is not None else 0.0)
    heads = (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.kv_index.data_ptr(), attn.keys.data_ptr(),
             attn.values.data_ptr(), attn.keys.stride(0), KV_CODES[attn.keys.dtype])
    return mats[:3], biases, norms, heads, mats[3]


def _mlp_args(mlp) -> tuple | None:
    mats = _mats((mlp.gate, mlp.up, mlp.down))
    if mats is None:
        return None
    return mats[:2], (_ptr(mlp.gate.bias), _ptr(mlp.up.bias)), mats[2]


def _mats(layers) -> tuple | None:
    """The layers' weights as the kernels' tuples, or None unless the kernels take every one
    (quant_int8.takes: a quantized matrix or a 16-bit float one) and every bias (the column-parallel
    ones; a row-parallel bias is added after the sum) is float32."""
    out = []
    for layer in layers:
        w = layer.weight
        if w is None or not takes(w) or not _f32_or_none(layer.bias):
            return None
        qt, address, rows, interleaved = describe(w)
        out.append((qt, address, rows, 0, interleaved))
    return tuple(out)


def _norms_ok(*norms) -> bool:
    return all(n is None or _f32(n.weight) for n in norms)


def _pool(keys: Tensor) -> bool:
    return keys.dtype in KV_CODES and keys.stride()[1:] == (keys.shape[2], 1)


def _f32(t: Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def _f32_or_none(t: Tensor | None) -> bool:
    return t is None or _f32(t)


def _ptr(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()
