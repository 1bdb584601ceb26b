"""The weight window: streamed blocks give exactly the resident results; bad shards are caught."""

import json

import numpy as np
import pytest

from conftest import run_tpi
from tpi_mpi import weights
from tpi_mpi.config import ParallelConfig, RunConfig
from tpi_mpi.errors import ShardError
from tpi_mpi.generate import run_generation
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.shard_format import block_file
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.weights import Shard, WeightWindow


@pytest.fixture(scope="module")
def prepared(checkpoints, tmp_path_factory):
    return prepare(checkpoints("qwen2", layers=3), tmp_path_factory.mktemp("p") / "p", ParallelConfig(1))


def generate(folder, window):
    s = Session(RunConfig(model=str(folder), window=window, quiet=True))
    try:
        root = Root(s)
        g = run_generation(root, [0, 5, 9, 17, 33, 2, 8], SamplingConfig(0.0), 12, ignore_eos=True,
                           keep_prompt_logits=True)
        return g, s.window
    finally:
        s.close()


@pytest.mark.parametrize("window", [1, 2, 3, 5, 100])
def test_windowed_equals_resident(prepared, window):
    ref, _ = generate(prepared, None)
    got, w = generate(prepared, window)
    assert got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(got.prompt_logits, ref.prompt_logits)
    if window < 6:   # 3 layers = 6 blocks; a larger window is simply resident
        assert w.depth == window
        blocks = sum(Shard(prepared / "rank0", 0, 1).files[block_file(i, k)]["size"]
                     for i in range(3) for k in ("attn", "mlp"))
        # the default budget holds the whole shard as page cache: each block is mapped once, in the first
        # pass, and kept (a window that reads its blocks anew every pass: test_quantized's "read")
        assert w.cached and w.bytes_read == blocks
    else:
        assert w.depth is None


def test_window_zero_is_refused(prepared):
    with pytest.raises(ShardError, match="at least 1 block"):
        WeightWindow(Shard(prepared / "rank0", 0, 1), 0)


@pytest.mark.mpi
def test_windowed_run_under_mpirun_matches_resident(checkpoints, tmp_path):
    model = checkpoints("llama")
    outs = []
    for window in ("all", "1", "3"):
        r = run_tpi(["generate", "--model", str(model), "--cache-dir", str(tmp_path / "c"), "--prompt", "hello there",
                     "--temperature", "0", "--max-new-tokens", "10", "--ignore-eos", "--json", "--quiet",
                     "--window", window, "--dump-logits", str(tmp_path / f"l{window}.npy")], n=2)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
        assert outs[-1]["window"] == (window if window == "all" else int(window))
    assert outs[0]["generated_ids"] == outs[1]["generated_ids"] == outs[2]["generated_ids"]
    np.testing.assert_array_equal(np.load(tmp_path / "lall.npy"), np.load(tmp_path / "l1.npy"))


def test_corrupt_block_is_named(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    path = copy / "rank0" / block_file(1, "mlp")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="layer001.mlp.safetensors does not match its manifest checksum"):
        WeightWindow(Shard(copy / "rank0", 0, 1), None)
    w = WeightWindow(Shard(copy / "rank0", 0, 1), 2)      # streamed: found when the block arrives
    try:
        with pytest.raises(ShardError, match="reading layer 1 mlp"):
            for i in range(3):
                for k in ("attn", "mlp"):
                    with w.use(i, k, _Sink()):
                        pass
    finally:
        w.close()


def test_truncated_shard_and_wrong_world_size(prepared, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    with pytest.raises(ShardError, match="prepared for 1 ranks, not 2"):
        Shard(copy / "rank0", 0, 2)
    path = copy / "rank0" / block_file(0, "attn")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="truncated or replaced"):
        Shard(copy / "rank0", 0, 1)


class _Sink:
    """Accepts any bound tensor (the window binds by attribute path)."""

    def get_submodule(self, name):
        return self


def test_resident_blocks_beside_a_window_give_the_resident_results(prepared, monkeypatch):
    import tpi_mpi.budget

    ref, _ = generate(prepared, None)
    monkeypatch.setattr(tpi_mpi.budget, "plan_window", lambda *a: (1, 4))    # window 1, 4 of 6 blocks resident
    got, w = generate(prepared, "auto")
    assert got.generated_ids == ref.generated_ids
    np.testing.assert_array_equal(got.prompt_logits, ref.prompt_logits)
    streamed = sum(Shard(prepared / "rank0", 0, 1).files[block_file(2, k)]["size"] for k in ("attn", "mlp"))
    assert (w.depth, w.pinned) == (1, 4) and len(w.resident) == 4
    # the resident blocks are read once, and so are the two streamed blocks of layer 2: the default budget
    # holds the whole shard as page cache, so they are mapped in the first pass and kept
    once = sum(Shard(prepared / "rank0", 0, 1).files[block_file(i, k)]["size"] for i in range(2) for k in ("attn", "mlp"))
    assert w.cached and w.bytes_read == once + streamed


@pytest.mark.mpi
def test_memory_budget_below_the_minimum_is_a_clear_error(checkpoints, tmp_path):
    r = run_tpi(["generate", "--model", str(checkpoints("llama")), "--cache-dir", str(tmp_path / "c"),
                 "--prompt", "hi", "--memory-budget", "10MB", "--quiet"], n=2)
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "memory budget of 9.54 MiB is too small for rank 0" in errors[0], r.stderr


def test_a_cgroup_limit_counts_its_anonymous_memory_not_its_page_cache(tmp_path, monkeypatch):
    """The default budget's free memory under a cgroup v1 limit: the limit less the group's anonymous
    memory (total_rss), never more than the host's MemAvailable; shared only by ranks in that group."""
    group = tmp_path / "memory" / "tpi_test"
    group.mkdir(parents=True)
    mib = 2**20
    (group / "memory.limit_in_bytes").write_text(str(400 * mib))
    (group / "memory.stat").write_text(f"cache {300 * mib}\nrss {90 * mib}\ntotal_cache {300 * mib}\n"
                                       f"total_rss {120 * mib}\n")
    monkeypatch.setattr(weights, "_cgroup_folders", lambda: [group])
    assert weights.available_memory() == 280 * mib            # 400 - 120: the 300 MiB of cache is free
    domain = weights.memory_domain()
    assert domain > 0
    monkeypatch.setattr(weights, "current_rss", lambda: 100 * mib)
    assert weights.default_budget(2) == int(0.9 * 400 * mib / 2)   # not 100 + 0.9 * 280 / 2: never past the limit
    monkeypatch.setattr(weights, "current_rss", lambda: 20 * mib)
    assert weights.default_budget(2) == 20 * mib + int(0.9 * 280 * mib / 2)
    (group / "memory.limit_in_bytes").write_text(str(2**63 - 4096))   # "no limit"
    assert weights.memory_domain() == 0 and weights.available_memory() > 280 * mib
