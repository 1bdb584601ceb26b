"""`bench quant`: what computing from each GGML block type costs on this CPU, against plain floats.

For each shape (default: the matrices one rank holds of a 7B model at 4 ranks, 4096 x 2752 and
2752 x 4096) and each type whose block divides the columns: dequantize to float32 (a new tensor,
and into a reused buffer), to bf16; dequantize + F.linear for one token (the baseline); the
stepped torch matmul and the numba kernel for one token; matmul (the exact path the model calls) for
1 and 128 tokens with float32 and bf16 activations; the int8 kernels (quant_int8.py, --matmul int8)
for 1 and 128 tokens; and F.linear on float32 and bf16 weights.

Noise: the host is a shared VM, so the ops are timed in 3 rounds, each op in turn a warm-up call
and a third of --repeats calls back to back; the table shows medians, the JSON lines p10/p90 too.
Weights: the 32-value types (Q8_0 ... Q5_1) are quantize() of N(0, 0.02) floats, K-quants are random blocks with
sane scales (quantize.random_blocks): the speed of these kernels does not depend on the values.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .. import quant as Q
from .. import quantize as QZ
from .. import quant_int8 as QI
from .. import quant_numba as QN

PREFILL = 128


def parse_shapes(specs: tuple[str, ...]) -> list[tuple[int, int]]:
    """("4096x2752", "1x2,3x4") -> [(4096, 2752), (1, 2), (3, 4)]."""
    shapes = []
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                rows, cols = (int(v) for v in part.lower().split("x"))
            except ValueError:
                raise ValueError(f"--shape {part!r}: write ROWSxCOLS, e.g. 4096x2752") from None
            if rows <= 0 or cols <= 0:
                raise ValueError(f"--shape {part!r}: rows and columns must be positive")
            shapes.append((rows, cols))
    return shapes


def _ops(rows: int, cols: int, qtype: str | None, w: torch.Tensor) -> dict[tuple[str, int, str], Callable[[], object]]:
    """(op, T, dtype) -> a call to time. qtype None: the float baselines."""
    x = {T: torch.randn(T, cols) for T in (1, PREFILL)}
    xb = {T: v.bfloat16() for T, v in x.items()}
    if qtype is None:
        wb = w.bfloat16()
        return {("linear", T, dt): (lambda T=T, dt=dt: F.linear(*((x[T], w) if dt == "fp32" else (xb[T], wb))))
                for T in (1, PREFILL) for dt in ("fp32", "bf16")}
    raw = QZ.quantize(w, qtype) if Q.block_size(qtype) == 32 else QZ.random_blocks(qtype, rows, cols)
    qw = Q.QuantWeight(raw, qtype, cols)
    buf = torch.empty(rows, cols)
    ops = {
        ("dequantize", 0, "fp32"): lambda: Q.dequantize(raw, qtype, cols),
        ("dequantize_out", 0, "fp32"): lambda: Q.dequantize(raw, qtype, cols, out=buf),
        ("dequantize", 0, "bf16"): lambda: Q.dequantize(raw, qtype, cols, torch.bfloat16),
        ("deq+linear", 1, "fp32"): lambda: F.linear(x[1], Q.dequantize(raw, qtype, cols)),
        ("matmul_steps", 1, "fp32"): lambda: Q.matmul_steps(x[1], qw),
        ("matmul_numba", 1, "fp32"): lambda: QN.matmul_numba(x[1], qw),
    }
    if QI.int8_available():
        for T in (1, PREFILL):
            ops[("matmul_int8", T, "fp32")] = lambda T=T: QI.matmul_int8(x[T], qw)
    for T in (1, PREFILL):
        ops[("matmul", T, "fp32")] = lambda T=T: Q.matmul(x[T], qw)
        ops[("matmul", T, "bf16")] = lambda T=T: Q.matmul(xb[T], qw)
    return ops


def _time_rounds(ops: dict, repeats: int, rounds: int = 3) -> dict:
    """`rounds` rounds; in each, every op in turn: one warm-up call, then its share of `repeats`
    timed calls back to back (an op's steady cost: interleaving single calls charged an op for
    its predecessor, e.g. the 45 MB page-faulted in and freed by a fresh dequantize). {key: [s]}"""
    times = {k: [] for k in ops}
    per_round = max(1, -(-repeats // rounds))
    for _ in range(rounds):
        for k, f in ops.items():
            f()
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return times


def _quantiles(v: list[float]) -> tuple[float, float, float]:
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=10, method="inclusive")
    return q[0], statistics.median(v), q[-1]


COLUMNS = [  # (header, op, T, dtype)
    ("deq f32", "dequantize", 0, "fp32"), ("deq>buf", "dequantize_out", 0, "fp32"), ("deq bf16", "dequantize", 0, "bf16"),
    ("deq+lin", "deq+linear", 1, "fp32"), ("steps 1", "matmul_steps", 1, "fp32"), ("numba 1", "matmul_numba", 1, "fp32"),
    ("mm1 f32", "matmul", 1, "fp32"), ("mm1 bf16", "matmul", 1, "bf16"),
    (f"mm{PREFILL} f32", "matmul", PREFILL, "fp32"), (f"mm{PREFILL} bf16", "matmul", PREFILL, "bf16"),
    ("int8 1", "matmul_int8", 1, "fp32"), (f"int8 {PREFILL}", "matmul_int8", PREFILL, "fp32"),
]


def _cell(records: dict, qtype: str, op: str, T: int, dtype: str) -> str:
    if qtype in ("F32", "BF16"):                        # float weights: F.linear in the matmul columns
        if op != "matmul" or dtype != qtype.lower().replace("f32", "fp32"):
            return ""
        op = "linear"
    r = records.get((qtype, op, T, dtype))
    return f"{r['ms']:.2f}" if r else ""


def print_table(shape: tuple[int, int], records: dict, types: list[str]) -> None:
    """ms per call (median); B/w: bytes per weight; G/s: weights per second of mm1 (one token)."""
    rows, cols = shape
    print(f"\n{rows}x{cols}, {torch.get_num_threads()} threads, ms (median)")
    heads = ["type", "B/w"] + [h for h, *_ in COLUMNS] + ["G/s 1", "G/s i8"]
    print(" ".join(f"{h:>9}" for h in heads))
    for t in types:
        bpw = 4.0 if t == "F32" else 2.0 if t == "BF16" else Q.QTYPES[t][1] / Q.QTYPES[t][0]
        cells = [_cell(records, t, op, T, dt) for _, op, T, dt in COLUMNS]
        mm1 = (records.get((t, "linear", 1, "fp32" if t == "F32" else "bf16")) if t in ("F32", "BF16")
               else records.get((t, "matmul", 1, "fp32")))
        i8 = records.get((t, "matmul_int8", 1, "fp32"))
        gs = [f"{rows * cols / r['ms'] / 1e6:.1f}" if r else "" for r in (mm1, i8)]
        print(" ".join(f"{c:>9}" for c in [t, f"{bpw:.4f}"] + cells + gs))


def bench_quant(shapes: list[tuple[int, int]], threads: int, repeats: int, out: str | None) -> list[dict]:
    from .generate import append_json, git_commit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    commit, host = git_commit(), platform.node()
    load = os.getloadavg()[0]
    QN.matmul_numba(torch.randn(1, 32), Q.QuantWeight(QZ.quantize(torch.randn(1, 32), "Q4_0"), "Q4_0", 32))
    out_records = []
    for rows, cols in shapes:
        w = torch.randn(rows, cols) * 0.02
        types = ["F32", "BF16"] + [t for t in Q.QTYPES if cols % Q.block_size(t) == 0]
        skipped = [t for t in Q.QTYPES if cols % Q.block_size(t)]
        records = {}
        for qtype in [None] + types[2:]:
            ops = _ops(rows, cols, qtype, w)
            for (op, T, dtype), v in _time_rounds(ops, repeats).items():
                p10, med, p90 = _quantiles(v)
                name = qtype or ("F32" if dtype == "fp32" else "BF16")
                rec = {"bench": "quant", "type": name, "op": op, "T": T, "dtype": dtype, "ms": med * 1e3,
                       "p10_ms": p10 * 1e3, "p90_ms": p90 * 1e3, "repeats": len(v), "threads": threads,
                       "shape": f"{rows}x{cols}", "load1": load,
                       "commit": commit, "host": host}
                records[(name, op, T, dtype)] = rec
                out_records.append(rec)
                append_json(out, rec)
        print_table((rows, cols), records, types)
        if skipped:
            block = Q.block_size(skipped[0])
            print(f"  not run: {', '.join(skipped)} (their {block}-value blocks do not divide {cols} columns)")
    print(f"\nint8 kernels: {QI.instruction_set()}; "
          f"load average at start {load:.2f}; host {host}; commit {commit}")
    return out_records
