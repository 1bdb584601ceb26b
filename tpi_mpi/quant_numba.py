"""numba kernels for quant.py's `matmul`: x @ W^T straight from the GGML blocks, for a few tokens at a
time (decode). numba (a dependency) is imported on the first call, not with this module, so a run that
never takes this path (--matmul int8) never loads it. docs/quant-kernels.md has the measurements.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from .quant import QuantWeight, _blocks

# Plain Python, jitted on first use by _numba_kernels (so importing this module never imports numba).
# Every weight is computed exactly as the torch kernels in quant.py (same float32 products; no
# fastmath, so no contraction into fused multiply-adds) and multiplied into one of 32 or 64 float32
# lanes per token (LLVM vectorizes across lanes), rows split across threads: y[t, r] = the sum of
# token t's lanes in lane order. That is the same operations whatever T is and whatever the other
# tokens hold (batch invariance: batch.py's docstring says why); only that order of the sum
# differs from BLAS. A batch of T tokens decodes each block once, not T times.

ROWS_PER_TASK = 16       # rows of W per parallel task (the lanes are allocated per task)
_prange = range          # numba.prange once numba is loaded
_POW2 = np.array([2.0 ** (max(e, 1) - 25) for e in range(32)], np.float32)   # fp16 exponent -> its scale


def _nb_half(b, r, k, at):
    """The little-endian fp16 at bytes at, at + 1 of block (r, k), as float32 (exact: an 11-bit
    integer times a power of two; a table, not ldexp, which costs a call per block)."""
    h = (np.int32(b[r, k, at]) & 255) | ((np.int32(b[r, k, at + 1]) & 255) << 8)
    e, m = (h >> 10) & 31, h & 1023
    if e == 31:
        v = np.float32(np.inf) if m == 0 else np.float32(np.nan)
    else:
        v = np.float32(m | 1024 if e else m) * _POW2[e]
    return -v if h & 0x8000 else v


def _nb_fifth_bits(b, r, k, at):
    """Q5_0/Q5_1's qh of block (r, k): the little-endian uint32 at bytes at..at + 3, bit i value i's fifth bit."""
    return (np.int64(b[r, k, at]) | (np.int64(b[r, k, at + 1]) << 8) | (np.int64(b[r, k, at + 2]) << 16)
            | (np.int64(b[r, k, at + 3]) << 24))


def _nb_scale_min(b, r, k, j):
    """Sub-block j's 6-bit scale and min of a Q4_K/Q5_K block (as _scale_min_k4 above)."""
    if j < 4:
        return np.int32(b[r, k, 4 + j]) & 63, np.int32(b[r, k, 8 + j]) & 63
    q, lo, hi = np.int32(b[r, k, 8 + j]), np.int32(b[r, k, j]), np.int32(b[r, k, 4 + j])
    return (q & 15) | ((lo >> 6) << 4), (q >> 4) | ((hi >> 6) << 4)


# One token (T = 1, the common decode step): decode and multiply in one loop, no lanes array per
# token in memory. Same products, same lanes, same final sum as the batched kernels below, so a row's
# result does not depend on which of the two computed it (tests/test_rowwise_kernels.py checks).

def _nb_q8_0_one(b, x, y):                                  # x (cols,), y (rows,); b: int8 view
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d = _half(b, r, k, 0)
            for i in range(32):
                acc[i] += (d * np.float32(b[r, k, 2 + i])) * x[32 * k + i]
        y[r] = acc.sum()


def _nb_q4_0_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d = _half(b, r, k, 0)
            for i in range(16):
                byte = np.int32(b[r, k, 2 + i])
                acc[i] += (d * np.float32((byte & 15) - 8)) * x[32 * k + i]
                acc[16 + i] += (d * np.float32((byte >> 4) - 8)) * x[32 * k + 16 + i]
        y[r] = acc.sum()


def _nb_q4_1_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d, m = _half(b, r, k, 0), _half(b, r, k, 2)
            for i in range(16):
                byte = np.int32(b[r, k, 4 + i])
                acc[i] += (d * np.float32(byte & 15) + m) * x[32 * k + i]
                acc[16 + i] += (d * np.float32(byte >> 4) + m) * x[32 * k + 16 + i]
        y[r] = acc.sum()


def _nb_q5_0_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d, qh = _half(b, r, k, 0), _fifth_bits(b, r, k, 2)
            for i in range(16):
                byte = np.int32(b[r, k, 6 + i])
                lo = (byte & 15) | np.int32(((qh >> i) & 1) << 4)
                hi = (byte >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)
                acc[i] += (d * np.float32(lo - 16)) * x[32 * k + i]
                acc[16 + i] += (d * np.float32(hi - 16)) * x[32 * k + 16 + i]
        y[r] = acc.sum()


