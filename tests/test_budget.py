"""The memory budget's plan (budget.py) and the KV pool (kv.py): what fits, which blocks a sequence
gets, and that where its positions lie in the pool does not change a single bit of its answer."""

import numpy as np
import pytest
import torch

from tpi_mpi import budget
from tpi_mpi.budget import Terms, plan_window, pool_blocks, pool_floor, weights_peak
from tpi_mpi.config import KV_BLOCK, ParallelConfig, RunConfig
from tpi_mpi.errors import ShardError
from tpi_mpi.generate import run_generation
from tpi_mpi.kv import BlockPool, KVPoolFull, Place
from tpi_mpi.parallel import kv_bytes
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.weights import Shard, budget_terms

MiB = 2**20


@pytest.fixture(scope="module")
def prepared(checkpoints, tmp_path_factory):
    return prepare(checkpoints("qwen2", layers=3), tmp_path_factory.mktemp("p") / "p", ParallelConfig(1))


def test_plan_window_fits_the_budget(prepared):
    shard = Shard(prepared / "rank0", 0, 1)
    t = budget_terms(shard, 100 * MiB)
    blocks = [i["size"] for n, i in shard.files.items() if n.startswith("layer")]
    block = max(blocks)
    kv = kv_bytes(shard.model, shard.shards[0], 64, 4)
    assert kv == 2 * 3 * 2 * 16 * 64 * 4     # layers x kv heads x head_dim x positions x fp32
    fixed = 100 * MiB + shard.files["common.safetensors"]["size"] + kv
    assert plan_window(t, fixed + sum(blocks) + block, kv) == (None, 6)     # all fits
    assert plan_window(t, fixed + 3 * block, kv) == (2, 0)
    assert plan_window(t, fixed + 2 * block, kv) == (1, 0)
    with pytest.raises(ShardError, match="too small for rank 0: it needs at least"):
        plan_window(t, fixed + 2 * block - 1, kv)


def test_plan_window_keeps_blocks_resident_beyond_the_largest_useful_window(monkeypatch):
    monkeypatch.setattr(budget, "MAX_WINDOW", 1)
    sizes = [10, 20, 30, 40, 50, 60]
    t = Terms(sizes, 60, 1000)
    # window 1 (2 slots with the one computing), then the first blocks of a pass resident
    assert plan_window(t, 1000 + 120 + 60 + 7, 7) == (1, 3)
    assert plan_window(t, 1000 + 120 + 60 + 7 - 1, 7) == (1, 2)
    assert weights_peak(t, 1, 3) == 1000 + 120 + 60
    assert weights_peak(t, None, 6) == weights_peak(t, 1, 3, whole_in_cache=True) == 1000 + 210 + 60


def test_the_pool_takes_what_the_weights_leave_between_its_floor_and_its_most():
    per = 1000                                           # bytes per position
    # serve: a floor of one POOL_FLOOR request, at most max_batch x context
    assert pool_floor(4096, 8) == budget.POOL_FLOOR and pool_floor(300, 8) == 300 and pool_floor(4096, 1) == 4096
    assert pool_blocks(10**9, 10**9, per, 1024, 8 * 4096) == 1024 // KV_BLOCK             # nothing left: the floor
    assert pool_blocks(10**9, 10**9 - 3200 * per, per, 1024, 8 * 4096) == 3200 // KV_BLOCK  # what is left
    assert pool_blocks(10**12, 0, per, 1024, 8 * 4096) == 8 * 4096 // KV_BLOCK             # no more than it can use
    assert pool_blocks(10**12, 0, per, 100, 100) == 7                                      # generate: its reservation


def test_block_pool_holds_contiguous_runs_grows_them_in_place_and_scatters_only_when_it_must():
    pool = BlockPool(10)
    assert pool.hold(0, 3 * KV_BLOCK) == ((0, 3),)
    assert pool.hold(1, 1) == ((3, 1),)
    assert pool.hold(0, 3 * KV_BLOCK) == ((0, 3),)                  # holds enough already
    assert pool.hold(1, 2 * KV_BLOCK + 1) == ((3, 3),)             # grown in place
    assert pool.hold(0, 4 * KV_BLOCK) == ((0, 3), (6, 1))          # its neighbour is taken: a second run
    pool.release(1)
    assert pool.free_blocks == 6 and pool.hold(2, 2 * KV_BLOCK) == ((3, 2),)   # first fit
    assert pool.hold(3, 3 * KV_BLOCK) == ((7, 3),)
    pool.release(0)                                                 # free: 0-2, 5, 6
    assert not pool.can_hold(4, 6 * KV_BLOCK) and pool.can_hold(4, 5 * KV_BLOCK)
    assert pool.hold(4, 5 * KV_BLOCK) == ((0, 3), (5, 2))           # no run of 5: the lowest free blocks
    with pytest.raises(KVPoolFull, match="the KV pool has 0 free positions of 160, a sequence needs 16 more"):
        pool.hold(2, 3 * KV_BLOCK)


def test_a_place_of_several_runs_reads_and_writes_the_positions_one_run_would():
    store = torch.zeros(2, 8 * KV_BLOCK, 4)
    x = torch.randn(2, 40, 4)
    one, two = Place(((4, 3),), 40), Place(((1, 1), (5, 2)), 40)
    for place in (one, two):
        place.write(store, 0, x[:, :30])
        place.write(store, 30, x[:, 30:])
        torch.testing.assert_close(place.read(store, 40), x, rtol=0, atol=0)
    assert torch.equal(store[:, KV_BLOCK:2 * KV_BLOCK], x[:, :KV_BLOCK])         # the scattered run's first block
    with pytest.raises(ValueError, match="hold 48 positions, its step writes up to 49"):
        Place(((0, 3),), 49)


def test_an_answer_is_the_same_bits_whether_its_blocks_are_one_run_or_scattered(prepared):
    """Attention reads a sequence's keys through a slice (one run) or a gather (several runs)."""
    def answer(scatter: bool):
        s = Session(RunConfig(model=str(prepared), max_batch=4, context=256, quiet=True))
        try:
            pool = s.kv_pool
            if scatter:                                  # every other block taken: no run of 2 is free
                for b in range(pool.n_blocks):
                    pool.hold(100 + b, KV_BLOCK)
                for b in range(0, pool.n_blocks, 2):
                    pool.release(100 + b)
            g = run_generation(Root(s), [0, 5, 9, 17, 33, 2, 8], SamplingConfig(0.0), 30, ignore_eos=True,
                               keep_prompt_logits=True)
            return g, pool.held[0]
        finally:
            s.close()

    ref, runs = answer(False)
    got, scattered = answer(True)
    assert len(runs) == 1 and len(scattered) == 3              # 37 positions: 3 blocks
    assert got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(got.prompt_logits, ref.prompt_logits)
    np.testing.assert_array_equal(got.first_logits, ref.first_logits)
