"""The int8 kernels (tpi_mpi/csrc/qdot.c through quant_int8.py): x quantized to 8-bit blocks of 32
values (256 against the K-quants, kquants.c), integer dot products with the weight blocks.

The reference is independent: x quantized here in torch by the rule the kernels state (scale = the
block's largest magnitude / 127, values rounded half to even), multiplied in float64 with the
weights gguf's dequantization gives (quant.dequantize equals gguf.quants.dequantize, test_quant.py).
The kernels compute that sum exactly up to float32 rounding; against the float path they differ by
what 8-bit activations lose. Both instruction sets (AVX2 where the CPU has it, the portable C
loops) are checked, each batch invariant: a row's result does not depend on the other rows.
"""

import pytest
import torch
import torch.nn.functional as F

from test_rowwise_kernels import assert_rows_invariant, quant_weight
from tpi_mpi import quant as Q
from tpi_mpi import quant_int8 as QI
from tpi_mpi.config import RunConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.startup import use_int8_matmul

pytestmark = pytest.mark.skipif(not QI.int8_available(), reason="tpi_mpi._qdot was not compiled")

@pytest.fixture
def int8_off_after():
    yield
    QI.use_int8(False)


def quantized_x(x: torch.Tensor, qtype: str = "Q8_0") -> torch.Tensor:
    """x as the kernels see it: per 32 values, d = max|x| / 127 and round(x * (1 / d)) * d, rounded
    half to even, in float32 as the kernels compute it. Against the K-quants, per 256 values d = max|x|
    / (127 * 8), and each 32 values' scale is d times s, the least of 1..8 that holds their largest."""
    if qtype.endswith("_K"):
        b = x.float().reshape(x.shape[0], -1, 8, 32)
        gmax = b.abs().amax(-1, keepdim=True)
        d = gmax.amax(-2, keepdim=True) / (127 * 8)
        s = torch.where(d == 0, torch.ones_like(gmax), torch.ceil(gmax / (d * 127)).clamp(1, 8))
        step = d * s
    else:
        b = x.float().reshape(x.shape[0], -1, 32)
        step = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(step == 0, torch.zeros_like(step), 1 / step)
    return (torch.round(b * inv).clamp(-127, 127).double() * step.double()).reshape(x.shape)


@pytest.mark.parametrize("qtype", list(Q.QTYPES))
@pytest.mark.parametrize("rows", [19, 200])          # a group of 8 rows cut short; several tasks
def test_int8_matmul_is_the_integer_sum(isa, qtype, rows):
    w = quant_weight(qtype, rows=rows, cols=768 if Q.block_size(qtype) == 32 else 512)
    x = torch.randn(6, w.cols) * 3
    ref = quantized_x(x, qtype) @ w.dequantize().double().T
    y = QI.matmul_int8(x, w)
    assert y.dtype == torch.float32 and y.shape == (6, rows)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-6, err
    # and against the float path: what 8-bit activations lose, no more
    exact = F.linear(x.double(), w.dequantize().double())
    assert ((y.double() - exact).abs().max() / exact.abs().max()).item() < 3e-2


@pytest.mark.parametrize("qtype", list(Q.QTYPES))
def test_int8_rows_batch_invariant(isa, qtype):
    w = quant_weight(qtype, rows=37)
    assert_rows_invariant(lambda v: QI.matmul_int8(v, w), torch.randn(9, w.cols))


def test_int8_threads_and_long_calls_change_nothing():
    w = quant_weight("Q4_0", rows=300)
    x = torch.randn(300, w.cols)                         # more tokens than one kernel call takes (256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = QI.matmul_int8(x, w)
        torch.set_num_threads(3)
        assert torch.equal(QI.matmul_int8(x, w), one)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[280:], QI.matmul_int8(x[280:], w))


