"""Floats to GGML blocks: gguf-py's reference quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) in torch, byte for byte,
for `prepare --quant`; and random blocks of any type for tests and benchmarks (gguf has no K-quant
quantizer). The formats themselves, and reading them, are quant.py's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import _sizes, _step_rows, block_size, row_bytes


# ---- quantize: gguf.quants' reference quantizers (numpy, float32) in torch --------------------------

def _fp16_bytes(v: Tensor) -> Tensor:
    return v.half().view(torch.uint8)                   # round to nearest even, as numpy's astype(float16)


def _inverse(d: Tensor) -> Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _pack_nibbles(q: Tensor) -> Tensor:
    """(n, 32) values 0..15 -> (n, 16) bytes: q[i] in the low nibble, q[i + 16] in the high."""
    return q[:, :16] | (q[:, 16:] << 4)


def _quantize_q8_0(x: Tensor) -> Tensor:
    """d = max|x| / 127, q = round-half-away(x / d) (x * (1/d), as ggml)."""
    d = x.abs().amax(-1, keepdim=True) / 127
    v = x * _inverse(d)
    a = v.abs()
    whole = a.floor()
    q = v.sign() * (whole + (2 * (a - whole)).floor())
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=-1)


def _symmetric(x: Tensor, half: int, pack) -> Tensor:
    """Q4_0 (half 8) and Q5_0 (16): d = (the value of largest magnitude) / -half,
    q = min(trunc(x / d + half + 0.5), 2 half - 1)."""
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))     # first of equal magnitudes, as numpy
    d = peak / -half
    q = torch.trunc(x * _inverse(d) + (half + 0.5)).to(torch.uint8).clamp_(0, 2 * half - 1)
    return torch.cat([_fp16_bytes(d), pack(q)], dim=-1)


def _affine(x: Tensor, top: int, pack) -> Tensor:
    """Q4_1 (top 15) and Q5_1 (31): d = (max - min) / top, m = min, q = min(trunc((x - m) / d + 0.5), top)."""
    hi, lo = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    d = (hi - lo) / top
    q = torch.trunc((x - lo) * _inverse(d) + 0.5).to(torch.uint8).clamp_(0, top)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(lo), pack(q)], dim=-1)


def _pack_fifth_bits(q: Tensor) -> Tensor:
    """(n, 32) values 0..31 -> (n, 4) bytes qh, then (n, 16) nibbles: bit i of qh (bit i % 8 of byte
    i // 8) is value i's fifth bit, as numpy's packbits(bitorder="little")."""
    bits = (q >> 4).view(-1, 4, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)
    return torch.cat([bits.sum(-1).to(torch.uint8), _pack_nibbles(q & 15)], dim=-1)


_QUANTIZERS = {"Q8_0": _quantize_q8_0,
               "Q4_0": lambda x: _symmetric(x, 8, _pack_nibbles), "Q4_1": lambda x: _affine(x, 15, _pack_nibbles),
               "Q5_0": lambda x: _symmetric(x, 16, _pack_fifth_bits), "Q5_1": lambda x: _affine(x, 31, _pack_fifth_bits)}


def quantize(w: Tensor, qtype: str) -> Tensor:
    """float (rows, cols) -> uint8 (rows, row_bytes), byte for byte gguf.quants.quantize of the
    float32 values. The 32-value types only: gguf has no reference quantizer for the K-quants."""
    if qtype not in _QUANTIZERS:
        raise ValueError(f"quantize makes {', '.join(_QUANTIZERS)}, not {qtype!r} (K-quants come from GGUF files)")
    if w.dim() != 2:
        raise ValueError(f"quantize takes a (rows, cols) matrix, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    block = block_size(qtype)
    out = torch.empty(rows, row_bytes(qtype, cols), dtype=torch.uint8)
    step = _step_rows(cols)
    for r0 in range(0, rows, step):                     # bounded temporaries for a large matrix
        x = w[r0:r0 + step].float().reshape(-1, block)
        out[r0:r0 + step] = _QUANTIZERS[qtype](x).view(-1, out.shape[1])
    return out


# ---- test data ---------------------------------------------------------------------------------------

_FP16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q4_K": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(qtype: str, rows: int, cols: int, seed: int = 0) -> Tensor:
    """uint8 (rows, row_bytes) of random bytes whose fp16 scale fields hold 0.01..0.1 (no inf or
    nan): any type's blocks for tests and benchmarks (gguf has no K-quant quantizer)."""
    g = torch.Generator().manual_seed(seed)
    block, nbytes = _sizes(qtype)
    raw = torch.randint(0, 256, (rows, row_bytes(qtype, cols)), dtype=torch.uint8, generator=g)
    b = raw.view(rows, cols // block, nbytes)
    for at in _FP16_FIELDS[qtype]:
        scale = torch.rand(rows, cols // block, 1, generator=g) * 0.09 + 0.01
        b[..., at:at + 2] = scale.half().view(torch.uint8)
    return raw
