"""x @ W^T for GGML block weights the way llama.cpp decodes on a CPU: each token's activations cut
into blocks of 32 values stored as int8 with a float scale, each weight block meeting its activation
block in an integer dot product (tpi_mpi/csrc/qdot.c, compiled at install as tpi_mpi._qdot).

Not exact: the activations lose what 8 bits per value against their block's largest loses
(docs/quant-kernels.md measures the perplexity it costs). quant.py keeps the exact float path, and
takes this one only where the run asks for it (quant.set_int8). A row's result is the same whatever
the other tokens of the call hold (batch invariance, batch.py).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

TYPE_IDS = {"Q8_0": 0, "Q4_0": 1, "Q4_1": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5}    # qdot.c's enum
MAX_TOKENS = 256          # tokens a call of the kernel takes; more are cut into calls of this many


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
    """'avx2', 'generic' (the portable C loops) or 'none' (not compiled)."""
    return _qdot().isa() if int8_available() else "none"


def matmul_int8(x: Tensor, w) -> Tensor:
    """x (T, cols) float -> x @ W^T (T, rows) float32, W a quant.QuantWeight."""
    kernel = _qdot()
    rows, cols = w.shape
    xf = x.to(torch.float32).contiguous()
    y = torch.empty(xf.shape[0], rows, dtype=torch.float32)
    raw = w.raw if w.raw.is_contiguous() else w.raw.contiguous()
    threads = torch.get_num_threads()
    for t0 in range(0, xf.shape[0], MAX_TOKENS):
        xt, yt = xf[t0:t0 + MAX_TOKENS], y[t0:t0 + MAX_TOKENS]
        kernel.matmul(TYPE_IDS[w.qtype], raw.data_ptr(), rows, cols, xt.data_ptr(), xt.shape[0], yt.data_ptr(), threads)
    return y