@pytest.mark.parametrize("qtype", list(QI.INTERLEAVED_TYPES))
@pytest.mark.parametrize("rows", [19, 200])          # whole groups of 8 and 3 rows left as stored
def test_interleaved_layout_is_the_same_matrix(isa, qtype, rows, int8_off_after):
    w = quant_weight(qtype, rows=rows)
    x = torch.randn(5, w.cols)
    plain = QI.matmul_int8(x, w)
    raw = w.raw.clone()
    il = QI.interleave(Q.QuantWeight(w.raw.clone(), qtype, w.cols))
    # each group of 8 rows column by column; a column: the 8 rows' leading 2-byte fields side by side (fp16
    # scale; min), then the rest of their blocks 4 bytes at a time (row 0's bytes 0-3, ..., row 7's 0-3, row
    # 0's 4-7, ...), then their trailing 2-byte fields (Q6_K's scale)
    g, bb = rows // 8 * 8, Q.QTYPES[qtype][1]
    lead = 0 if qtype == "Q6_K" else 4 if qtype in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else 2
    tail = bb - 2 if qtype == "Q6_K" else bb
    columns = raw[:g].view(rows // 8, 8, -1, bb).transpose(1, 2)                 # (group, column, row, bytes)

    def units(part, n):                                                          # (group, column, unit, row, n)
        return part.reshape(*part.shape[:3], -1, n).transpose(2, 3).flatten(2)

    packed = torch.cat([units(columns[..., :lead], 2), units(columns[..., lead:tail], 4),
                        units(columns[..., tail:], 2)], dim=-1).reshape(g, -1)
    assert il.interleaved and torch.equal(il.raw, torch.cat([packed, raw[g:]]))
    assert torch.equal(QI.matmul_int8(x, il), plain)                          # the same bits
    assert torch.equal(QI.plain_layout(il).raw, raw) and il.plain().raw.data_ptr() != il.raw.data_ptr()
    assert torch.equal(il.dequantize(), w.dequantize())
    assert torch.equal(il.rows([0, rows - 1]), w.rows([0, rows - 1]))
    assert torch.equal(Q.matmul(x, il), Q.matmul(x, w))                       # the exact path reads it too
    QI.use_int8(True)
    assert torch.equal(Q.matmul(x, il), plain)


@pytest.mark.parametrize("qtype", list(QI.INTERLEAVED_TYPES))
def test_the_layout_prepare_writes_is_the_kernels(qtype):
    """pack_rows (torch, at prepare) gives the bytes the kernels' own regrouping gives, and back."""
    w = quant_weight(qtype, rows=27)
    packed = QI.pack_rows(w.raw, qtype)
    assert torch.equal(packed, QI.interleave(Q.QuantWeight(w.raw.clone(), qtype, w.cols)).raw)
    assert torch.equal(QI.unpack_rows(packed, qtype), w.raw)


def test_fewer_than_8_rows_stay_as_stored():
    for qtype in ("Q4_0", "Q6_K"):
        w = quant_weight(qtype, rows=7)
        assert QI.interleave(w) is w


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_give_the_same_bits_on_every_path(isa, qtype):
    """A super-block's sums are exact integers and its float step is the same everywhere: this instruction
    set, rows as stored or packed by 8, at 1 to 6 tokens, gives the portable loops' bits."""
    w = quant_weight(qtype, rows=21, cols=768)
    il = QI.interleave(Q.QuantWeight(w.raw.clone(), qtype, w.cols))
    x = torch.randn(6, w.cols) * 3
    x[:, :100] *= 40                                                # the first block's groups: multiples 1 to 8
    QI._qdot().set_isa("generic")
    want = QI.matmul_int8(x, w)
    QI._qdot().set_isa(isa)
    for t in (1, 2, 6):
        for m in (w, il):
            assert torch.equal(QI.matmul_int8(x[:t], m), want[:t]), (t, m.interleaved)


def test_zero_blocks_give_zeros():
    w = quant_weight("Q4_1", rows=8)
    assert torch.equal(QI.matmul_int8(torch.zeros(2, w.cols), w), torch.zeros(2, 8))


def test_matmul_takes_the_int8_path_only_when_asked(int8_off_after):
    w = quant_weight("Q4_0", rows=16)
    x = torch.randn(2, w.cols)
    exact = Q.matmul(x, w)
    QI.use_int8(True)
    assert torch.equal(Q.matmul(x, w), QI.matmul_int8(x, w))
    assert not torch.equal(Q.matmul(x, w), exact)
    QI.use_int8(False)
    assert torch.equal(Q.matmul(x, w), exact)


def test_matmul_mode_follows_the_options(int8_off_after, monkeypatch):
    assert use_int8_matmul(RunConfig()) and QI.int8_on()
    assert not use_int8_matmul(RunConfig(dtype="fp32")) and not QI.int8_on()      # --dtype fp32: the file's numbers
    assert use_int8_matmul(RunConfig(dtype="fp32", matmul="int8"))
    assert not use_int8_matmul(RunConfig(matmul="exact"))
    with pytest.raises(ConfigError, match="--matmul 'fast'"):
        RunConfig(matmul="fast")
    monkeypatch.setattr(QI, "int8_available", lambda: False)
    assert not use_int8_matmul(RunConfig())                                      # not built: exact, quietly
    with pytest.raises(ConfigError, match="was not compiled at install"):
        use_int8_matmul(RunConfig(matmul="int8"))
