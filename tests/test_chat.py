"""Multi-turn chat: the KV cache kept across turns gives the same answers as a fresh prefill."""

import os
import sys
import threading
import time

import pytest

from conftest import mpi_env, mpirun_cmd, run_mpi, run_tpi
from tpi_mpi.chat import Chat, chat_loop, common_prefix, read_until
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
    # no /exit: Open MPI never passes the pipe's end on to rank 0, which sees mpirun's input end instead
    unended = run_mpi(cmd, input="Hello there\nWhat did I say?\n", capture_output=True, text=True, timeout=120,
                      env=mpi_env())
    assert unended.returncode == 0, unended.stderr
    assert unended.stdout == r.stdout


def test_piped_lines_end_when_their_source_has_though_the_pipe_stays_open():
    """read_until, as rank 0 reads under mpirun: mpirun keeps its end of rank 0's pipe open, so the end
    comes from `ended` (mpirun's own input read through) and a quiet moment; lines split across writes
    and a last line without a newline arrive whole."""
    r, w = os.pipe()
    ended = threading.Event()

    def write_slowly():
        os.write(w, b"one\ntw")
        time.sleep(0.3)
        os.write(w, b"o\nthree")
        ended.set()

    threading.Thread(target=write_slowly).start()
    start = time.monotonic()
    try:
        assert list(read_until(r, ended.is_set, grace=0.2)) == ["one\n", "two\n", "three"]
        assert time.monotonic() - start < 5
    finally:
        os.close(w)
        os.close(r)
