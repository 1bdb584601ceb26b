"""Shard math and a rank-emulation check: summed row-parallel partials equal the unsharded layer."""

import pytest
import torch
import torch.nn.functional as F

from tpi_mpi.config import ModelConfig, ParallelConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.parallel import FFN_UNIT, plan_shards, split_by_ratio


def model(**kw) -> ModelConfig:
    base = dict(arch="llama", dim=64, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=8, ffn_dim=160, vocab_size=100)
    return ModelConfig(**(base | kw))


@pytest.mark.parametrize("total,ratio,unit", [(8, [1, 1], 1), (8, [3, 1, 1, 1], 1), (160, [1, 1, 1], 32),
                                              (11008, [3, 1, 1, 1], 32), (100, [1] * 7, 1), (8, [100, 1], 1),
                                              (50, [1, 1, 1, 1], 32)])
def test_split_covers_everything_in_order(total, ratio, unit):
    bounds = split_by_ratio(total, ratio, unit)
    assert len(bounds) == len(ratio)
    assert bounds[0][0] == 0 and bounds[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(hi >= lo for lo, hi in bounds)
    assert all(lo % unit == 0 for lo, _ in bounds)
    if total // unit >= len(ratio):
        assert all(hi - lo >= unit for lo, hi in bounds[:-1]) and bounds[-1][1] > bounds[-1][0]


def test_split_follows_the_ratio():
    assert split_by_ratio(8, [3, 1]) == [(0, 6), (6, 8)]
    assert split_by_ratio(11008, [1, 1, 1, 1], 32) == [(0, 2752), (2752, 5504), (5504, 8256), (8256, 11008)]
    assert split_by_ratio(8, [100, 1]) == [(0, 7), (7, 8)]   # nobody is left without a head


@pytest.mark.parametrize("world", range(1, 9))
def test_every_query_head_gets_its_kv_head(world):
    m = model()
    shards = plan_shards(m, ParallelConfig(world))
    assert sum(s.n_heads for s in shards) == m.n_heads
    for s in shards:
        for local, kv in enumerate(s.kv_index(m.group)):
            assert s.kv_heads[0] + kv == (s.heads[0] + local) // m.group
            assert 0 <= kv < s.n_kv_heads


def test_more_ranks_than_heads_is_refused():
    with pytest.raises(ConfigError, match="9 ranks but the model has only 8 query heads"):
        plan_shards(model(), ParallelConfig(9))


@pytest.mark.parametrize("ratio", [(1, 1), (3, 1, 1), ()])
def test_ratio_validation(ratio):
    ParallelConfig(len(ratio) or 2, ratio)
    with pytest.raises(ConfigError, match="parts for"):
        ParallelConfig(5, (1, 2))
    with pytest.raises(ConfigError, match="positive"):
        ParallelConfig(2, (1, 0))
    with pytest.raises(ConfigError, match="positive"):
        ParallelConfig(2, (1, -1))


@pytest.mark.parametrize("world,ratio", [(2, ()), (3, (1, 2, 1)), (4, ())])
def test_rank_emulation_mlp_partials_sum_to_unsharded(world, ratio):
    """All ranks in one process: column slices of gate/up, row slices of down, partials summed."""
    m = model()
    torch.manual_seed(0)
    x = torch.randn(5, m.dim)
    gate, up, down = torch.randn(m.ffn_dim, m.dim), torch.randn(m.ffn_dim, m.dim), torch.randn(m.dim, m.ffn_dim)
    full = F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
    total = torch.zeros_like(full)
    for s in plan_shards(m, ParallelConfig(world, ratio)):
        a, b = s.ffn
        assert a % FFN_UNIT == 0
        total += F.linear(F.silu(F.linear(x, gate[a:b])) * F.linear(x, up[a:b]), down[:, a:b])
    torch.testing.assert_close(total, full, rtol=1e-5, atol=1e-4)


def test_rank_emulation_vocab_split_concatenates_to_full_head():
    m = model()
    shards = plan_shards(m, ParallelConfig(3, (2, 1, 1)))
    head, x = torch.randn(m.vocab_size, m.dim), torch.randn(2, m.dim)
    parts = [F.linear(x, head[slice(*s.vocab)]) for s in shards]
    torch.testing.assert_close(torch.cat(parts, dim=1), F.linear(x, head))
    rank0 = plan_shards(m, ParallelConfig(3), head_on="rank0")
    assert rank0[0].vocab == (0, m.vocab_size) and all(s.vocab[0] == s.vocab[1] for s in rank0[1:])
