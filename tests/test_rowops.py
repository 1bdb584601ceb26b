"""The compiled row steps of the fast path (tpi_mpi/csrc/rowops.c through rowops.py) against torch's
formulas in float64, and the KV rows they write against torch's own conversion."""

import math

import pytest
import torch
import torch.nn.functional as F

from tpi_mpi import quant_int8 as QI
from tpi_mpi import rowops
from tpi_mpi.config import KV_BLOCK
from tpi_mpi.kv import Place

pytestmark = pytest.mark.skipif(not QI.int8_available(), reason="tpi_mpi._qdot was not compiled")


@pytest.fixture
def fast_path():
    QI.use_int8(True)
    yield
    QI.use_int8(False)


def test_rows_take_the_compiled_steps_only_on_the_fast_path(fast_path):
    x = torch.randn(3, 96)
    assert rowops.fast(x) and not rowops.fast(x.to(torch.bfloat16))
    QI.use_int8(False)
    assert not rowops.fast(x)


def test_rms_norm_rope_and_silu_match_torch_in_float64(fast_path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 200, generator=g) * 3, torch.randn(200, generator=g)
    x64 = x.double()
    want = w.double() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(rowops.rms_norm(x, w, 1e-5).double(), want, rtol=2e-6, atol=2e-6)

    q = torch.randn(4, 3, 64, generator=g)
    angle = torch.randn(4, 1, 64, generator=g)
    cos, sin = angle.cos(), angle.sin()
    q64 = q.double()
    want = q64 * cos.double() + torch.cat((-q64[..., 32:], q64[..., :32]), -1) * sin.double()
    got = rowops.apply_rope(q.clone(), cos, sin)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)

    gate, up = torch.randn(7, 33, generator=g) * 4, torch.randn(7, 33, generator=g)
    torch.testing.assert_close(rowops.silu_mul(gate, up).double(), F.silu(gate.double()) * up.double(),
                               rtol=2e-6, atol=2e-6)


def reference_attention(q, keys, values, kv_index, L):
    """float64 softmax(q k^T / sqrt(hd)) v of one row, q (heads, hd), keys/values (kv heads, L, hd)."""
    k, v = keys[kv_index, :L].double(), values[kv_index, :L].double()       # (heads, L, hd)
    scores = torch.einsum("hd,hld->hl", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("hl,hld->hd", scores.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("runs", [((2, 3),), ((4, 1), (0, 2), (6, 1))])        # one run; several, out of order
def test_one_row_attention_reads_and_writes_the_pool_where_the_place_says(fast_path, dtype, runs):
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, hd, blocks = 6, 2, 32, 8
    kv_index = torch.tensor([0, 0, 0, 1, 1, 1])
    store = torch.randn(2, kv_heads, blocks * KV_BLOCK, hd, generator=g).to(dtype)
    keys, values = store[0], store[1]
    pos = sum(n for _, n in runs) * KV_BLOCK - 5
    place = Place(runs, pos + 1)
    pool_at = torch.cat([torch.arange(a * KV_BLOCK, (a + n) * KV_BLOCK) for a, n in runs])
    q, k, v = (torch.randn(1, h, hd, generator=g) for h in (heads, kv_heads, kv_heads))
    assert rowops.attends_row(q, keys)
    out = rowops.attend_row(q, k, v, keys, values, kv_index, pos, place)

    # the new row is stored as torch converts it, at the pool position of `pos`
    assert torch.equal(keys[:, pool_at[pos]], k[0].to(dtype)) and torch.equal(values[:, pool_at[pos]], v[0].to(dtype))
    seq_keys, seq_values = keys[:, pool_at[:pos + 1]].float(), values[:, pool_at[:pos + 1]].float()
    want = reference_attention(q[0], seq_keys, seq_values, kv_index, pos + 1)
    torch.testing.assert_close(out[0].double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hd", [16, 12])        # 12: not a multiple of 8, the portable loops
def test_one_row_attention_is_torchs_attention_for_the_whole_group(fast_path, hd):
    """GQA: query heads 0-1 read kv head 1 and 2-3 kv head 0 (a rank's heads need not start a group)."""
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(2, 2, 4 * KV_BLOCK, hd, generator=g).unbind(0)
    kv_index = torch.tensor([1, 1, 0, 0])
    q, k, v = torch.randn(1, 4, hd, generator=g), torch.randn(1, 2, hd, generator=g), torch.randn(1, 2, hd, generator=g)
    pos = 40
    out = rowops.attend_row(q, k, v, keys, values, kv_index, pos, Place(((0, 4),), pos + 1))
    sdpa = F.scaled_dot_product_attention(q.transpose(0, 1), keys[kv_index, :pos + 1], values[kv_index, :pos + 1])
    torch.testing.assert_close(out, sdpa.transpose(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 1])        # heads spread over threads; one kv head for all
def test_long_context_attention_on_threads_is_the_same_as_on_one(fast_path, kv_heads):
    """Past ~2^18 multiply-adds a row's kv heads are tasks for the kernels' threads (rowops.c): the
    same bits as on one thread, and torch's attention."""
    g = torch.Generator().manual_seed(3)
    heads, hd, blocks = 8, 64, 40
    kv_index = torch.arange(heads) * kv_heads // heads
    pos = blocks * KV_BLOCK - 3                      # 8 heads x 64 x ~640 positions: above the threshold
    q, k, v = torch.randn(1, heads, hd, generator=g), *(torch.randn(1, kv_heads, hd, generator=g) for _ in "kv")
    keys, values = torch.randn(2, kv_heads, blocks * KV_BLOCK, hd, generator=g).to(torch.float16).unbind(0)
    outs = []
    for threads in (1, 2):
        QI.set_threads(threads)
        try:
            outs.append(rowops.attend_row(q, k, v, keys, values, kv_index, pos, Place(((0, blocks),), pos + 1)))
        finally:
            QI.set_threads(0)
    assert torch.equal(outs[0], outs[1])
    want = reference_attention(q[0], keys[:, :pos + 1].float(), values[:, :pos + 1].float(), kv_index, pos + 1)
    torch.testing.assert_close(outs[1][0].double(), want, rtol=1e-5, atol=1e-5)
