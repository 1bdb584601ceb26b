"""Batch-invariant x @ W^T for float weights (float32, bf16, fp16), numba kernels for decode steps.

Why not F.linear: BLAS picks its blocking by the number of rows, so row 0 of a (T, in) @ W^T
differs in the last bits between T = 1, 2, 8, and greedy text would change with the batch it ran
in. Here every output element is summed in float32 in LANES fixed lanes along `in` (lane i takes
the columns i, i + LANES, ...), then the lanes are added in order: the same operations whatever T
is and whatever the other rows hold. Each row of W is read from memory once per call for all T
tokens (a step's cost grows far slower than T). No fastmath: no reassociation, no fused
multiply-adds, so LLVM may vectorize across lanes and tokens but never changes a sum.

numba is imported on first use (`dense_numba_available`), never at import. Like quant_numba.py,
this module keeps its own copy of the lane helpers: numba's cache only notices changes to a
kernel's own file.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

LANES = 32
ROWS_PER_TASK = 16                     # rows of W per parallel task
_prange = range                        # numba.prange once numba is loaded
_F16_SCALE = np.float32(2.0 ** 112)     # fp16 bits << 13 read as float32 are the value / 2^112


def _nb_accumulate(acc, w, x, at, n):
    """acc[t, i] += w[i] * x[t, at + i] for i < n, every token t: one decoded block, all tokens.
    n arrives at run time on purpose: LLVM unrolls a loop of a constant 32 fully and (numba keeps
    SLP vectorization off) leaves it scalar; a loop of unknown length over 1-D views it vectorizes."""
    for t in range(acc.shape[0]):
        a, xt = acc[t], x[t, at:at + n]
        for i in range(n):
            a[i] += w[i] * xt[i]


def _nb_lane_sums(acc, y, r):
    """y[t, r] = acc[t, 0] + acc[t, 1] + ... in lane order (0 + the first lane is exact)."""
    for t in range(acc.shape[0]):
        s = np.float32(0.0)
        for i in range(acc.shape[1]):
            s += acc[t, i]
        y[t, r] = s


_accumulate, _lane_sums = _nb_accumulate, _nb_lane_sums    # jitted by _numba_kernels


def _nb_dense_f32(w, x, y, lanes):     # w (out, in) float32, x (T, in) float32, y (T, out) float32
    out, n = w.shape
    for task in _prange(-(-out // ROWS_PER_TASK)):      # acc allocated per task, not per row
        acc = np.empty((x.shape[0], lanes), np.float32)
        for r in range(task * ROWS_PER_TASK, min(out, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for at in range(0, n, lanes):
                m = min(lanes, n - at)
                _accumulate(acc, w[r, at:at + m], x, at, m)
            _lane_sums(acc, y, r)


def _nb_dense_bf16(w, x, y, lanes):    # w: the uint16 bits of bf16 weights
    out, n = w.shape
    for task in _prange(-(-out // ROWS_PER_TASK)):
        acc = np.empty((x.shape[0], lanes), np.float32)
        bits = np.empty(lanes, np.uint32)
        wf = bits.view(np.float32)
        for r in range(task * ROWS_PER_TASK, min(out, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for at in range(0, n, lanes):
                m = min(lanes, n - at)
                for i in range(m):                      # bf16 is the top half of a float32
                    bits[i] = np.uint32(w[r, at + i]) << np.uint32(16)
                _accumulate(acc, wf, x, at, m)
            _lane_sums(acc, y, r)


def _nb_dense_f16(w, x, y, lanes):     # w: the uint16 bits of fp16 weights
    out, n = w.shape
    for task in _prange(-(-out // ROWS_PER_TASK)):
        acc = np.empty((x.shape[0], lanes), np.float32)
        bits = np.empty(lanes, np.uint32)
        scale = np.empty(lanes, np.float32)
        wf = bits.view(np.float32)
        for r in range(task * ROWS_PER_TASK, min(out, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for at in range(0, n, lanes):
                m = min(lanes, n - at)
                for i in range(m):      # exponent and mantissa moved to float32's place, then times
                    h = np.uint32(w[r, at + i])     # 2^112 (exact, subnormals too); inf and NaN take
                    em = h & np.uint32(0x7FFF)       # float32's all-ones exponent instead
                    big = em >= np.uint32(0x7C00)
                    bits[i] = ((h & np.uint32(0x8000)) << np.uint32(16)) | (em << np.uint32(13)) | (
                        np.uint32(0x7F800000) if big else np.uint32(0))
                    scale[i] = np.float32(1.0) if big else _F16_SCALE
                for i in range(m):
                    wf[i] *= scale[i]
                _accumulate(acc, wf, x, at, m)
            _lane_sums(acc, y, r)


_SOURCES = {torch.float32: _nb_dense_f32, torch.bfloat16: _nb_dense_bf16, torch.float16: _nb_dense_f16}


@functools.cache
def _numba_kernels() -> dict | None:
    try:
        import numba
    except ImportError:
        return None
    global _prange, _accumulate, _lane_sums             # globals numba reads when it compiles the kernels
    _prange = numba.prange
    _accumulate, _lane_sums = (numba.njit(f, inline="always", cache=True) for f in (_nb_accumulate, _nb_lane_sums))
    jit = numba.njit(parallel=True, fastmath=False, cache=True)
    threads = torch.get_num_threads()
    numba.get_num_threads()                             # starts numba's pool, which (sharing torch's
    torch.set_num_threads(threads)                      # libgomp) resets torch's thread count: put it back
    return {dtype: jit(fn) for dtype, fn in _SOURCES.items()}


def dense_numba_available() -> bool:
    return _numba_kernels() is not None


def matmul_dense_numba(x: Tensor, w: Tensor) -> Tensor:
    """x (T, in) float32/bf16/fp16 @ w^T, w (out, in) float32/bf16/fp16 -> (T, out) in x.dtype,
    summed in float32 as the module docstring says (row t of the result depends on x[t] and w only),
    on as many threads as torch uses. Raises RuntimeError when numba is missing."""
    kernels = _numba_kernels()
    if kernels is None:
        raise RuntimeError("matmul_dense_numba needs numba (pip install numba)")
    if w.dtype not in kernels:
        raise ValueError(f"matmul_dense_numba takes float32, bfloat16 or float16 weights, not {w.dtype}")
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} @ w^T needs x (T, in) and w (out, in), w is {tuple(w.shape)}")
    import numba
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    wc = w.detach().contiguous()
    wn = (wc if w.dtype == torch.float32 else wc.view(torch.int16)).numpy()
    if w.dtype != torch.float32:
        wn = wn.view(np.uint16)                          # unsigned: widening must not copy the sign
    xs = x.detach().float().contiguous().numpy()       # bf16/fp16 -> float32 is exact
    y = torch.empty(x.shape[0], w.shape[0])
    kernels[w.dtype](wn, xs, y.numpy(), LANES)
    return y.to(x.dtype)
