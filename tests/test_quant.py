"""tpi_mpi.quant against gguf-py's reference implementation (gguf.quants, numpy).

Dequantized values must equal gguf's bit for bit (compared as int32 bit patterns), quantized bytes
byte for byte. matmul is compared with x @ W^T of the dequantized W: its weights are exact (an
identity x gives W^T bit for bit), only the float32 summation order differs from BLAS, so the
tolerance is float32 rounding: |y - ref| <= 1e-5 * max|ref| + 1e-5 * |ref|.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gq

from tpi_mpi import quant as Q
from tpi_mpi import quantize as QZ
from tpi_mpi import quant_numba as QN

TYPES = list(Q.QTYPES)
QUANTIZABLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
FP16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
               "Q6_K": [208]}
PATHS = ["auto", "steps", "numba"]


def gguf_raw(qtype: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Blocks made independently of tpi_mpi: gguf's quantizer where it has one, else random bytes
    whose fp16 scales are overwritten with finite values (0.01..0.1)."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        return gq.quantize(rng.standard_normal((rows, cols)).astype(np.float32), GGMLQuantizationType[qtype])
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    for at in FP16_FIELDS[qtype]:
        scale = rng.uniform(0.01, 0.1, (rows, cols // block, 1)).astype(np.float16)
        raw[..., at:at + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_dequantize(raw: np.ndarray, qtype: str, cols: int) -> torch.Tensor:
    return torch.from_numpy(gq.dequantize(raw, GGMLQuantizationType[qtype]).reshape(raw.shape[0], cols))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    same_kind = a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    return same_kind and torch.equal(a.view(torch.int32), b.view(torch.int32))


def matmul_path(path: str):
    return {"auto": Q.matmul, "steps": Q.matmul_steps, "numba": QN.matmul_numba}[path]


def close_f32(y: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


# ---- sizes ------------------------------------------------------------------------------------------

def test_sizes_are_ggmls():
    for qtype, (block, nbytes) in Q.QTYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[qtype]] == (block, nbytes)
        assert Q.block_size(qtype) == block
        assert Q.row_bytes(qtype, 4 * block) == 4 * nbytes
    assert Q.row_bytes("Q4_0", 2752) == 86 * 18


def test_columns_must_fill_whole_blocks():
    with pytest.raises(ValueError, match="2752 columns is not a multiple of 256"):
        Q.row_bytes("Q4_K", 2752)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        Q.QuantWeight(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", 40)
    with pytest.raises(ValueError, match="unknown quantization type 'Q3_K'"):
        Q.block_size("Q3_K")
    with pytest.raises(ValueError, match=r"uint8 \(rows, 36\)"):
        Q.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", 64)


# ---- dequantize -------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("rows,cols", [(7, 512), (3, 256)])
def test_dequantize_is_ggufs_bit_for_bit(qtype, rows, cols):
    raw = gguf_raw(qtype, rows, cols)
    assert same_bits(Q.dequantize(torch.from_numpy(raw), qtype, cols), gguf_dequantize(raw, qtype, cols))


@pytest.mark.parametrize("qtype", ["Q5_0", "Q5_1"])
def test_dequantize_every_fifth_bit_pattern(qtype):
    """Random bytes, not only what a quantizer makes: every qh bit and nibble, in both halves of a block."""
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(7).integers(0, 256, (5, 16 * nbytes), dtype=np.uint8)
    fields = raw.reshape(5, 16, nbytes)
    for at in FP16_FIELDS[qtype]:
        fields[..., at:at + 2] = np.array([0.03], np.float16).view(np.uint8)
    cols = 16 * block
    assert same_bits(Q.dequantize(torch.from_numpy(raw), qtype, cols), gguf_dequantize(raw, qtype, cols))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_in_steps_and_into_views(qtype, monkeypatch):
    """Several steps with a short last one; raw as a view into a larger reused buffer, at an odd
    byte offset too (its fp16 fields are then unaligned); `out` reused."""
    rows, cols = 11, 512
    raw = gguf_raw(qtype, rows, cols, seed=1)
    ref = gguf_dequantize(raw, qtype, cols)
    monkeypatch.setattr(Q, "STEP_VALUES", 3 * cols)
    buf = torch.zeros(raw.size + 101, dtype=torch.uint8)
    for offset in (0, 1, 64):
        view = buf[offset:offset + raw.size].view(rows, raw.shape[1])
        view.copy_(torch.from_numpy(raw))
        assert same_bits(Q.dequantize(view, qtype, cols), ref)
    grid = torch.zeros(rows + 5, raw.shape[1], dtype=torch.uint8)
    grid[2:2 + rows] = torch.from_numpy(raw)
    out = torch.full((rows, cols), float("nan"))
    assert Q.dequantize(grid[2:2 + rows], qtype, cols, out=out) is out
    assert same_bits(out, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_to_16_bits_is_a_cast_of_float32(dtype):
    for qtype in TYPES:
        raw = torch.from_numpy(gguf_raw(qtype, 3, 512))
        assert torch.equal(Q.dequantize(raw, qtype, 512, dtype), Q.dequantize(raw, qtype, 512).to(dtype))


def test_dequantize_refuses_a_wrong_out():
    raw = torch.from_numpy(gguf_raw("Q8_0", 2, 64))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        Q.dequantize(raw, "Q8_0", 64, out=torch.empty(2, 64, dtype=torch.bfloat16))


# ---- quantize ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", QUANTIZABLE)
def test_quantize_is_ggufs_byte_for_byte(qtype):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 512)).astype(np.float32)
    w[1] = 0                                            # d = 0: the inverse scale is 0, not inf
    w[2] *= 3e4                                         # scales beyond fp16: inf, as gguf's
    w[3, :64] = 7e6
    w[4] *= 1e-7                                        # fp16 subnormal scales
    w[5, ::2] = -w[5, 1::2]                             # equal magnitudes: the first one sets Q4_0's sign
    w[6] = np.round(w[6] * 4) / 4                       # halves: rounding ties
    w[7] = np.abs(w[7])
    w[8] = 1.0                                          # constant blocks: Q4_1's d = 0
    with np.errstate(over="ignore"):                  # the scales beyond fp16
        ref = gq.quantize(w, GGMLQuantizationType[qtype])
        ref_bf16 = gq.quantize(torch.from_numpy(w).bfloat16().float().numpy(), GGMLQuantizationType[qtype])
    got = QZ.quantize(torch.from_numpy(w), qtype)
    assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), ref)
    assert np.array_equal(QZ.quantize(torch.from_numpy(w).bfloat16(), qtype).numpy(), ref_bf16)


def test_quantize_makes_only_the_32_value_types():
    with pytest.raises(ValueError, match="not 'Q4_K'"):
        QZ.quantize(torch.zeros(2, 256), "Q4_K")


# ---- QuantWeight, matmul ----------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES)
def test_quant_weight_rows_shape_nbytes(qtype):
    raw = torch.from_numpy(gguf_raw(qtype, 6, 512))
    w = Q.QuantWeight(raw, qtype, 512)
    assert w.shape == (6, 512) and w.nbytes == 6 * Q.row_bytes(qtype, 512)
    full = w.dequantize()
    ids = [4, 0, 4, 5]
    assert same_bits(w.rows(ids), full[ids])
    assert torch.equal(w.rows(ids, torch.bfloat16), full[ids].bfloat16())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES)
def test_matmul_weights_are_exactly_the_dequantized_ones(qtype, path):
    """x = identity: every output is one weight times 1 plus zeros, so exact (up to the sign of 0)."""
    w = Q.QuantWeight(torch.from_numpy(gguf_raw(qtype, 5, 256, seed=3)), qtype, 256)
    assert torch.equal(matmul_path(path)(torch.eye(256), w).T, w.dequantize())


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("qtype", TYPES)
@pytest.mark.parametrize("T", [1, 3, 7])
def test_matmul_is_x_at_w_transposed(qtype, T, path, monkeypatch):
    monkeypatch.setattr(Q, "STEP_VALUES", 5 * 512)     # 37 rows: 8 steps, the last one short
    w = Q.QuantWeight(torch.from_numpy(gguf_raw(qtype, 37, 512, seed=4)), qtype, 512)
    x = torch.randn(T, 512, generator=torch.Generator().manual_seed(T))
    y = matmul_path(path)(x, w)
    assert y.shape == (T, 37) and y.dtype == torch.float32 and y.is_contiguous()
    close_f32(y, x.double() @ w.dequantize().double().T)


@pytest.mark.parametrize("T", [1, 3, Q.TORCH_F32_MAX_T + 1])
def test_matmul_of_bf16_activations(T):
    """bf16 x: in float32 for few tokens, as a bf16 GEMM for more; either is within bf16 rounding."""
    w = Q.QuantWeight(torch.from_numpy(gguf_raw("Q4_K", 40, 512, seed=5)), "Q4_K", 512)
    x = torch.randn(T, 512, generator=torch.Generator().manual_seed(0)).bfloat16()
    y = Q.matmul(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (T, 40)
    ref = x.double() @ w.dequantize().double().T
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_matmul_keeps_leading_dims_and_checks_features():
    w = Q.QuantWeight(torch.from_numpy(gguf_raw("Q8_0", 4, 64)), "Q8_0", 64)
    x = torch.randn(2, 3, 64)
    close_f32(Q.matmul(x, w), F.linear(x.double(), w.dequantize().double()))
    with pytest.raises(ValueError, match="x has 32 features"):
        Q.matmul(torch.randn(1, 32), w)


def test_numba_reads_every_fp16_exactly():
    """The kernels convert the fp16 scales themselves: all 65536 bit patterns against numpy's."""
    QN._numba_kernels()                                 # jits _half
    bits = np.arange(65536, dtype=np.uint16)
    blocks = bits.view(np.uint8).reshape(1, -1, 2)
    got = np.array([QN._half(blocks, 0, k, 0) for k in range(65536)], dtype=np.float32)
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))
