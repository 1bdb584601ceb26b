"""--allreduce-payload: the bf16 and q8 codecs against NumPy references, the star allreduce carrying
them on thread ranks (the same bits on every rank and whatever the batch), the configurations that
refuse them, and (mpi tier) a generate run whose logits move a little, not a lot."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import run_tpi
from fake_comm import run_ranks
from tpi_mpi.allreduce import Allreduce
from tpi_mpi.config import RunConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.payload import CODECS, Q8, Bf16


def bf16_numpy(x: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), as float32: the bit recipe, independent of torch."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def round_trip(codec, x: np.ndarray) -> np.ndarray:
    wire = np.empty(codec.wire_bytes(x.shape), np.uint8)
    codec.encode(np.ascontiguousarray(x, dtype=np.float32), wire)
    out = np.empty(x.shape, np.float32)
    codec.decode(wire, out)
    return out


def q8_bound(x: np.ndarray) -> np.ndarray:
    """Per value, half of its block's scale (max |x| / 127 over 32 values of its row, float64)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    bound = np.empty_like(rows)
    for start in range(0, rows.shape[1], 32):
        block = rows[:, start:start + 32]
        bound[:, start:start + 32] = np.abs(block).max(axis=1, keepdims=True) / 127 / 2
    return bound.reshape(x.shape)