def _nb_q5_1_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d, m, qh = _half(b, r, k, 0), _half(b, r, k, 2), _fifth_bits(b, r, k, 4)
            for i in range(16):
                byte = np.int32(b[r, k, 8 + i])
                lo = (byte & 15) | np.int32(((qh >> i) & 1) << 4)
                hi = (byte >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)
                acc[i] += (d * np.float32(lo) + m) * x[32 * k + i]
                acc[16 + i] += (d * np.float32(hi) + m) * x[32 * k + 16 + i]
        y[r] = acc.sum()


def _nb_q4_k_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(64, np.float32)
        for k in range(nb):
            d, dmin = _half(b, r, k, 0), _half(b, r, k, 2)
            for g in range(4):                          # sub-blocks 2g (low nibbles) and 2g + 1 (high)
                sc0, mn0 = _scale_min(b, r, k, 2 * g)
                sc1, mn1 = _scale_min(b, r, k, 2 * g + 1)
                s0, m0, s1, m1 = d * np.float32(sc0), dmin * np.float32(mn0), d * np.float32(sc1), dmin * np.float32(mn1)
                at = 256 * k + 64 * g
                for i in range(32):
                    byte = np.int32(b[r, k, 16 + 32 * g + i])
                    acc[i] += (s0 * np.float32(byte & 15) - m0) * x[at + i]
                    acc[32 + i] += (s1 * np.float32(byte >> 4) - m1) * x[at + 32 + i]
        y[r] = acc.sum()


def _nb_q5_k_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(64, np.float32)
        for k in range(nb):
            d, dmin = _half(b, r, k, 0), _half(b, r, k, 2)
            for g in range(4):
                sc0, mn0 = _scale_min(b, r, k, 2 * g)
                sc1, mn1 = _scale_min(b, r, k, 2 * g + 1)
                s0, m0, s1, m1 = d * np.float32(sc0), dmin * np.float32(mn0), d * np.float32(sc1), dmin * np.float32(mn1)
                at = 256 * k + 64 * g
                for i in range(32):
                    byte = np.int32(b[r, k, 48 + 32 * g + i])
                    h = np.int32(b[r, k, 16 + i]) >> (2 * g)          # bits 2g, 2g + 1: the fifth bits
                    acc[i] += (s0 * np.float32((byte & 15) | ((h & 1) << 4)) - m0) * x[at + i]
                    acc[32 + i] += (s1 * np.float32((byte >> 4) | ((h & 2) << 3)) - m1) * x[at + 32 + i]
        y[r] = acc.sum()


def _nb_q6_k_one(b, x, y):
    rows, nb = b.shape[:2]
    for r in _prange(rows):
        acc = np.zeros(32, np.float32)
        for k in range(nb):
            d = _half(b, r, k, 208)
            for h in range(2):
                for s in range(4):                      # as _q6_k: low bits from ql, high from qh
                    shift, lo_at = np.uint32(4 * (s >> 1)), 64 * h + 32 * (s & 1)
                    sc0, sc1 = np.int32(b[r, k, 192 + 8 * h + 2 * s]), np.int32(b[r, k, 193 + 8 * h + 2 * s])
                    s0 = d * np.float32(sc0 - 256 if sc0 > 127 else sc0)          # int8 scales
                    s1 = d * np.float32(sc1 - 256 if sc1 > 127 else sc1)
                    at = 256 * k + 128 * h + 32 * s
                    for i in range(32):                 # unsigned shifts and a select: vectorized
                        lo = (np.uint32(b[r, k, lo_at + i]) >> shift) & np.uint32(15)
                        hi = (np.uint32(b[r, k, 128 + 32 * h + i]) >> np.uint32(2 * s)) & np.uint32(3)
                        sc = s0 if i < 16 else s1
                        acc[i] += (sc * np.float32(np.int32(lo | (hi << np.uint32(4))) - 32)) * x[at + i]
        y[r] = acc.sum()


# T tokens: each block decoded once into `w`, then added into every token's lanes.

def _nb_accumulate(acc, w, x, at, n):
    """acc[t, i] += w[i] * x[t, at + i] for i < n, every token t: one decoded block, all tokens.
    n arrives at run time on purpose (and the kernels' decode loops run to `lanes`, an argument,
    for the same reason): LLVM unrolls a loop of a constant 32 fully and, numba keeping SLP
    vectorization off, leaves it scalar; a loop of unknown length over 1-D views it vectorizes."""
    for t in range(acc.shape[0]):
        a, xt = acc[t], x[t, at:at + n]
        for i in range(n):
            a[i] += w[i] * xt[i]


