"""Batch invariance of the decode row kernels: quant_numba.matmul_numba, and parallel.linear_rows for float
weights (BLAS padded into a band of row counts where it is invariant).

A sequence's logits must not depend on the batch its decode row ran in, or greedy text changes with
the batch: every row of a T = 9 call must equal (torch.equal) the T = 1 call on that row alone, and
stay equal when the other rows hold other values. The values themselves are checked against
F.linear in float64 on the same (dequantized) weights. And F.linear itself is shown to fail the
invariance check on this CPU, so the check would catch a kernel replaced by BLAS.
"""

import pytest
import torch
import torch.nn.functional as F

from tpi_mpi import quant as Q
from tpi_mpi import quantize as QZ
from tpi_mpi import quant_numba as QN
from tpi_mpi.parallel import linear_rows

T = 9
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


def quant_weight(qtype: str, rows: int = 19, cols: int = 512) -> Q.QuantWeight:
    gen = torch.Generator().manual_seed(1)
    if Q.block_size(qtype) == 32:                       # the types gguf (and quantize.py) can make
        raw = QZ.quantize(torch.randn(rows, cols, generator=gen), qtype)
    else:
        raw = QZ.random_blocks(qtype, rows, cols)
    return Q.QuantWeight(raw, qtype, cols)


def assert_rows_invariant(matmul, x: torch.Tensor) -> None:
    """Row t of matmul(x) == matmul(x[t:t+1]), and == row t of a batch whose other rows differ."""
    batch = matmul(x)
    other = torch.randn_like(x.float()).mul_(50).to(x.dtype)
    for t in range(x.shape[0]):
        alone = matmul(x[t:t + 1])
        assert torch.equal(batch[t:t + 1], alone), f"row {t}: batch of {x.shape[0]} != alone"
        mixed = other.clone()
        mixed[t] = x[t]
        assert torch.equal(matmul(mixed)[t:t + 1], alone), f"row {t} changed with the other rows"


def close_f32(y: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("qtype", list(Q.QTYPES))
def test_quant_rows_batch_invariant_and_close(qtype):
    w = quant_weight(qtype)
    x = torch.randn(T, w.cols)
    assert_rows_invariant(lambda v: QN.matmul_numba(v, w), x)
    close_f32(QN.matmul_numba(x, w), F.linear(x.double(), w.dequantize().double()))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", [(19, 512), (96, 576), (1000, 333)])
def test_served_float_rows_batch_invariant_and_close(dtype, shape):
    """parallel.linear_rows, what serving computes decode rows with: BLAS padded into its band."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen).to(dtype)
    x = torch.randn(T, shape[1], generator=gen).to(dtype)
    assert_rows_invariant(lambda v: linear_rows(v, w), x)
    ref = F.linear(x.double(), w.double())
    torch.testing.assert_close(linear_rows(x, w).double(), ref, rtol=2e-2 if dtype != torch.float32 else 1e-5,
                               atol=2e-2 * ref.abs().max().item() if dtype != torch.float32 else 1e-4)


def test_the_invariance_check_catches_blas():
    """F.linear (MKL here) is not batch invariant: the same check, run on it, must fail."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 4096), torch.randn(16, 4096)
    if all(torch.equal(F.linear(x[:n], w)[:1], F.linear(x[:1], w)) for n in (2, 4, 8, 9, 16)):
        pytest.skip("F.linear happens to be batch invariant on this CPU")
    with pytest.raises(AssertionError):
        assert_rows_invariant(lambda v: F.linear(v, w), x[:T])
    assert_rows_invariant(lambda v: linear_rows(v, w), x[:T])     # same input, what serving runs