def activations(shape, seed: int) -> np.ndarray:
    """Hidden-state-like values: mostly small, a few large outliers."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x.reshape(-1)[rng.integers(0, x.size, max(1, x.size // 100))] *= 50
    return x


# --- the codecs ---------------------------------------------------------------------------------

def test_bf16_rounds_to_nearest_even_like_the_bit_recipe():
    x = np.concatenate([activations((64, 40), 0).reshape(-1),
                        np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 0.0, -0.0, 1e-40, 3e38, -3e38],
                                 np.float32)])
    got = round_trip(Bf16, x)
    assert np.array_equal(got.view(np.uint32), bf16_numpy(x).view(np.uint32))
    assert np.all(np.abs(got - x) <= np.abs(x) * 2.0 ** -8 + 1e-40)        # half a unit in the 8th bit
    assert Bf16.wire_bytes((64, 40)) == 64 * 40 * 2


@pytest.mark.parametrize("shape", [(7, 576), (3, 40), (1, 16), (5,)])
def test_q8_round_trip_is_within_half_a_block_scale(shape):
    x = activations(shape, 1)
    x.reshape(-1, shape[-1])[0, :min(32, shape[-1])] = 0.0        # an all-zero block stays exactly zero
    got = round_trip(Q8, x)
    err = np.abs(got.astype(np.float64) - x)
    assert np.all(err <= q8_bound(x) * (1 + 1e-6) + 1e-30)
    assert np.all(got.reshape(-1, shape[-1])[0, :min(32, shape[-1])] == 0)
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    assert Q8.wire_bytes(shape) == rows * -(-shape[-1] // 32) * 36
    # each block's largest value is carried to within a rounding (q = +-127)
    assert np.abs(got).max() == pytest.approx(np.abs(x).max(), rel=1e-6)


@pytest.mark.parametrize("codec", [Bf16, Q8], ids=lambda c: c.name)
def test_a_rows_code_does_not_depend_on_the_other_rows(codec):
    x = activations((9, 40), 2)                                     # 40: a short last block per row
    together = round_trip(codec, x)
    for i in range(x.shape[0]):
        assert np.array_equal(round_trip(codec, x[i:i + 1]), together[i:i + 1])


# --- the star allreduce carrying them, on thread ranks --------------------------------------------

def star_on_threads(n: int, payload: str, parts: list[np.ndarray], hub: int = 0) -> list:
    def rank_main(comm):
        reduce = Allreduce(comm, "star", hub, payload)
        got = reduce(torch.from_numpy(parts[comm.rank].copy())).numpy().copy()
        return got, comm.stats.bytes_sent
    return run_ranks(n, rank_main)


@pytest.mark.parametrize("n,hub", [(1, 0), (2, 0), (3, 1), (4, 0), (4, 3)])
def test_star_bf16_gives_every_rank_the_rounded_sum_of_rounded_parts(n, hub):
    parts = [activations((6, 576), 10 + r) for r in range(n)]
    results = star_on_threads(n, "bf16", parts, hub)
    expected = np.zeros_like(parts[0])
    for p in parts:                                      # rank order, float32
        expected += bf16_numpy(p)
    expected = bf16_numpy(expected)
    for r, (got, sent) in enumerate(results):
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), f"rank {r}"
        assert sent == (0 if n == 1 else 6 * 576 * 2 * (n - 1 if r == hub else 1))


@pytest.mark.parametrize("n,hub", [(2, 0), (3, 2), (4, 0)])
def test_star_q8_gives_every_rank_the_same_bits_within_the_codec_bound(n, hub):
    parts = [activations((6, 200), 20 + r) for r in range(n)]          # 200: 6 blocks of 32 and one of 8
    results = star_on_threads(n, "q8", parts, hub)
    got = results[0][0]
    for r, (other, sent) in enumerate(results):
        assert np.array_equal(other.view(np.uint32), got.view(np.uint32)), f"rank {r} differs from rank 0"
        assert sent == Q8.wire_bytes((6, 200)) * (n - 1 if r == hub else 1)
    exact = np.sum([p.astype(np.float64) for p in parts], axis=0)
    # every part rounded once, then the total once (its scale read off the result: max |q| is 127)
    bound = sum(q8_bound(p) for p in parts) + q8_bound(got) * 1.001 + 1e-5 * np.abs(exact).max()
    assert np.all(np.abs(got - exact) <= bound)
    assert not np.array_equal(got, exact.astype(np.float32))          # it did compress


@pytest.mark.parametrize("payload", ["bf16", "q8"])
def test_a_rows_sum_is_the_same_bits_alone_and_in_a_batch(payload):
    n = 3
    parts = [activations((5, 72), 30 + r) for r in range(n)]
    together = star_on_threads(n, payload, parts)[0][0]
    for i in range(5):
        alone = star_on_threads(n, payload, [p[i:i + 1] for p in parts])[0][0]
        assert np.array_equal(alone.view(np.uint32), together[i:i + 1].view(np.uint32)), f"row {i}"


def test_the_sum_returns_in_the_callers_dtype():
    parts = [activations((2, 64), 40 + r) for r in range(2)]

    def rank_main(comm):
        return Allreduce(comm, "star", 0, "q8")(torch.from_numpy(parts[comm.rank]).to(torch.bfloat16))
    a, b = run_ranks(2, rank_main)
    assert a.dtype == torch.bfloat16 and torch.equal(a, b)


# --- what refuses a compressed payload ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["mpi", "ring", "recdouble"])
def test_only_star_or_auto_carries_a_compressed_payload(mode):
    with pytest.raises(ConfigError, match=f"--allreduce-payload bf16 needs --allreduce star or auto.*{mode} adds"):
        RunConfig(allreduce=mode, allreduce_payload="bf16")
    with pytest.raises(ConfigError, match="--allreduce-payload 'fp16'"):
        RunConfig(allreduce_payload="fp16")
    RunConfig(allreduce=mode, allreduce_payload="fp32")
    RunConfig(allreduce="auto", allreduce_payload="q8")


def test_auto_with_a_compressed_payload_picks_star_alone_and_refuses_a_switch():
    class FourRanks:
        size, rank = 4, 0
    reduce = Allreduce(FourRanks(), "auto", payload="q8")
    assert reduce.auto.candidates == ("star",)
    assert reduce.keep_sum_order() and reduce.auto.candidates == ("star",)
    with pytest.raises(ConfigError, match="needs --allreduce star or auto"):
        reduce.run("ring", np.zeros(4, np.float32))
    assert Allreduce(FourRanks(), "auto").auto.candidates == ("star", "mpi", "ring", "recdouble")


def test_codecs_cover_the_payload_names():
    from tpi_mpi.config import ALLREDUCE_PAYLOADS
    assert set(CODECS) == set(ALLREDUCE_PAYLOADS) and CODECS["fp32"] is None


# --- end to end -------------------------------------------------------------------------------------

@pytest.mark.mpi
def test_generate_with_compressed_payloads_moves_logits_a_little(checkpoints, tmp_path):
    """2 ranks, the same prompt: bf16 and q8 payloads change every position's logits (they did
    compress) by a small fraction of the logits' range (they still sum right)."""
    model = checkpoints("llama")
    logits = {}
    for payload in ("fp32", "bf16", "q8"):
        out = tmp_path / f"{payload}.npy"
        r = run_tpi(["generate", "--model", str(model), "--cache-dir", str(tmp_path / "cache"), "--temperature", "0",
                     "--dtype", "fp32", "--kv-dtype", "fp32", "--allreduce", "star", "--allreduce-payload", payload,
                     "--prompt", "Edge devices split the quick brown fox", "--max-new-tokens", "1", "--quiet",
                     "--dump-prompt-logits", str(out)], n=2, timeout=180)
        assert r.returncode == 0, r.stderr
        logits[payload] = np.load(out)
    base = logits["fp32"]
    scale = np.abs(base).max()
    for payload, tol in (("bf16", 0.02), ("q8", 0.05)):
        diff = np.abs(logits[payload] - base).max(axis=1)
        assert np.all(diff > 0), f"{payload}: some positions' logits unchanged: {diff}"
        assert diff.max() < tol * scale, f"{payload}: {diff.max()} against logits up to {scale}"
