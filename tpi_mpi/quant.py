"""GGML block quantization in torch: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.

The byte layouts are llama.cpp's (ggml-common.h) as GGUF stores them: a (rows, cols) matrix is
stored row by row, each row cols/block blocks of block_bytes bytes. The arithmetic follows
gguf-py's gguf/quants.py operation by operation (same products, same order, no fused
multiply-add), so dequantize() in float32 equals gguf.quants.dequantize bit for bit; quantize.py,
beside it, writes them (gguf.quants.quantize byte for byte).

matmul(x, w) = x @ W^T without the whole W in memory: with --matmul int8, quant_int8.py's kernels.
Exactly: for a few tokens numba's kernels (quant_numba.py) compute from the blocks; else W is
dequantized a few rows at a time, each step multiplied while in cache (docs/quant-kernels.md): the
weights multiplied are exactly the dequantized ones, only the float32 sum's order differs from F.linear's.

This module owns the formats and their kernels only: no file I/O, no MPI, no model code.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from .quant_int8 import int8_on, matmul_int8, plain_layout

QK_K = 256                                              # values per K-quant super-block
QTYPES: dict[str, tuple[int, int]] = {                  # name -> (values per block, bytes per block)
    "Q8_0": (32, 34),                                   # fp16 d, 32 x int8
    "Q4_0": (32, 18),                                   # fp16 d, 16 bytes of nibbles
    "Q4_1": (32, 20),                                   # fp16 d, fp16 m, 16 bytes of nibbles
    "Q5_0": (32, 22),                                   # fp16 d, 4 bytes of fifth bits, 16 bytes of nibbles
    "Q5_1": (32, 24),                                   # fp16 d, fp16 m, 4 bytes of fifth bits, 16 of nibbles
    "Q4_K": (QK_K, 144),                                # fp16 d, dmin, 12 bytes of 6-bit scales/mins, 128 nibbles
    "Q5_K": (QK_K, 176),                                # as Q4_K + 32 bytes of fifth bits
    "Q6_K": (QK_K, 210),                                # 128 low nibbles, 64 of 2-bit highs, 16 int8 scales, fp16 d
}

# Dequantize and matmul work in steps of about this many values (4 MiB of float32): the step just
# dequantized is still in cache when it is multiplied or copied. A whole 4096 x 2752 matrix at once
# writes 45 MB that a fresh allocation first page-faults in (13 ms on a 2-core VM, more than the
# arithmetic). See docs/quant-kernels.md.
STEP_VALUES = 1 << 20


class _Scratch(threading.local):
    """Per-thread buffers, reused, for a step's temporaries (its float32 values, unpacked bytes,
    scales). A fresh tensor of a few hundred KiB may come from mmap, page-faulted in at every call
    and given back on free: the stepped matmul ran at 4 ms in one process and 19 ms in another
    before these buffers. Bounded by the step size: about 10 MiB per thread."""

    def __init__(self) -> None:
        self.bufs: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < n:
            with torch.inference_mode(False):       # a normal tensor: writable in and out of inference mode
                buf = self.bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


_scratch = _Scratch()


def _sizes(qtype: str) -> tuple[int, int]:
    try:
        return QTYPES[qtype]
    except KeyError:
        raise ValueError(f"unknown quantization type {qtype!r}: one of {', '.join(QTYPES)}") from None


def block_size(qtype: str) -> int:
    """Values per block: 32, or 256 for the K-quants."""
    return _sizes(qtype)[0]


def row_bytes(qtype: str, cols: int) -> int:
    """Bytes of one stored row: cols / block_size * bytes per block."""
    block, nbytes = _sizes(qtype)
    if cols <= 0 or cols % block:
        raise ValueError(f"{qtype} stores a row in blocks of {block} values: {cols} columns is not a multiple of {block}")
    return cols // block * nbytes


def _blocks(raw: Tensor, qtype: str, cols: int) -> Tensor:
    """uint8 (rows, row_bytes) -> (rows, n_blocks, block_bytes), a view when raw allows one."""
    block, nbytes = _sizes(qtype)
    rb = row_bytes(qtype, cols)
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != rb:
        raise ValueError(f"{qtype} x {cols} columns is stored as uint8 (rows, {rb}); got {raw.dtype} {tuple(raw.shape)}")
    return raw.reshape(raw.shape[0], cols // block, nbytes)


# ---- per type: block bytes b (r, nb, block_bytes) -> out (r, nb, block) float32 -------------------
# Small integers are assembled in uint8 on whole contiguous blocks (fast; on a slice of 16 or 32
# bytes per block the same op is 10x slower), copied to float32 (exact), then scaled in place.
# Each float step is gguf's: same operands, same order, no fused multiply-add.

def _f16(b: Tensor, at: int, name: str) -> Tensor:
    """The fp16 field at byte `at` of every block, as float32 (r, nb, 1)."""
    field = b[..., at:at + 2]
    try:
        half = field.view(torch.float16)
    except RuntimeError:                                # raw starts at an odd byte of its buffer
        half = field.contiguous().view(torch.float16)
    return _scratch(name, half.shape).copy_(half)


def _nibbles(b: Tensor) -> tuple[Tensor, Tensor]:
    """Every byte's low and high nibble, (r, nb, block_bytes) uint8 each."""
    lo = torch.bitwise_and(b, 15, out=_scratch("lo", b.shape, torch.uint8))
    hi = torch.bitwise_right_shift(b, 4, out=_scratch("hi", b.shape, torch.uint8))
    return lo, hi


