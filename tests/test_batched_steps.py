"""Batched steps (batch.py, scheduler.plan_step, the model over a Batch): the bookkeeping, the
scheduling policy, and the promise they exist for: a sequence's logits are the same bits whether
it runs alone or among others that arrive at other steps with other prompt lengths. Ranks are
threads (fake_comm), as in test_ranks_in_process; no mpirun."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_comm import run_ranks
from tpi_mpi import quant_int8 as QI
from tpi_mpi import rowops
from tpi_mpi.batch import PIECE, Batch, SeqStep, Want, split_rows
from tpi_mpi.kv import BlockPool
from tpi_mpi.config import ParallelConfig
from tpi_mpi.jobs import Job
from tpi_mpi.model import Transformer
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.scheduler import Batcher, Sequence, plan_step
from tpi_mpi.steps import Root, follow
from tpi_mpi.weights import EmbeddingTable, Shard, WeightWindow


def test_batch_pieces_positions_and_logit_rows():
    seqs = [SeqStep(0, 0, 70, Want.LAST, ((0, 5),)), SeqStep(3, 5, 1, runs=((5, 1),)),
            SeqStep(1, 9, 2, Want.ALL, ((6, 1),)), SeqStep(2, 40, 3, Want.NONE, ((7, 2), (10, 1)))]
    b = Batch(seqs, invariant=True)
    assert [(p.seq, p.start, p.stop, p.pos) for p in b.rows.pieces] == [
        (0, 0, 32, 0), (0, 32, 64, 32), (0, 64, 70, 64), (1, 70, 71, 5), (2, 71, 73, 9), (3, 73, 76, 40)]
    assert [p.one_row for p in b.rows.pieces] == [False, False, False, True, False, False]
    assert b.rows.invariant and b.head.invariant
    plain = Batch(seqs)                          # one sequence's step (generate): a piece per sequence
    assert [(p.start, p.stop) for p in plain.rows.pieces] == [(0, 70), (70, 71), (71, 73), (73, 76)]
    assert not plain.rows.invariant
    assert b.n_rows == 76 and b.positions.tolist() == [*range(70), 5, 9, 10, 40, 41, 42]
    assert b.head_rows.tolist() == [69, 70, 71, 72]                # last of LAST, every row of ALL, none of NONE
    assert b.logit_spans == [(0, 1), (1, 2), (2, 4), (4, 4)]
    again = Batch.unpack(b.pack(), len(seqs), invariant=True)
    assert again.seqs == b.seqs and again.invariant and again.pack().dtype == np.int64


@pytest.mark.parametrize("seqs,words", [
    ([SeqStep(0, 0, 1), SeqStep(0, 4, 1)], "slot appears twice"),
    ([SeqStep(0, 0, 0)], "at least one token"),
    ([], "at least one sequence"),
])
def test_batch_refuses_what_it_cannot_compute(seqs, words):
    with pytest.raises(ValueError, match=words):
        Batch(seqs)


def test_split_rows_computes_single_rows_together_and_pieces_alone():
    b = Batch([SeqStep(0, 0, 1, runs=((0, 1),)), SeqStep(1, 0, 40, runs=((1, 3),)), SeqStep(2, 7, 1, runs=((4, 1),))],
              invariant=True)
    calls = []

    def one(x):
        calls.append(("one", x.shape[0]))
        return x * 2

    def many(x):
        calls.append(("many", x.shape[0]))
        return x * 3

    x = torch.arange(42.0)[:, None]
    y = split_rows(x, b.rows.pieces, one, many)
    assert sorted(calls) == [("many", 8), ("many", 32), ("one", 2)]
    expected = x * 3
    expected[[0, 41]] = x[[0, 41]] * 2
    assert torch.equal(y, expected)


def seq(slot: int, prompt: int, fed: int = 0, generated: int = 0) -> Sequence:
    job = SimpleNamespace(prompt_ids=list(range(prompt)), cancelled=False, keep_prompt_logits=False)
    return Sequence(job, slot, None, None, None, fed=fed, generated=[1] * generated, prefill=job.prompt_ids)


def test_plan_step_decodes_all_and_finishes_short_prompts_before_long_ones():
    decoding, long, short, other, third = seq(0, 10, 10, 1), seq(1, 300), seq(2, 20), seq(3, 50), seq(4, 200)
    plan = plan_step([decoding, long, short, other, third], chunk=64)
    # FINISHING (4) chunks for prompts that end here: 20 and 50 fit, then 200 no longer does
    assert [(s.slot, n) for s, n in plan] == [(0, 1), (2, 20), (3, 50)]
    plan = plan_step([decoding, long], chunk=64)
    assert [(s.slot, n) for s, n in plan] == [(0, 1), (1, 64)]        # a long prompt moves one chunk on
    long.fed = 256
    assert [(s.slot, n) for s, n in plan_step([long], chunk=64)] == [(1, 44)]    # its end: all that is left
    with pytest.raises(AssertionError):
        plan_step([long], chunk=PIECE + 1)                            # chunks keep pieces on PIECE boundaries


# --- alone and in a batch: the same bits ---------------------------------------------------------

class RecordingRoot(Root):
    """The real rank 0 side of the steps, keeping every logits row a token is sampled from, by slot."""

    def __init__(self, session) -> None:
        super().__init__(session)
        self.logits: dict[int, list[torch.Tensor]] = {}

    def step(self, seqs, ids):
        out = super().step(seqs, ids)
        for seq, x in zip(seqs, out):
            if x is not None:
                self.logits.setdefault(seq.slot, []).append(x[-1].clone())
        return out


def run_requests(prepared, n: int, requests: list[tuple[int, list[int]]], n_new: int, chunk: int):
    """Greedy generation of `requests` (arrival step, prompt ids) on n rank threads through the real
    step protocol (steps.Root and follow) and scheduler (scheduler.Batcher, 3 slots); returns rank
    0's logits rows per request, one per new token."""

    def rank_main(comm):
        r = comm.rank
        shard = Shard(prepared / f"rank{r}", r, n)
        window = WeightWindow(shard, None)
        try:
            model = Transformer(shard.model, shard.shards, r, comm, window, shard.dtype, kv_blocks=64)
            model.load_resident(shard.read("common.safetensors")[1])
            codec = SimpleNamespace(decode=lambda ids: "", stop_ids=lambda: set())   # greedy ids, no text
            session = SimpleNamespace(comm=comm, model_config=shard.model, dtype=shard.dtype, batch_invariant=True,
                                      embed=EmbeddingTable(shard) if r == 0 else None, codec=codec,
                                      kv_pool=BlockPool(64) if r == 0 else None,
                                      forward=lambda h, batch: model(h, batch))
            if r:
                follow(session)
                return None
            root = RecordingRoot(session)
            batcher = Batcher(root, 3, chunk, shard.model.max_seq_len, set())
            pending = sorted(range(len(requests)), key=lambda i: requests[i][0])
            slot_of, done, step = {}, {}, 0
            while pending or batcher.running:
                while pending and requests[pending[0]][0] <= step and batcher.free_slots:
                    i = pending.pop(0)
                    job = ListJob(str(i), requests[i][1], SamplingConfig(0.0), n_new, [], True)
                    slot_of[i] = batcher.admit(job).slot
                    root.logits.pop(slot_of[i], None)           # a slot freed by an earlier request
                batcher.step()                                  # nothing running yet: a step of nothing
                step += 1
                for i, slot in slot_of.items():
                    if i not in done and len(root.logits.get(slot, [])) == n_new:
                        done[i] = root.logits[slot]
            root.stop()
            return done
        finally:
            window.close()

    return run_ranks(n, rank_main)[0]


