"""Speculative decoding (draft.py): prompt lookup's proposals, how much it asks for, the accept rule
(greedy: the target's tokens; sampled: the target's distribution), and that a greedy answer is the
same tokens with a draft as without."""

import json
import re

import numpy as np
import pytest

from conftest import run_tpi
from tpi_mpi.config import ParallelConfig, RunConfig
from tpi_mpi.draft import K_MAX, NgramDraft, Speculation, accept
from tpi_mpi.generate import run_generation
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig, distribution
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root


def test_prompt_lookup_proposes_what_followed_the_longest_earlier_match():
    d = NgramDraft()
    d.extend([1, 2, 3, 4, 5, 9, 2, 3])
    assert d.propose(3) == [4, 5, 9]               # "2 3" came before, followed by 4 5 9
    d.extend([7])
    assert d.propose(3) == []                      # "3 7" never came before (single tokens are not matched)
    d.extend([1, 2, 3])
    assert d.propose(2) == [4, 5]                  # "1 2 3" came at the start: longer than "2 3" at 6-7
    d.extend([4])
    assert d.propose(8) == [5, 9, 2, 3, 7, 1, 2, 3]   # "1 2 3 4": only the start has it


def test_the_draft_asks_for_the_k_that_gives_most_tokens_per_second_and_sits_out_when_none_pays():
    s = Speculation(NgramDraft(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2])    # proposes 3 4 5 ... after "1 2"
    assert s.best_k(10) == 3                         # the prior (half accepted, a row 5% of a step): 3
    assert s.propose(2) == [3, 4]                    # at most the room left
    for _ in range(5):
        s.checked(8, 8, step_s=1.2)                  # all accepted: the rate nears 1
    s.plain(1.0)
    assert s.best_k(10) == K_MAX and s.propose(10) == [3, 4, 5, 6, 7, 8, 9, 10]
    s.draft_s = 3.0                                  # a draft slower than the steps it saves: none
    assert s.best_k(10) == 0
    assert s.stats() == {"proposed": 40, "accepted": 40, "checks": 5}

    s = Speculation(NgramDraft(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2])
    s.plain(1.0)
    for _ in range(5):
        s.checked(3, 0, step_s=1.6)                  # misses, and each checked row costs a fifth of a step
    assert 0.1 < s.row_cost < 0.2 and s.hits / s.tries < 0.1 and s.best_k(10) == 0
    assert s.propose(10) == [] and s.idle == 1 and s.propose(10) == []      # sits out a step
    assert s.propose(10) == [3]                      # after the pause: one token, to see again
    s.checked(1, 0)
    assert s.propose(10) == [] and s.idle == 2       # still missing: a longer pause


def test_greedy_accept_takes_the_target_tokens_up_to_the_first_disagreement():
    logits = np.full((4, 6), -1.0)
    logits[[0, 1, 2, 3], [4, 2, 5, 1]] = 1.0       # the target's argmax after each prefix: 4, 2, 5, 1
    greedy, rng = SamplingConfig(0.0), np.random.default_rng(0)
    assert accept(logits, [4, 2, 5], greedy, rng) == [4, 2, 5, 1]      # all accepted, and one more
    assert accept(logits, [4, 3, 5], greedy, rng) == [4, 2]            # the correction, then stop
    assert accept(logits[:1], [], greedy, rng) == [4]


