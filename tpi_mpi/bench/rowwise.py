"""`bench rows`: the batch-invariant decode kernels against what they replace, ms per call for
T = 1 and T = 8 rows: float weights through parallel.linear_rows (BLAS in a row-count band, what
serving uses) against plain F.linear, GGML blocks (quant_numba) against a call per row.

    python -m tpi_mpi bench rows --threads 2 [--repeats 30] [--out FILE]

Each op is timed in 3 rounds (a warm-up call, then a third of --repeats calls back to back, the
ops interleaved so a noisy spell hits them all); the table shows medians. Not run by the tests.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .. import quant as Q
from .. import quantize as QZ
from .. import quant_numba as QN
from ..parallel import linear_rows
from .record import append_json, git_commit, host_fields

DENSE_SHAPES = [(1536, 576), (576, 1536), (4096, 4096), (11008 // 4, 4096)]
QUANT_SHAPE = (2752, 4096)
TOKENS = (1, 8)


def time_ops(ops: dict, repeats: int, rounds: int = 3) -> dict:
    times = {k: [] for k in ops}
    for _ in range(rounds):
        for k, f in ops.items():
            f()
            for _ in range(max(1, repeats // rounds)):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def dense_rows(dtype: torch.dtype, repeats: int, out: str | None) -> None:
    print(f"\nfloat weights, {dtype}, ms: F.linear | linear_rows (served)")
    for rows, n in DENSE_SHAPES:
        w = (torch.randn(rows, n) * 0.02).to(dtype)
        xs = {T: torch.randn(T, n).to(dtype) for T in TOKENS}
        linear_rows(xs[1], w)                                    # its band probe, once per shape
        ops = {}
        for T in TOKENS:
            ops[("linear", T)] = lambda T=T: F.linear(xs[T], w)
            ops[("rows", T)] = lambda T=T: linear_rows(xs[T], w)
        ms = time_ops(ops, repeats)
        cells = [f"T={T}: {ms[('linear', T)]:7.3f} | {ms[('rows', T)]:7.3f}" for T in TOKENS]
        print(f"  {rows:>5}x{n:<5} " + "   ".join(cells))
        append_json(out, {"bench": "rows", "dtype": str(dtype), "shape": [rows, n], "threads": torch.get_num_threads(),
                          **{f"{k}_T{T}_ms": v for (k, T), v in ms.items()}, "commit": git_commit(), **host_fields()})


def quant_rows(repeats: int, out: str | None) -> None:
    rows, cols = QUANT_SHAPE
    print(f"\nGGML blocks, {rows}x{cols}, float32 x, ms: T=1 | T=8 a call per row (before) | T=8 one call")
    x = torch.randn(8, cols)
    for qtype in Q.QTYPES:
        raw = QZ.quantize(torch.randn(rows, cols) * 0.02, qtype) if Q.block_size(qtype) == 32 \
            else QZ.random_blocks(qtype, rows, cols)
        w = Q.QuantWeight(raw, qtype, cols)
        ms = time_ops({
            "one": lambda: QN.matmul_numba(x[:1], w),
            "loop": lambda: [QN.matmul_numba(x[t:t + 1], w) for t in range(8)],
            "batch": lambda: QN.matmul_numba(x, w),
        }, repeats)
        print(f"  {qtype:5} {ms['one']:7.3f} | {ms['loop']:7.3f} | {ms['batch']:7.3f}")
        append_json(out, {"bench": "rows", "qtype": qtype, "shape": [rows, cols], "threads": torch.get_num_threads(),
                          **{f"{k}_ms": v for k, v in ms.items()}, "commit": git_commit(), **host_fields()})


def bench_rows(threads: int, repeats: int, out: str | None) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    QN.matmul_numba(torch.randn(1, 32), Q.QuantWeight(QZ.quantize(torch.randn(2, 32), "Q8_0"), "Q8_0", 32))  # compile
    print(f"{torch.get_num_threads()} threads")
    dense_rows(torch.float32, repeats, out)
    dense_rows(torch.bfloat16, repeats, out)
    quant_rows(repeats, out)