def _q8_0(b: Tensor, out: Tensor) -> None:
    """w = d * q, q int8."""
    out.copy_(b[..., 2:].view(torch.int8))
    out.mul_(_f16(b, 0, "d"))


def _q4_0(b: Tensor, out: Tensor) -> None:
    """w = d * (q - 8); byte j of a block holds q[j] (low nibble) and q[j + 16] (high)."""
    r, nb = b.shape[:2]
    lo, hi = (v.sub_(8).view(torch.int8) for v in _nibbles(b))               # uint8 wraps: -8..7
    o = out.view(r, nb, 2, 16)
    o[:, :, 0].copy_(lo[..., 2:])
    o[:, :, 1].copy_(hi[..., 2:])
    out.mul_(_f16(b, 0, "d"))


def _q4_1(b: Tensor, out: Tensor) -> None:
    """w = d * q + m, nibbles as in Q4_0 (no offset)."""
    r, nb = b.shape[:2]
    lo, hi = _nibbles(b)
    o = out.view(r, nb, 2, 16)
    o[:, :, 0].copy_(lo[..., 4:])
    o[:, :, 1].copy_(hi[..., 4:])
    out.mul_(_f16(b, 0, "d")).add_(_f16(b, 2, "m"))


def _scale_min_k4(s: Tensor) -> tuple[Tensor, Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (ggml get_scale_min_k4):
    sub-blocks 0-3 use the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); sub-blocks 4-7 take
    their low 4 bits from bytes 8-11 (scale: low nibble, min: high nibble) and their top 2 bits from
    the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k4_scales(b: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K: (d * scale_j, dmin * min_j) per 32-value sub-block j, float32 (r, nb, 8, 1)."""
    sc, mn = _scale_min_k4(b[..., 4:16])
    ds = torch.mul(_f16(b, 0, "d"), sc, out=_scratch("ds", sc.shape))
    dm = torch.mul(_f16(b, 2, "m"), mn, out=_scratch("dm", mn.shape))
    return ds.unsqueeze(-1), dm.unsqueeze(-1)


def _q4_k(b: Tensor, out: Tensor) -> None:
    """w = (d * scale_j) * q - dmin * min_j in sub-block j of 32; byte i of the 32-byte group g holds
    q of sub-block 2g (low nibble) and 2g + 1 (high)."""
    r, nb = b.shape[:2]
    lo, hi = _nibbles(b)
    o = out.view(r, nb, 4, 2, 32)
    o[..., 0, :].copy_(lo[..., 16:].view(r, nb, 4, 32))
    o[..., 1, :].copy_(hi[..., 16:].view(r, nb, 4, 32))
    ds, dm = _k4_scales(b)
    out.view(r, nb, 8, 32).mul_(ds).sub_(dm)


def _high_bits(qh: Tensor, q: Tensor, planes: int, bits: int) -> None:
    """q[..., p, :] |= ((qh >> bits * p) & mask) << 4 for each plane p: q (r, nb, ..., planes, n)
    takes its bits above the nibble from qh (r, nb, ..., n)."""
    qh = _scratch("qh", qh.shape, torch.uint8).copy_(qh)     # contiguous: `planes` passes over it
    plane = _scratch("plane", qh.shape, torch.uint8)
    for p in range(planes):                             # bit planes, not a loop over blocks or rows
        torch.bitwise_right_shift(qh, bits * p, out=plane)
        plane.bitwise_and_((1 << bits) - 1).bitwise_left_shift_(4)
        q.select(-2, p).bitwise_or_(plane)


def _q5_values(b: Tensor, qh_at: int) -> Tensor:
    """Q5_0/Q5_1's 5-bit values, (r, nb, 32) uint8: nibbles as in Q4_0 (from byte qh_at + 4 on), and
    value i's fifth bit is bit i of the little-endian uint32 at qh_at (bit i % 8 of byte i // 8)."""
    r, nb = b.shape[:2]
    lo, hi = _nibbles(b)
    q = _scratch("q", (r, nb, 32), torch.uint8)
    qv = q.view(r, nb, 2, 16)
    qv[:, :, 0].copy_(lo[..., qh_at + 4:])
    qv[:, :, 1].copy_(hi[..., qh_at + 4:])
    by_bit = q.view(r, nb, 4, 8).transpose(-1, -2)      # (r, nb, bit, byte): plane p is bit p of each byte
    _high_bits(b[..., qh_at:qh_at + 4], by_bit, planes=8, bits=1)
    return q


def _q5_0(b: Tensor, out: Tensor) -> None:
    """w = d * (q - 16), q 5 bits."""
    out.copy_(_q5_values(b, 2).sub_(16).view(torch.int8))                  # uint8 wraps: -16..15
    out.mul_(_f16(b, 0, "d"))


def _q5_1(b: Tensor, out: Tensor) -> None:
    """w = d * q + m, q 5 bits (no offset)."""
    out.copy_(_q5_values(b, 4))
    out.mul_(_f16(b, 0, "d")).add_(_f16(b, 2, "m"))


def _q5_k(b: Tensor, out: Tensor) -> None:
    """Q4_K plus a fifth bit: q = nibble | (bit j of qh[i]) << 4 for value i of sub-block j."""
    r, nb = b.shape[:2]
    lo, hi = _nibbles(b)
    q = _scratch("q", (r, nb, 8, 32), torch.uint8)
    qv = q.view(r, nb, 4, 2, 32)
    qv[..., 0, :].copy_(lo[..., 48:].view(r, nb, 4, 32))
    qv[..., 1, :].copy_(hi[..., 48:].view(r, nb, 4, 32))
    _high_bits(b[..., 16:48], q, planes=8, bits=1)
    out.copy_(q.view(r, nb, 256))
    ds, dm = _k4_scales(b)
    out.view(r, nb, 8, 32).mul_(ds).sub_(dm)


def _q6_k(b: Tensor, out: Tensor) -> None:
    """w = (d * scale_k) * (q - 32), q 6 bits, int8 scale_k per 16 values. In each half h of 128
    values, 32-value group s takes its low 4 bits from ql[64h + 32(s % 2) + i] (low nibble for
    s < 2, high for s >= 2) and its high 2 bits from bits 2s, 2s+1 of qh[32h + i]."""
    r, nb = b.shape[:2]
    lo, hi = _nibbles(b)
    q = _scratch("q", (r, nb, 2, 4, 32), torch.uint8)
    qv = q.view(r, nb, 2, 2, 64)
    qv[..., 0, :].copy_(lo[..., 0:128].view(r, nb, 2, 64))
    qv[..., 1, :].copy_(hi[..., 0:128].view(r, nb, 2, 64))
    _high_bits(b[..., 128:192].view(r, nb, 2, 32), q, planes=4, bits=2)
    out.copy_(q.sub_(32).view(torch.int8).view(r, nb, 256))
    sc = b[..., 192:208].view(torch.int8)
    ds = torch.mul(_f16(b, 208, "d"), sc, out=_scratch("ds", sc.shape))       # (r, nb, 16)
    out.view(r, nb, 16, 16).mul_(ds.unsqueeze(-1))


_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k,
            "Q6_K": _q6_k}