def test_sampled_accept_keeps_the_target_distribution():
    """Whatever the proposal, the first token taken is distributed as the target's sampler draws it."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 8)) * 2
    cfg = SamplingConfig(temperature=0.9, top_k=5, top_p=0.95)
    ids, p = distribution(logits[0], cfg)
    target = np.zeros(8)
    target[ids] = p
    n = 40000
    for proposal in ([int(ids[np.argmax(p)])], [int(ids[np.argmin(p)])], [int(np.setdiff1d(np.arange(8), ids)[0])]):
        counts = np.bincount([accept(logits, proposal, cfg, rng)[0] for _ in range(n)], minlength=8) / n
        assert np.abs(counts - target).max() < 0.015, (proposal, counts, target)


@pytest.fixture(scope="module")
def models(checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    return {"fp32": prepare(checkpoints("llama"), root / "f", ParallelConfig(1), "fp32"),
            "q8_0": prepare(checkpoints("llama"), root / "q", ParallelConfig(1), "fp32", quant="q8_0")}


PROMPT = [5, 9, 17, 33, 60, 5, 9, 17, 33, 60, 5, 9, 17]     # a repeating prompt: lookup has matches


def generate(folder, draft, matmul="auto", n_new=40):
    s = Session(RunConfig(model=str(folder), draft=draft, matmul=matmul, quiet=True))
    try:
        return run_generation(Root(s), PROMPT, SamplingConfig(0.0), n_new, ignore_eos=True)
    finally:
        s.close()


@pytest.mark.parametrize("model,matmul", [("fp32", "auto"), ("q8_0", "int8"), ("q8_0", "exact")])
def test_a_greedy_answer_is_the_same_tokens_with_the_draft_as_without(models, model, matmul):
    plain = generate(models[model], None, matmul)
    drafted = generate(models[model], "ngram", matmul)
    assert drafted.generated_ids == plain.generated_ids
    assert drafted.draft["checks"] > 0 and drafted.draft["proposed"] > 0, drafted.draft     # it did check drafts
    # every accepted token is a step saved
    assert drafted.steps == plain.steps - drafted.draft["accepted"], (drafted.steps, plain.steps, drafted.draft)


@pytest.mark.parametrize("draft", ["fp32", "q8_0"])
def test_a_draft_model_proposes_what_the_target_mostly_takes_and_changes_no_token(models, draft):
    """The target as its own draft agrees almost always (its proposals are computed as decode steps
    of a model of its own, in other pieces); its q8_0 copy mostly."""
    plain = generate(models["fp32"], None)
    drafted = generate(models["fp32"], str(models[draft]))
    assert drafted.generated_ids == plain.generated_ids
    d = drafted.draft
    assert d["accepted"] >= (0.9 if draft == "fp32" else 0.5) * d["proposed"] and d["checks"] > 0, d
    assert drafted.steps == plain.steps - d["accepted"] < plain.steps / 2       # most steps saved


def test_a_draft_with_another_tokenizer_is_a_clear_error(models, tmp_path):
    """Same vocabulary size, two token ids swapped: the draft's tokens would mean other text."""
    import shutil

    from tpi_mpi.errors import ConfigError

    other = tmp_path / "other"
    shutil.copytree(models["q8_0"], other)
    path = other / "rank0" / "tokenizer.json"
    text = path.read_text()
    e, t = (re.search(rf'"{c}": ?(\d+)', text) for c in "et")
    assert len(e.group(1)) == len(t.group(1))          # the same size: the manifest still takes the file
    swapped = text[:e.start(1)] + t.group(1) + text[e.end(1):t.start(1)] + e.group(1) + text[t.end(1):]
    path.write_text(swapped if e.start() < t.start() else text)
    assert json.loads(path.read_text())["model"]["vocab"]["e"] == int(t.group(1))
    with pytest.raises(ConfigError, match=r"--draft .*other: its tokenizer is not the model's \(the same text gives "
                                          r"other tokens\): a draft must share it"):
        generate(models["fp32"], str(other))


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_a_greedy_answer_is_the_same_tokens_with_the_draft_at_several_ranks(checkpoints, tmp_path, n):
    model = checkpoints("llama")
    args = ["generate", "--model", str(model), "--cache-dir", str(tmp_path / "c"), "--prompt", "a b c a b c a b c a b",
            "--max-new-tokens", "40", "--temperature", "0", "--ignore-eos", "--json", "--quiet", "--allreduce", "star"]
    runs = [run_tpi(args + extra, n) for extra in ([], ["--draft", "ngram"], ["--draft", str(model)])]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    plain, *drafted = (json.loads(r.stdout) for r in runs)     # the model's own weights its draft: on rank 0
    assert plain["draft"] is None
    for d in drafted:
        assert d["generated_ids"] == plain["generated_ids"]
        assert d["draft"]["checks"] > 0 and d["decode_steps"] == plain["decode_steps"] - d["draft"]["accepted"]


@pytest.mark.mpi
def test_served_answers_are_the_same_with_the_draft_alone_and_together(checkpoints, tmp_path):
    """serve --draft ngram: requests checked speculatively among others give their plain serve text."""
    import threading

    from test_serve import Server

    model = checkpoints("llama")
    prompts = ["a b c a b c a b c", "x y x y x y x", "Once upon a time"]
    texts = {}
    for draft in ([], ["--draft", "ngram"]):
        (tmp_path / str(bool(draft))).mkdir()
        server = Server(tmp_path / str(bool(draft)), ["--model", str(model), "--cache-dir", str(tmp_path / "c"),
                                                             "--max-batch", "4", *draft])
        try:
            server.wait_ready()
            client, out = server.client(), {}

            def ask(i):
                out[i] = client.completions.create(model="x", prompt=prompts[i], max_tokens=30, temperature=0,
                                                   extra_body={"ignore_eos": True}).choices[0].text

            alone = [ask(i) or out[i] for i in range(len(prompts))]
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            assert [out[i] for i in range(len(prompts))] == alone
            texts[bool(draft)] = alone
            if draft:          # the drafts were checked: some were proposed (and the log says how many taken)
                counts = re.findall(r"(\d+) of (\d+) drafted accepted", server.log.read_text())
                assert len(counts) == 2 * len(prompts) and sum(int(p) for _, p in counts) > 0, counts
        finally:
            server.close()
    assert texts[True] == texts[False]
