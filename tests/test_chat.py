"""Multi-turn chat: the KV cache kept across turns gives the same answers as a fresh prefill."""

import sys

import pytest

from conftest import mpi_env, mpirun_cmd, run_mpi, run_tpi
from tpi_mpi.chat import Chat, chat_loop, common_prefix
from tpi_mpi.config import ParallelConfig
from tpi_mpi.config import RunConfig
from tpi_mpi.generate import run_generation
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def test_second_turn_with_kept_cache_equals_fresh_prefill(checkpoints, tmp_path, capsys):
    folder = prepare(checkpoints("llama"), tmp_path / "p", ParallelConfig(1))
    s = Session(RunConfig(model=str(folder), window=None, quiet=True))
    try:
        root = Root(s)
        chat = Chat(root, GREEDY, 10, system="Be brief.")
        first = chat.turn("Hello there", sys.stdout)
        cached_after_first = list(chat.cached)
        second = chat.turn("What did I say?", sys.stdout)
        # the second turn reused the first turn's cache: its prompt starts with those tokens
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                    {"role": "assistant", "content": first}, {"role": "user", "content": "What did I say?"}]
        ids = s.codec.encode_chat(messages)
        first_prompt = s.codec.encode_chat(messages[:2])
        assert common_prefix(cached_after_first, ids) >= len(first_prompt)
        fresh = run_generation(root, ids, GREEDY, 10)    # position 0: everything prefilled again
        assert fresh.text == second
        chat.reset()
        assert chat.turn("Hello there", sys.stdout) == first
    finally:
        s.close()


def test_full_context_is_reported_not_fatal(checkpoints, tmp_path, capsys):
    folder = prepare(checkpoints("llama"), tmp_path / "p", ParallelConfig(1))
    s = Session(RunConfig(model=str(folder), window=None, quiet=True))
    try:
        chat = Chat(Root(s), GREEDY, 4, system=None)
        answered = chat_loop(chat, ["word " * 300, "short one", "/exit", "never read"])
        assert answered == 1
        assert "context of 256 tokens is full" in capsys.readouterr().err
    finally:
        s.close()


@pytest.mark.mpi
def test_chat_from_piped_stdin_under_mpirun(checkpoints, tmp_path):
    model = checkpoints("llama")
    cmd = mpirun_cmd(2) + [sys.executable, "-m", "tpi_mpi", "chat", "--model", str(model), "--cache-dir",
                           str(tmp_path / "c"), "--temperature", "0", "--max-new-tokens", "6", "--quiet"]
    r = run_mpi(cmd, input="Hello there\nWhat did I say?\n/exit\n", capture_output=True, text=True,
                timeout=120, env=mpi_env())
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2      # one answer per message
    (tmp_path / "msgs.txt").write_text("Hello there\nWhat did I say?\n")
    f = run_tpi(["chat", "--model", str(model), "--cache-dir", str(tmp_path / "c"), "--temperature", "0",
                 "--max-new-tokens", "6", "--quiet", "--input", str(tmp_path / "msgs.txt")], n=2)
    assert f.returncode == 0, f.stderr
    assert f.stdout == r.stdout
