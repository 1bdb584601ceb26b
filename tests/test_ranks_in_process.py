"""The real parallel modules for N ranks in one process, against transformers; no mpirun.

Each rank is a thread with its own `Shard`, `WeightWindow` and `Transformer`, talking through
fake_comm.ThreadComm instead of MPI: rank 0 embeds and broadcasts the hidden states (as generate.py
does), every rank runs its slice, the allreduces and the logit gather go through the fake. The
prompt's logits at every position and the greedy continuation (decoded token by token with the KV
cache) must match transformers on the same random checkpoint. test_generate_vs_transformers makes
the same comparison end to end under mpirun (mpi tier); this is the fast tier's check of the
tensor parallelism itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from checkpoints import reference_run
from fake_comm import ThreadWorld, run_ranks
from tpi_mpi.batch import Batch, SeqStep, Want
from tpi_mpi.config import ParallelConfig
from tpi_mpi.errors import CommError
from tpi_mpi.model import Transformer
from tpi_mpi.parallel import RowParallelLinear
from tpi_mpi.prepare import hf_name, prepare
from tpi_mpi.weights import EmbeddingTable, Shard, WeightWindow

PROMPT = "Edge devices split the quick brown fox"
N_NEW = 16
# max |ours - transformers| / max |transformers| over the prompt's logits, float32 on both sides:
# the bound test_generate_vs_transformers holds the mpirun runs to
LOGITS_TOL = 1e-4

CASES = [
    # (checkpoint, ranks, ratio, window depth (None: resident), head_on)
    ("llama", 1, (), None, "split"),
    ("llama", 2, (), None, "split"),           # GQA (8 query heads over 2 kv heads), llama3 rope
    ("llama", 3, (), None, "split"),           # 3 ranks over 2 kv heads: a kv head on two ranks
    ("llama", 4, (), None, "split"),
    ("qwen2", 2, (), None, "split"),           # q/k/v biases, tied embeddings
    ("llama_hd", 4, (), None, "split"),        # 6 heads over 4 ranks, head_dim 16 != 48 / 6
    ("mistral", 2, (), None, "split"),         # 4 query heads share 1 kv head
    ("qwen3", 1, (), None, "split"),           # q/k norms, head_dim 32 with hidden 64 over 4 heads
    ("qwen3", 2, (), None, "split"),
    ("qwen3", 3, (), 1, "split"),              # streamed, a kv head on two ranks
    ("qwen3", 4, (), None, "split"),
    ("qwen3_moe", 1, (), None, "split"),       # routed experts, a dense layer beside them
    ("qwen3_moe", 2, (), 1, "split"),          # streamed blocks (attention, routers, the dense MLP)
    ("qwen3_moe", 3, (), None, "split"),       # 64 expert columns over 3 ranks: one with none
    ("qwen3_moe", 4, (), None, "split"),
    ("mixtral", 1, (), None, "split"),
    ("mixtral", 2, (), 1, "split"),
    ("mixtral", 3, (), None, "split"),         # 96 expert columns over 3 ranks: 32 each
    ("mixtral", 4, (3, 1, 1, 1), None, "split"),   # uneven: a rank with no expert columns
    ("llama", 2, (3, 1), None, "split"),       # uneven ratios
    ("llama", 4, (3, 1, 1, 1), None, "split"),
    ("qwen2", 3, (), 1, "split"),              # streamed: one block in memory at a time
    ("llama", 3, (), None, "rank0"),           # the whole output head on rank 0
    ("llama_hd", 3, (1, 2, 1), 2, "rank0"),    # all three at once
]


def case_id(c) -> str:
    name, n, ratio, depth, head_on = c
    return (f"{name}-n{n}" + (f"-r{','.join(map(str, ratio))}" if ratio else "")
            + (f"-window{depth}" if depth else "") + ("-head_on_rank0" if head_on == "rank0" else ""))


@pytest.fixture(autouse=True)
def one_thread_each():
    """N rank threads, each computing with one torch thread (the machine may have 2 cores)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """transformers on checkpoint `name`: (prompt ids, logits at every prompt position, greedy tokens)."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = checkpoints(name)
            ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids
            logits, tokens = reference_run(folder, ids, N_NEW)
            made[name] = ids, logits.numpy(), tokens
        return made[name]

    return get


def generate_in_threads(prepared, n: int, prompt_ids: list[int], n_new: int, depth: int | None = None,
                        cached: bool = False, resident_form=None):
    """Greedy generation on n rank threads: (rank 0's prompt logits, its tokens, every rank's results).
    `cached`: a window maps its blocks from the page cache instead of reading them into buffers;
    `resident_form`: what blocks kept in memory are turned into at load (WeightWindow)."""

    def rank_main(comm):
        r = comm.rank
        shard = Shard(prepared / f"rank{r}", r, n)
        window = WeightWindow(shard, depth, cached=cached, resident_form=resident_form)
        try:
            m = shard.model
            model = Transformer(m, shard.shards, r, comm, window, torch.float32, kv_blocks=16)
            common = shard.read("common.safetensors")[1]
            model.load_resident(resident_form(common) if resident_form else common)
            embed = EmbeddingTable(shard) if r == 0 else None

            def step(ids: list[int] | None, pos: int, all_logits: bool = False):
                header = np.array([len(ids) if r == 0 else 0, pos if r == 0 else 0], dtype=np.int64)
                comm.bcast(header)                             # the workers learn T and the position
                h = np.zeros((int(header[0]), m.dim), dtype=np.float32)
                if r == 0:
                    h[...] = embed[ids].float().numpy()
                comm.bcast(h)                                  # the same hidden states on every rank
                seq = SeqStep(0, int(header[1]), int(header[0]), Want.ALL if all_logits else Want.LAST, ((0, 16),))
                return model(torch.from_numpy(h), Batch([seq]))

            prompt_logits = step(prompt_ids, 0, all_logits=True)
            outputs = [prompt_logits]
            tokens = [int(prompt_logits[-1].argmax())] if r == 0 else []
            for i in range(1, n_new):
                logits = step(tokens[-1:] if r == 0 else None, len(prompt_ids) + i - 1)
                outputs.append(logits)
                if r == 0:
                    assert logits.shape == (1, m.vocab_size)
                    tokens.append(int(logits[-1].argmax()))
            return outputs, tokens, window
        finally:
            window.close()

    results = run_ranks(n, rank_main)
    outputs, tokens, _ = results[0]
    return outputs[0].numpy(), tokens, results


@pytest.mark.parametrize("name,n,ratio,depth,head_on", CASES, ids=[case_id(c) for c in CASES])
def test_threaded_ranks_match_transformers(checkpoints, reference, tmp_path, name, n, ratio, depth, head_on):
    prompt_ids, ref_logits, ref_tokens = reference(name)
    prepared = prepare(checkpoints(name), tmp_path / "p", ParallelConfig(n, ratio), "fp32", head_on=head_on)
    ours, tokens, results = generate_in_threads(prepared, n, prompt_ids, N_NEW, depth)

    assert ours.shape == ref_logits.shape == (len(prompt_ids), ref_logits.shape[1])
    err = np.abs(ours - ref_logits).max() / np.abs(ref_logits).max()
    assert err < LOGITS_TOL, err
    assert tokens == ref_tokens
    for r, (outputs, worker_tokens, window) in enumerate(results):
        assert window.depth == depth                      # the window asked for is the one that ran
        if r:                                             # the logits exist on rank 0 only
            assert all(o is None for o in outputs) and worker_tokens == []


def test_streamed_and_resident_windows_give_the_same_bits(checkpoints, tmp_path):
    """The window changes when blocks are read, never what is computed."""
    name, n = "qwen2", 2
    prompt_ids = Tokenizer.from_file(str(checkpoints(name) / "tokenizer.json")).encode(PROMPT).ids
    prepared = prepare(checkpoints(name), tmp_path / "p", ParallelConfig(n), "fp32")
    resident, tokens, _ = generate_in_threads(prepared, n, prompt_ids, 6, None)
    streamed, streamed_tokens, _ = generate_in_threads(prepared, n, prompt_ids, 6, 1)
    np.testing.assert_array_equal(streamed, resident)
    assert streamed_tokens == tokens


@pytest.mark.parametrize("name,n,ratio", [("llama", 3, (1, 2, 1)), ("llama_hd", 4, ())])
def test_row_parallel_partials_from_the_shards_sum_to_the_unsharded_layer(checkpoints, tmp_path, name, n, ratio):
    """o and down as prepare wrote them, one RowParallelLinear per rank, summed by the fake's
    allreduce: the unsharded projection of the checkpoint (NumPy, float64). test_parallel checks
    the same sum from plan_shards' slices of random matrices; this one goes through the files."""
    folder = checkpoints(name)
    hf = load_file(str(folder / "model.safetensors"))
    prepared = prepare(folder, tmp_path / "p", ParallelConfig(n, ratio), "fp32")
    rng = np.random.default_rng(0)
    for layer in (0, 1):
        for kind, proj in (("attn", "o"), ("mlp", "down")):
            full = hf[hf_name(f"{proj}.weight", layer)].astype(np.float64)          # (dim, in)
            x = rng.standard_normal((5, full.shape[1]))
            expected = x @ full.T

            def rank_main(comm):
                shard = Shard(prepared / f"rank{comm.rank}", comm.rank, n)
                s, hd = shard.shards[comm.rank], shard.model.head_dim
                lo, hi = (s.heads[0] * hd, s.heads[1] * hd) if proj == "o" else s.ffn
                linear = RowParallelLinear(comm)
                linear.weight = shard.read(f"layer{layer:03d}.{kind}.safetensors")[1][f"{proj}.weight"]
                assert linear.weight.shape == (full.shape[0], hi - lo)
                return linear(torch.from_numpy(x[:, lo:hi]).float()).numpy()

            sums = run_ranks(n, rank_main)
            for r in range(1, n):
                np.testing.assert_array_equal(sums[r], sums[0])                # one sum, on every rank
            np.testing.assert_allclose(sums[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                                       err_msg=f"layer {layer} {proj}")


# -- the fake itself ---------------------------------------------------------------------------------

def test_fake_comm_collectives():
    n = 3

    def rank_main(comm):
        r = comm.rank
        x = torch.full((2, 3), float(r + 1), dtype=torch.bfloat16)
        total = comm.allreduce(x)
        assert total.dtype == torch.bfloat16 and torch.equal(total, torch.full((2, 3), 6.0, dtype=torch.bfloat16))
        assert x[0, 0].item() == r + 1                                   # the input is left alone
        small = torch.tensor([1e8, 1.0, -1e8])[r:r + 1].repeat(4)        # float32, in rank order: 0 not 1
        summed = comm.allreduce(small)
        gathered = comm.gather_columns(torch.full((2, r + 1), float(r)), [1, 2, 3])
        buf = np.arange(5, dtype=np.int64) if r == 1 else np.zeros(5, dtype=np.int64)
        assert comm.bcast(buf, root=1) is buf
        floats = comm.gather_floats(r * 0.5)
        votes = (comm.agree(True), comm.agree(r != 2), comm.agree(r == 0))
        comm.barrier()
        return summed, gathered, buf, floats, votes, comm.stats.calls, comm.ranks_on_this_host()

    out = run_ranks(n, rank_main)
    expected_sum = (torch.tensor(1e8) + torch.tensor(1.0)) + torch.tensor(-1e8)
    for r, (summed, gathered, buf, floats, votes, calls, local) in enumerate(out):
        assert torch.equal(summed, torch.full((4,), expected_sum.item())) and summed[0].item() == 0.0
        assert (gathered is None) == (r != 0)
        assert np.array_equal(buf, np.arange(5))
        assert floats == ([0.0, 0.5, 1.0] if r == 0 else None)
        assert votes == (-1, 2, 1)
        assert calls == 9 and local == n
    assert torch.equal(out[0][1], torch.tensor([[0.0, 1, 1, 2, 2, 2]] * 2))


def test_fake_comm_fails_instead_of_hanging():
    def mismatched(comm):
        return comm.barrier() if comm.rank == 0 else comm.agree(True)

    with pytest.raises(CommError, match="different collectives: rank 0 barrier, rank 1 agree"):
        run_ranks(2, mismatched)

    def one_fails(comm):
        if comm.rank == 1:
            raise ValueError("rank 1 broke")
        comm.barrier()

    with pytest.raises(ValueError, match="rank 1 broke"):       # not the others' broken barrier
        run_ranks(3, one_fails)

    world = ThreadWorld(2, timeout=0.2)                           # rank 1 never arrives
    with pytest.raises(CommError, match="did not arrive within 0.2 s"):
        world.comm(0).barrier()