@pytest.fixture
def one_torch_thread():
    """The rank threads compute with one torch thread each (the machine may have 2 cores); the count is
    put back after the test."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("name,n,dtype,quant", [("llama", 1, "fp32", "none"), ("llama", 2, "fp32", "none"),
                                                ("llama", 3, "fp32", "none"), ("mistral", 2, "bf16", "none"),
                                                ("qwen2", 2, "fp32", "q8_0"), ("llama", 3, "fp32", "q4_0"),
                                                ("qwen3_moe", 2, "fp32", "none"), ("mixtral", 3, "fp32", "q8_0")])
def test_a_sequence_gets_the_same_bits_alone_and_in_a_batch(checkpoints, tmp_path, name, n, dtype, quant,
                                                            one_torch_thread):
    prepared = prepare(checkpoints(name), tmp_path / "p", ParallelConfig(n), dtype, quant=quant)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 200, size=k).tolist() for k in (5, 70, 33, 1)]
    arrivals = [0, 1, 3, 4]                     # a new prompt while others prefill and decode
    n_new = 6
    alone = [run_requests(prepared, n, [(0, p)], n_new, chunk=512)[0] for p in prompts]
    together = run_requests(prepared, n, list(zip(arrivals, prompts)), n_new, chunk=PIECE)
    for i in range(len(prompts)):
        assert len(together[i]) == len(alone[i]) == n_new
        for step, (a, b) in enumerate(zip(alone[i], together[i])):
            assert torch.equal(a, b), f"request {i} (prompt {len(prompts[i])}), token {step}: {(a - b).abs().max()}"


class CountedKernels:
    """tpi_mpi._qdot with its half-layer calls counted."""

    def __init__(self, qdot) -> None:
        self.qdot, self.calls = qdot, {"attention_rows": 0, "mlp_rows": 0}

    def __getattr__(self, name):
        if name in self.calls:
            self.calls[name] += 1
        return getattr(self.qdot, name)


@pytest.mark.skipif(not QI.int8_available(), reason="tpi_mpi._qdot was not compiled")
@pytest.mark.parametrize("name,n,quant", [("qwen2", 2, "q8_0"), ("llama", 2, "q4_0"), ("qwen3", 2, "q8_0")])
def test_under_the_int8_kernels_a_decode_row_gets_the_same_bits_in_one_call_as_step_by_step(
        checkpoints, tmp_path, monkeypatch, name, n, quant, one_torch_thread):
    """Alone, a sequence's decode steps are steps of decode rows only, each half-layer one compiled call
    (rowops.decode_attention); among prompts being prefilled, its rows go step by step. Same bits
    (qwen2: q/k/v biases; qwen3: q/k norms)."""
    prepared = prepare(checkpoints(name), tmp_path / "p", ParallelConfig(n), "fp32", quant=quant)
    counted = CountedKernels(rowops._qdot())
    monkeypatch.setattr(rowops, "_qdot", lambda: counted)
    QI.use_int8(True)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 200, size=k).tolist() for k in (40, 3, 90)]
    n_new = 5
    alone = run_requests(prepared, n, [(0, prompts[0])], n_new, chunk=512)[0]
    for calls in counted.calls.values():                            # its decode steps: every layer, every rank
        assert calls >= (n_new - 1) * 2 * n
    together = run_requests(prepared, n, [(0, prompts[0]), (1, prompts[1]), (2, prompts[2])], n_new, chunk=PIECE)[0]
    for step, (a, b) in enumerate(zip(alone, together)):
        assert torch.equal(a, b), f"token {step}: {(a - b).abs().max()}"


@pytest.mark.parametrize("size,mode,candidates,kept", [
    (2, "ring", ("star", "mpi", "ring", "recdouble"), True),    # two ranks: every order is a + b
    (3, "auto", ("star", "recdouble"), True),                  # (r0 + r1) + r2 both ways
    (3, "mpi", ("star", "recdouble"), False),
    (4, "auto", ("star",), True),                              # recdouble adds (r0 + r1) + (r2 + r3)
    (4, "recdouble", ("star",), False),
])
def test_serving_keeps_each_sum_in_one_order_whatever_the_batch(size, mode, candidates, kept):
    from tpi_mpi.allreduce import Allreduce

    a = Allreduce(SimpleNamespace(size=size), mode)
    assert a.keep_sum_order() == kept
    assert a.auto.candidates == candidates


# --- the batcher's bookkeeping with a scripted model -----------------------------------------------

class ScriptedRoot:
    """A Root stand-in: each sequence's next token is read from a script by its slot, and the text
    of token t is the letter chr(t)."""

    def __init__(self, scripts: dict[int, list[int]], kv_blocks: int = 64) -> None:
        self.scripts, self.steps = scripts, []
        codec = SimpleNamespace(decode=lambda ids: "".join(chr(t) for t in ids))
        self.session = SimpleNamespace(codec=codec, kv_pool=BlockPool(kv_blocks))

    def step(self, seqs, ids):
        self.steps.append([(s.slot, s.pos, s.n_tokens) for s in seqs])
        out = []
        for s in seqs:
            if s.want == Want.NONE:
                out.append(None)
                continue
            done = s.pos + s.n_tokens - len(self.prompts[s.slot])         # tokens generated so far
            logits = torch.zeros(1, 128)
            logits[0, self.scripts[s.slot][done]] = 1.0
            out.append(logits)
        return out


class ListJob(Job):
    """A Job whose events go to a list."""

    def send(self, kind, value):
        self.__dict__.setdefault("events", []).append((kind, value))


class TokenJob(ListJob):
    """Records each token the batcher sends and the text sent with it."""

    def token(self, token, text):
        self.__dict__.setdefault("tokens", []).append(token)
        self.__dict__.setdefault("texts", []).append(text)
        super().token(token, text)


def job(prompt: int, max_tokens: int = 10, stops=(), ignore_eos=False, generated=()):
    j = TokenJob("j", list(range(1, prompt + 1)), SamplingConfig(0.0), max_tokens, list(stops), ignore_eos,
                generated=list(generated))
    j.events = []
    return j


def test_batcher_ends_each_sequence_on_its_own_and_frees_its_slot():
    eos = 0
    root = ScriptedRoot({0: [ord(c) for c in "abcdef"], 1: [ord("x"), ord("y"), eos, ord("z")],
                         2: [ord(c) for c in "hello world"]})
    b = Batcher(root, max_batch=3, chunk=PIECE, context=64, eos={eos})
    jobs = [job(40, max_tokens=4), job(3), job(5, stops=["lo w"])]
    seqs = [b.admit(j) for j in jobs]
    root.prompts = {s.slot: s.job.prompt_ids for s in seqs}
    ended = []
    for _ in range(20):
        if not b.running:
            break
        ended += [(s.slot, s.reason) for s in b.step()]
    assert sorted(ended) == [(0, "length"), (1, "stop"), (2, "stop")]
    text = {i: "".join(v for k, v in j.events if k == "text") for i, j in enumerate(jobs)}
    assert text == {0: "abcd", 1: "xy\x00", 2: "hel"}                  # cut before the stop string
    done = {i: [v for k, v in j.events if k == "done"] for i, j in enumerate(jobs)}
    assert done[0] == [{"finish_reason": "length", "usage": {"prompt_tokens": 40, "completion_tokens": 4,
                                                              "total_tokens": 44}}]
    assert [d["finish_reason"] for d in done[1] + done[2]] == ["stop", "stop"]
    # all three prompts end within FINISHING chunks: one step, shortest first; then a token of each
    assert root.steps[:2] == [[(1, 0, 3), (2, 0, 5), (0, 0, 40)], [(0, 40, 1), (1, 3, 1), (2, 5, 1)]]
    assert b.free_slots == 3


def test_batcher_admits_a_request_only_with_the_blocks_of_what_it_can_use_and_frees_them_at_its_end():
    root = ScriptedRoot({0: [ord("a")] * 40, 1: [ord("b")] * 40}, kv_blocks=4)      # a pool of 64 positions
    b = Batcher(root, max_batch=2, chunk=PIECE, context=64, eos=set())
    first, second = job(20, max_tokens=20), job(10, max_tokens=30)
    assert b.positions(first) == 40 and b.positions(job(60, max_tokens=20)) == 64     # at most the context
    assert b.fits(first)
    root.prompts = {b.admit(first).slot: first.prompt_ids}
    assert b.pool.free_blocks == 1 and not b.fits(second)        # 40 positions: 3 blocks of 16 held
    while b.running:
        b.step()
    assert b.pool.free_blocks == 4 and b.fits(second)            # its blocks back in the pool


def test_batcher_drops_a_cancelled_sequence_without_a_reply():
    root = ScriptedRoot({0: [ord("a")] * 50})
    b = Batcher(root, max_batch=2, chunk=PIECE, context=64, eos=set())
    j = job(2, max_tokens=50)
    root.prompts = {b.admit(j).slot: j.prompt_ids}
    b.step()
    b.step()
    j.cancelled = True
    assert [s.reason for s in b.step()] == ["gone"]
    assert not b.running and not [e for e in j.events if e[0] == "done"]


class RandomRoot(ScriptedRoot):
    """Logits drawn anew for every position, the same whichever way the position was reached."""

    def step(self, seqs, ids):
        out = []
        for s in seqs:
            done = s.pos + s.n_tokens - len(self.prompts[s.slot])
            g = torch.Generator().manual_seed(done)
            out.append(None if s.want == Want.NONE else torch.randn(1, 128, generator=g) * 3)
        return out


def run_alone(root, job_, max_batch=1):
    b = Batcher(root, max_batch=max_batch, chunk=PIECE, context=64, eos={0})
    root.prompts = {b.admit(job_).slot: job_.prompt_ids}
    while b.running:
        b.step()
    return job_


@pytest.mark.parametrize("cut", [0, 3, 4, 7, 9])
def test_a_resumed_request_sends_exactly_the_rest_of_its_answer(cut):
    """A request resumed with the tokens its client had (as after an engine restart): the text sent
    before the cut plus the text sent after it is the uninterrupted text; the stop string spans the cut."""
    script = [ord(c) for c in "hello world"]
    whole = run_alone(ScriptedRoot({0: script}), job(5, stops=["lo w"], max_tokens=20))
    before = "".join(whole.texts[:cut])                  # what the client had with the first `cut` tokens
    sent = script[:cut]
    rest = run_alone(ScriptedRoot({0: script}), job(5, stops=["lo w"], max_tokens=20, generated=sent))
    assert before + "".join(v for k, v in rest.events if k == "text") == "hel"
    assert [v for k, v in rest.events if k == "done"] == [v for k, v in whole.events if k == "done"]

    # sampled with a seed: the generator moves on as if the first tokens had been sampled here
    def sampled(generated=()):
        j = TokenJob("s", [1, 2, 3], SamplingConfig(1.0, seed=5), 12, [], True, generated=list(generated))
        return run_alone(RandomRoot({}), j)

    tokens = sampled().tokens
    assert len(set(tokens)) > 3                                 # really sampled
    assert sampled(tokens[:cut]).tokens == tokens[cut:]


def test_a_resumed_request_that_had_ended_ends_at_once():
    rest = run_alone(ScriptedRoot({0: [ord("a")] * 9}), job(3, max_tokens=4, generated=[ord("a")] * 4))
    assert rest.events == [("done", {"finish_reason": "length", "usage": {
        "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})]
