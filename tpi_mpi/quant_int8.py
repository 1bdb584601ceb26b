"""x @ W^T for GGML block weights the way llama.cpp decodes on a CPU: each token's activations cut
into blocks of 32 values stored as int8 with a float scale, each weight block meeting its activation
block in an integer dot product (tpi_mpi/csrc/qdot.c, compiled at install as tpi_mpi._qdot).

Not exact: the activations lose what 8 bits per value against their block's largest loses
(docs/quant-kernels.md measures the perplexity it costs). quant.py keeps the exact float path, and
takes this one only where the run asks for it (use_int8, set from --matmul). A row's result is the
same whatever the other tokens of the call hold (batch invariance, batch.py).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref

import torch
from torch import Tensor

from .errors import ConfigError

TYPE_IDS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "Q5_0": 6, "Q5_1": 7,   # qdot.h's enum
            "F16": 8, "BF16": 9}
MAX_TOKENS = 256          # tokens a call of the kernel takes; more are cut into calls of this many
_threads = 0              # the kernels' threads (set_threads); 0: torch's count
_on = False               # the process's choice (use_int8): a run's --matmul


@functools.cache
def _qdot():
    try:
        from . import _qdot
    except ImportError:                                   # built without a C compiler: see setup.py
        return None
    return _qdot


def int8_available() -> bool:
    return _qdot() is not None


def instruction_set() -> str:
    """'avx512vnni' (AVX2 with 256-bit VNNI dot products), 'avx2', 'generic' (the portable C loops) or
    'none' (not compiled)."""
    return _qdot().isa() if int8_available() else "none"


def int8_chosen(matmul: str, dtype: str) -> bool:
    """--matmul's choice: int8 where asked, or by default unless --dtype fp32 asks for float32 throughout
    (the file's own numbers) or the kernels were not built."""
    return matmul == "int8" or (matmul == "auto" and dtype != "fp32" and int8_available())


def use_int8(on: bool) -> None:
    """Multiply quantized matrices with these kernels from now on (quant.matmul, parallel.project), or
    on the exact path: a process-wide choice, as torch's thread count is."""
    global _on
    if on and not int8_available():
        raise ConfigError("--matmul int8 needs tpi_mpi._qdot, which was not compiled at install (no C compiler?): "
                          "install gcc and reinstall, or use --matmul exact")
    _on = on


def int8_on() -> bool:
    return _on


def set_threads(n: int) -> None:
    """Threads for the kernels from now on (0: torch.get_num_threads() at each call)."""
    global _threads
    _threads = n


def kernel_threads() -> int:
    return _threads or torch.get_num_threads()


def matmul_int8(x: Tensor, w) -> Tensor:
    """x (T, cols) float -> x @ W^T (T, rows) float32, W a quant.QuantWeight."""
    return matmul_int8_many(x, (w,))[0]


def matmul_int8_many(x: Tensor, weights) -> list[Tensor]:
    """x @ W^T for each of up to 4 QuantWeights of x's columns, x quantized once (float32 results).
    Lean on purpose: at SmolLM2's sizes a call computes in 10-30 us, as long as a few tensor methods."""
    cols = x.shape[-1]
    mats = [describe(w) for w in weights]
    for w in weights:
        if w.shape[1] != cols:
            raise ValueError(f"x has {cols} features, a matrix {tuple(w.shape)} takes {w.shape[1]}")
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    T = xf.shape[0]
    ys = [torch.empty(T, m[2], dtype=torch.float32) for m in mats]
    threads = kernel_threads()
    x_at, y_at = xf.data_ptr(), [y.data_ptr() for y in ys]
    for t0 in range(0, T, MAX_TOKENS):                 # pointers advanced by hand: indexing costs a few us
        call = [(qt, w, rows, y + 4 * t0 * rows, il) for (qt, w, rows, il), y in zip(mats, y_at)]
        _qdot().matmul(call, cols, x_at + 4 * t0 * cols, min(MAX_TOKENS, T - t0), threads)
    return ys


_described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # QuantWeight -> the kernel's tuple


FLOAT_TYPES = {torch.float16: "F16", torch.bfloat16: "BF16"}   # float weights the kernels take (floats.c)


def takes(w) -> bool:
    """Whether the kernels multiply by w: a QuantWeight of a type they know, or a 16-bit float matrix
    (its rows widened to float32 in registers, with float32 activations: no 8-bit step there)."""
    if isinstance(w, Tensor):
        return w.dtype in FLOAT_TYPES and w.dim() == 2 and w.shape[1] % 32 == 0 and w.is_contiguous()
    return w.qtype in TYPE_IDS


def describe(w) -> tuple:
    """(type id, address, rows, interleaved) of a QuantWeight, checked once (it is immutable), or of a
    16-bit float matrix (see `takes`)."""
    if isinstance(w, Tensor):
        return TYPE_IDS[FLOAT_TYPES[w.dtype]], w.data_ptr(), w.shape[0], False
    known = _described.get(w)
    if known is not None:
        return known
    if not w.raw.is_contiguous():
        raise ValueError("the int8 kernels read contiguous blocks")
    _described[w] = (TYPE_IDS[w.qtype], w.raw.data_ptr(), w.raw.shape[0], w.interleaved)
    return _described[w]


# ---- the interleaved layout ---------------------------------------------------------------------------
# The kernels compute 8 rows at a time. Each group of 8 rows is stored block column by block column: within
# a column, the 8 rows' leading 2-byte fields (scale; min) side by side, then the rest of their blocks 4 bytes
# at a time (row 0's first 4, row 1's, ..., row 7's, row 0's next 4, ...), then their trailing 2-byte fields
# (Q6_K's scale; qdot.h's packed_at). One stream for the prefetchers, and one vector load holds 4 bytes of
# every row, so a row's integer sum builds up in its own lane with no horizontal adds. Measured on a 2-core
# EPYC (docs/quant-kernels.md): 7B Q4_0 decode 0.21-0.27 -> 0.17 s a token. The last rows % 8 rows stay row
# after row. prepare.py writes matrices so; the kernels regroup, in place, the ones of a shard prepared before.

# each type's 2-byte fields: (bytes before its 4-byte chunks, bytes after them), qdot.h's packed_lead/packed_tail
FIELDS = {"Q8_0": (2, 0), "Q4_0": (2, 0), "Q4_1": (4, 0), "Q5_0": (2, 0), "Q5_1": (4, 0),
          "Q4_K": (4, 0), "Q5_K": (4, 0), "Q6_K": (0, 2)}
INTERLEAVED_TYPES = tuple(FIELDS)


def _block_bytes(qtype: str) -> int:
    from .quant import QTYPES                           # quant.py imports this module
    return QTYPES[qtype][1]


def _regroup(raw: Tensor, block_bytes: int, to_interleaved: bool) -> None:
    if not raw.is_contiguous():
        raise ValueError("the int8 kernels read contiguous blocks")
    _qdot().regroup(raw.data_ptr(), raw.shape[0], raw.shape[1], block_bytes, to_interleaved)


def _parts(qtype: str) -> tuple[int, int, int]:
    """A block's bytes and where its 4-byte chunks start and end."""
    bb, (lead, trail) = _block_bytes(qtype), FIELDS[qtype]
    return bb, lead, bb - trail


def pack_rows(raw: Tensor, qtype: str) -> Tensor:
    """A stored (rows, bytes) matrix in the interleaved layout, as a new tensor (torch's indexing, so no
    compiled kernel is needed: prepare.py writes shards so)."""
    bb, lead, tail, g = *_parts(qtype), raw.shape[0] // 8 * 8
    columns = raw[:g].reshape(g // 8, 8, -1, bb).transpose(1, 2)                  # (group, column, row, bytes)
    parts = [(columns[..., a:b], n) for a, b, n in ((0, lead, 2), (lead, tail, 4), (tail, bb, 2)) if b > a]
    units = [part.unflatten(-1, (-1, n)).transpose(2, 3).flatten(2) for part, n in parts]   # (.., unit, row, n)
    return torch.cat([torch.cat(units, dim=-1).reshape(g, -1), raw[g:]])


def unpack_rows(raw: Tensor, qtype: str) -> Tensor:
    """pack_rows undone, as a new tensor."""
    bb, lead, tail, g = *_parts(qtype), raw.shape[0] // 8 * 8
    columns = raw[:g].reshape(g // 8, -1, 8 * bb)                                 # (group, column, 8 rows' bytes)
    parts = [(columns[..., 8 * a:8 * b], n) for a, b, n in ((0, lead, 2), (lead, tail, 4), (tail, bb, 2)) if b > a]
    rows = [part.unflatten(-1, (-1, 8, n)).transpose(2, 3).flatten(3) for part, n in parts]   # (.., column, row, bytes)
    return torch.cat([torch.cat(rows, dim=-1).transpose(1, 2).reshape(g, -1), raw[g:]])


def interleave(w):
    """A QuantWeight in the interleaved layout, if its type has one (else w itself). Its bytes are
    regrouped in place: w is not to be used afterwards (made for blocks just read from disk)."""
    if w.interleaved or w.qtype not in INTERLEAVED_TYPES or w.raw.shape[0] < 8:
        return w
    _regroup(w.raw, _block_bytes(w.qtype), True)
    return dataclasses.replace(w, interleaved=True)


def plain_layout(w):
    """An interleaved QuantWeight's copy in the stored layout."""
    if not int8_available():
        return dataclasses.replace(w, raw=unpack_rows(w.raw, w.qtype), interleaved=False)
    raw = w.raw.clone()
    _regroup(raw, _block_bytes(w.qtype), False)
    return dataclasses.replace(w, raw=raw, interleaved=False)


def interleaved(tensors: dict) -> dict:
    """A block's tensors with each quantized matrix interleaved, in place (once, for blocks kept in memory)."""
    from .quant import QuantWeight                      # quant.py imports this module
    return {n: interleave(t) if isinstance(t, QuantWeight) else t for n, t in tensors.items()}