def _step_rows(cols: int) -> int:
    return max(1, STEP_VALUES // cols)


def _dequantize_into(raw: Tensor, qtype: str, cols: int, out: Tensor) -> None:
    """raw (r, row_bytes) -> out (r, cols) float32 contiguous, in one step."""
    block = block_size(qtype)
    _KERNELS[qtype](_blocks(raw, qtype, cols), out.view(raw.shape[0], cols // block, block))


def dequantize(raw: Tensor, qtype: str, cols: int, dtype: torch.dtype = torch.float32,
               out: Tensor | None = None) -> Tensor:
    """uint8 (rows, row_bytes) -> (rows, cols) in dtype: computed in float32 (equal to
    gguf.quants.dequantize bit for bit), then cast. `out`: a contiguous (rows, cols) tensor of
    `dtype` to write into instead of a new one (a reused buffer is not page-faulted in again)."""
    _blocks(raw, qtype, cols)                           # refuses a wrong shape before anything is written
    rows = raw.shape[0]
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif out.shape != (rows, cols) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} ({rows}, {cols}); got {out.dtype} {tuple(out.shape)}")
    step = _step_rows(cols)
    f32 = None if dtype == torch.float32 else _scratch("step", (min(step, rows), cols))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        if f32 is None:
            _dequantize_into(raw[r0:r1], qtype, cols, out[r0:r1])
        else:
            _dequantize_into(raw[r0:r1], qtype, cols, f32[:r1 - r0])
            out[r0:r1].copy_(f32[:r1 - r0])
    return out


# ---- the quantized matrix the model holds -----------------------------------------------------------

@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A (rows, cols) matrix as GGML blocks: raw is uint8 (rows, row_bytes(qtype, cols)), its rows in
    groups of 8 stored column by column if `interleaved` (the int8 kernels' layout: quant_int8.pack_rows)."""
    raw: Tensor
    qtype: str
    cols: int
    interleaved: bool = False

    def __post_init__(self) -> None:
        _blocks(self.raw, self.qtype, self.cols)

    @property
    def shape(self) -> tuple[int, int]:
        return self.raw.shape[0], self.cols

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def plain(self) -> QuantWeight:
        """The matrix in the stored layout, row after row."""
        return plain_layout(self) if self.interleaved else self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.plain().raw, self.qtype, self.cols, dtype)

    def rows(self, ids, dtype: torch.dtype = torch.float32) -> Tensor:
        """Only rows `ids` dequantized, (len(ids), cols): an embedding lookup."""
        idx = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
        return dequantize(self.plain().raw.index_select(0, idx), self.qtype, self.cols, dtype)


# ---- matmul -----------------------------------------------------------------------------------------

NUMBA_MAX_T = 4          # tokens up to which the numba kernels are used (a call per token), above: steps
TORCH_F32_MAX_T = 8      # bf16/fp16 x with at most this many tokens is multiplied in float32 (faster there)


def matmul(x: Tensor, w: QuantWeight) -> Tensor:
    """x (..., cols) -> x @ W^T (..., rows) in x.dtype: int8 kernels (use_int8), else exact (see above)."""
    if x.shape[-1] != w.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the {w.qtype} matrix {w.shape} takes {w.cols}")
    x2 = x.reshape(-1, w.cols)
    if int8_on():
        y = matmul_int8(x2, w).to(x.dtype)
    else:
        w = w.plain()
        from .quant_numba import matmul_numba   # numba is imported on first use only
        y = matmul_numba(x2, w) if x2.shape[0] <= NUMBA_MAX_T else matmul_steps(x2, w)
    return y.reshape(*x.shape[:-1], w.shape[0])


def matmul_steps(x: Tensor, w: QuantWeight) -> Tensor:
    """x (T, cols) @ W^T, W dequantized STEP_VALUES at a time into a reused buffer, each step
    multiplied with torch.mm while in cache. float32 x: in float32. bf16/fp16 x: in float32 up to
    TORCH_F32_MAX_T tokens (then cast), else the step is cast to x.dtype (bf16 GEMM is faster)."""
    rows, cols = w.shape
    in_f32 = x.dtype == torch.float32 or x.shape[0] <= TORCH_F32_MAX_T
    xc = x.float() if in_f32 else x
    step = min(_step_rows(cols), rows)
    buf = _scratch("step", (step, cols))
    low = None if in_f32 else _scratch("step_low", (step, cols), x.dtype)
    yt = torch.empty(rows, x.shape[0], dtype=xc.dtype)  # y^T: a step of W fills contiguous rows
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        ws = buf[:r1 - r0]
        _dequantize_into(w.raw[r0:r1], w.qtype, cols, ws)
        if low is not None:
            ws = low[:r1 - r0].copy_(ws)
        if x.shape[0] == 1:             # not BLAS: MKL's threaded gemv between these small torch ops
            torch.sum(ws.mul_(xc), 1, keepdim=True, out=yt[r0:r1])    # took 15 ms instead of 2.5 at times
        else:
            torch.mm(ws, xc.t(), out=yt[r0:r1])
    return yt.t().to(x.dtype).contiguous()