def _nb_lane_sums(acc, y, r):
    """y[t, r] = acc[t, 0] + acc[t, 1] + ... in lane order, as numba's acc[t].sum() adds them."""
    for t in range(acc.shape[0]):
        s = np.float32(0.0)
        for i in range(acc.shape[1]):
            s += acc[t, i]
        y[t, r] = s


_half, _fifth_bits, _scale_min, _accumulate, _lane_sums = (_nb_half, _nb_fifth_bits, _nb_scale_min, _nb_accumulate,
                                                           _nb_lane_sums)


def _nb_q8_0(b, x, y, lanes):                               # b: the int8 view of the blocks
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d = _half(b, r, k, 0)
                for i in range(lanes):
                    w[i] = d * np.float32(b[r, k, 2 + i])
                _accumulate(acc, w, x, 32 * k, lanes)
            _lane_sums(acc, y, r)


def _nb_q4_0(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d = _half(b, r, k, 0)
                for i in range(lanes // 2):
                    byte = np.int32(b[r, k, 2 + i])
                    w[i] = d * np.float32((byte & 15) - 8)
                    w[16 + i] = d * np.float32((byte >> 4) - 8)
                _accumulate(acc, w, x, 32 * k, lanes)
            _lane_sums(acc, y, r)


def _nb_q4_1(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d, m = _half(b, r, k, 0), _half(b, r, k, 2)
                for i in range(lanes // 2):
                    byte = np.int32(b[r, k, 4 + i])
                    w[i] = d * np.float32(byte & 15) + m
                    w[16 + i] = d * np.float32(byte >> 4) + m
                _accumulate(acc, w, x, 32 * k, lanes)
            _lane_sums(acc, y, r)


def _nb_q5_0(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d, qh = _half(b, r, k, 0), _fifth_bits(b, r, k, 2)
                for i in range(lanes // 2):
                    byte = np.int32(b[r, k, 6 + i])
                    w[i] = d * np.float32(((byte & 15) | np.int32(((qh >> i) & 1) << 4)) - 16)
                    w[16 + i] = d * np.float32(((byte >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)) - 16)
                _accumulate(acc, w, x, 32 * k, lanes)
            _lane_sums(acc, y, r)


def _nb_q5_1(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d, m, qh = _half(b, r, k, 0), _half(b, r, k, 2), _fifth_bits(b, r, k, 4)
                for i in range(lanes // 2):
                    byte = np.int32(b[r, k, 8 + i])
                    w[i] = d * np.float32((byte & 15) | np.int32(((qh >> i) & 1) << 4)) + m
                    w[16 + i] = d * np.float32((byte >> 4) | np.int32(((qh >> (i + 16)) & 1) << 4)) + m
                _accumulate(acc, w, x, 32 * k, lanes)
            _lane_sums(acc, y, r)


def _nb_q4_k(b, x, y, lanes):                               # 64 lanes: sub-blocks 2g and 2g + 1
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d, dmin = _half(b, r, k, 0), _half(b, r, k, 2)
                for g in range(4):                      # sub-blocks 2g (low nibbles) and 2g + 1 (high)
                    sc0, mn0 = _scale_min(b, r, k, 2 * g)
                    sc1, mn1 = _scale_min(b, r, k, 2 * g + 1)
                    s0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
                    s1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
                    for i in range(lanes // 2):
                        byte = np.int32(b[r, k, 16 + 32 * g + i])
                        w[i] = s0 * np.float32(byte & 15) - m0
                        w[32 + i] = s1 * np.float32(byte >> 4) - m1
                    _accumulate(acc, w, x, 256 * k + 64 * g, lanes)
            _lane_sums(acc, y, r)


def _nb_q5_k(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d, dmin = _half(b, r, k, 0), _half(b, r, k, 2)
                for g in range(4):
                    sc0, mn0 = _scale_min(b, r, k, 2 * g)
                    sc1, mn1 = _scale_min(b, r, k, 2 * g + 1)
                    s0, m0 = d * np.float32(sc0), dmin * np.float32(mn0)
                    s1, m1 = d * np.float32(sc1), dmin * np.float32(mn1)
                    for i in range(lanes // 2):
                        byte = np.int32(b[r, k, 48 + 32 * g + i])
                        h = np.int32(b[r, k, 16 + i]) >> (2 * g)          # bits 2g, 2g + 1: the fifth bits
                        w[i] = s0 * np.float32((byte & 15) | ((h & 1) << 4)) - m0
                        w[32 + i] = s1 * np.float32((byte >> 4) | ((h & 2) << 3)) - m1
                    _accumulate(acc, w, x, 256 * k + 64 * g, lanes)
            _lane_sums(acc, y, r)


def _nb_q6_k(b, x, y, lanes):
    rows, nb = b.shape[:2]
    for task in _prange(-(-rows // ROWS_PER_TASK)):
        acc, w = np.empty((x.shape[0], lanes), np.float32), np.empty(lanes, np.float32)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            acc[:] = 0
            for k in range(nb):
                d = _half(b, r, k, 208)
                for h in range(2):
                    for s in range(4):                  # as _q6_k: low bits from ql, high from qh
                        shift, lo_at = np.uint32(4 * (s >> 1)), 64 * h + 32 * (s & 1)
                        sc0, sc1 = np.int32(b[r, k, 192 + 8 * h + 2 * s]), np.int32(b[r, k, 193 + 8 * h + 2 * s])
                        s0 = d * np.float32(sc0 - 256 if sc0 > 127 else sc0)          # int8 scales
                        s1 = d * np.float32(sc1 - 256 if sc1 > 127 else sc1)
                        for i in range(lanes):          # unsigned shifts and a select: vectorized
                            lo = (np.uint32(b[r, k, lo_at + i]) >> shift) & np.uint32(15)
                            hi = (np.uint32(b[r, k, 128 + 32 * h + i]) >> np.uint32(2 * s)) & np.uint32(3)
                            sc = s0 if i < 16 else s1
                            w[i] = sc * np.float32(np.int32(lo | (hi << np.uint32(4))) - 32)
                        _accumulate(acc, w, x, 256 * k + 128 * h + 32 * s, lanes)
            _lane_sums(acc, y, r)


_NUMBA_SOURCES = {"Q8_0": _nb_q8_0, "Q4_0": _nb_q4_0, "Q4_1": _nb_q4_1, "Q5_0": _nb_q5_0, "Q5_1": _nb_q5_1,
                  "Q4_K": _nb_q4_k, "Q5_K": _nb_q5_k, "Q6_K": _nb_q6_k}
_ONE_TOKEN = {"Q8_0": _nb_q8_0_one, "Q4_0": _nb_q4_0_one, "Q4_1": _nb_q4_1_one, "Q5_0": _nb_q5_0_one,
              "Q5_1": _nb_q5_1_one, "Q4_K": _nb_q4_k_one, "Q5_K": _nb_q5_k_one, "Q6_K": _nb_q6_k_one}
_LANES = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 64, "Q5_K": 64, "Q6_K": 32}


@functools.cache
def _numba_kernels() -> dict:
    import numba

    global _prange, _half, _fifth_bits, _scale_min, _accumulate, _lane_sums     # globals numba reads when it compiles
    _prange = numba.prange
    _half, _fifth_bits, _scale_min, _accumulate, _lane_sums = (numba.njit(f, inline="always", cache=True) for f in (
        _nb_half, _nb_fifth_bits, _nb_scale_min, _nb_accumulate, _nb_lane_sums))
    jit = numba.njit(parallel=True, fastmath=False, cache=True)
    threads = torch.get_num_threads()
    numba.get_num_threads()                             # starts numba's pool, which (sharing torch's
    torch.set_num_threads(threads)                      # libgomp) resets torch's thread count: put it back
    return {name: (jit(_ONE_TOKEN[name]), jit(fn)) for name, fn in _NUMBA_SOURCES.items()}


def matmul_numba(x: Tensor, w: QuantWeight) -> Tensor:
    """x (T, cols) @ W^T with w.qtype's numba kernel, one call for all T tokens (each block decoded
    once), on as many threads as torch uses. Row t of the result depends on x[t] and w only, bit for
    bit."""
    kernels = _numba_kernels()
    import numba
    numba.set_num_threads(min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    rows, cols = w.shape
    w = w.plain()
    b = _blocks(w.raw, w.qtype, cols)
    y = torch.empty(x.shape[0], rows)
    blocks = (b.view(torch.int8) if w.qtype == "Q8_0" else b).numpy()       # Q8_0's weights are int8
    xs, ys = x.detach().float().contiguous().numpy(), y.numpy()     # no autograd through numba
    one_token, batched = kernels[w.qtype]
    if x.shape[0] == 1:                                 # the fused kernel: 1.5-2x faster for one token
        one_token(blocks, xs[0], ys[0])
    else:
        batched(blocks, xs, ys, _LANES[w.qtype])
    return y.to(x.dtype)

