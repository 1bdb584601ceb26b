"""Batch invariance of the numba decode kernels (quant_numba.matmul_numba, dense_numba.matmul_dense_numba).

A sequence's logits must not depend on the batch its decode row ran in, or greedy text changes with
the batch: every row of a T = 9 call must equal (torch.equal) the T = 1 call on that row alone, and
stay equal when the other rows hold other values. The values themselves are checked against
F.linear in float64 on the same (dequantized) weights. And F.linear itself is shown to fail the
invariance check on this CPU, so the check would catch a kernel replaced by BLAS.
"""

import pytest
import torch
import torch.nn.functional as F

from tpi_mpi import dense_numba as DN
from tpi_mpi import quant as Q
from tpi_mpi import quant_numba as QN

T = 9
FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _needs_numba():
    if not (QN.numba_available() and DN.dense_numba_available()):
        pytest.skip("numba is not installed")


def quant_weight(qtype: str, rows: int = 19, cols: int = 512) -> Q.QuantWeight:
    gen = torch.Generator().manual_seed(1)
    if qtype in ("Q8_0", "Q4_0", "Q4_1"):
        raw = Q.quantize(torch.randn(rows, cols, generator=gen), qtype)
    else:
        raw = Q.random_blocks(qtype, rows, cols)
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
def test_dense_rows_batch_invariant_and_close(dtype):
    w = torch.randn(37, 100).to(dtype)                   # 100: three whole lane blocks and a tail
    x = torch.randn(T, 100)
    assert_rows_invariant(lambda v: DN.matmul_dense_numba(v, w), x)
    assert_rows_invariant(lambda v: DN.matmul_dense_numba(v, w), x.to(dtype))     # x in w's dtype too
    close_f32(DN.matmul_dense_numba(x, w), F.linear(x.double(), w.double()))
    y_low = DN.matmul_dense_numba(x.to(dtype), w)
    assert y_low.dtype == dtype and y_low.shape == (T, 37)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_reads_every_16_bit_weight_exactly(dtype):
    """bf16/fp16 bits are widened inside the kernel: all finite patterns, times an identity x."""
    w = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256).clone()
    w[~w.float().isfinite()] = 0                        # 0 * inf would be NaN in the identity's sums
    assert torch.equal(DN.matmul_dense_numba(torch.eye(256), w), w.float().t())
    special = torch.tensor([[float("inf")], [float("-inf")], [float("nan")]]).to(dtype)
    y = DN.matmul_dense_numba(torch.ones(1, 1), special)[0]
    assert y[0] == float("inf") and y[1] == float("-inf") and y[2].isnan()


def test_dense_rejects_what_it_cannot_multiply():
    with pytest.raises(ValueError, match="needs x"):
        DN.matmul_dense_numba(torch.randn(2, 8), torch.randn(3, 9))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        DN.matmul_dense_numba(torch.randn(2, 8), torch.randn(3, 8).double())


def test_the_invariance_check_catches_blas():
    """F.linear (MKL here) is not batch invariant: the same check, run on it, must fail."""
    torch.manual_seed(0)
    w, x = torch.randn(64, 4096), torch.randn(16, 4096)
    if all(torch.equal(F.linear(x[:n], w)[:1], F.linear(x[:1], w)) for n in (2, 4, 8, 9, 16)):
        pytest.skip("F.linear happens to be batch invariant on this CPU")
    with pytest.raises(AssertionError):
        assert_rows_invariant(lambda v: F.linear(v, w), x[:T])
    assert_rows_invariant(lambda v: DN.matmul_dense_numba(v, w), x[:T])     # same input, our kernel
