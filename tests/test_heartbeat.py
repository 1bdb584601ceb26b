"""The ranks' heartbeats and the supervisor's side of them, without MPI: beats read out of mpirun's
output, a frozen process named within the time limit, and a channel whose sends never block."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tpi_mpi.channel import Channel
from tpi_mpi.heartbeat import BEAT_S, MARK, Pulse
from tpi_mpi.processes import session_pids

ROOT = Path(__file__).resolve().parent.parent


def test_beats_are_taken_out_of_the_output_and_silence_is_timed():
    pulse = Pulse(3, timeout=1.0)             # while the engine starts: twice that
    t0 = pulse.started
    assert pulse.read(f"{MARK} 0\n", now=t0 + 0.5) == ""
    # a progress bar without a newline, then another rank's beat, on one line of mpirun's output
    assert pulse.read(f"ship to rank 1: 40%{MARK} 1\n", now=t0 + 0.5) == "ship to rank 1: 40%"
    assert pulse.read("tpi_mpi: loading\n", now=t0 + 0.6) == "tpi_mpi: loading\n"
    assert pulse.read(f"{MARK} 7\n", now=t0 + 0.6) == ""          # not a rank of this launch: ignored
    assert pulse.silent(now=t0 + 1.9) == []                        # rank 2 not heard yet: it has 2 s
    assert pulse.silent(now=t0 + 2.1) == [2]
    assert pulse.silent(now=t0 + 2.6) == [0, 1, 2]                 # 2.1 s since their last beat
    pulse.read(f"{MARK} 0\n{MARK} 1\n{MARK} 2\n", now=t0 + 3.0)
    pulse.starting = False                                         # serving: --comm-timeout itself
    assert pulse.silent(now=t0 + 3.9) == []
    pulse.read(f"{MARK} 1\n", now=t0 + 3.9)
    assert pulse.silent(now=t0 + 4.1) == [0, 2]
    assert pulse.longest == pytest.approx(2.5)                     # rank 0 beat at 0.5 s and 3.0 s


def beating_child(rank: int, stop_after: float | None) -> str:
    return ("import os, signal, sys, time\n"
            "from tpi_mpi.heartbeat import start_beating\n"
            f"start_beating({rank})\n"
            + (f"time.sleep({stop_after}); os.kill(os.getpid(), signal.SIGSTOP)\n" if stop_after is not None else "")
            + "time.sleep(60)\n")


def test_a_process_beats_until_it_is_frozen():
    p = subprocess.Popen([sys.executable, "-c", beating_child(3, None)], stdout=subprocess.PIPE, cwd=ROOT)
    try:
        os.set_blocking(p.stdout.fileno(), False)
        time.sleep(2.2)
        beats = (p.stdout.read() or b"").decode().splitlines()
        assert beats and set(beats) == {f"{MARK} 3 {socket.gethostname()}"}      # rank, node
        assert 2.2 / BEAT_S - 2 <= len(beats) <= 2.2 / BEAT_S + 1, beats
        p.send_signal(signal.SIGSTOP)
        time.sleep(0.1)
        p.stdout.read()
        time.sleep(1.5)
        assert not p.stdout.read()                                  # frozen: not one beat
    finally:
        p.kill()
        p.wait()


def test_the_engine_ends_and_names_the_rank_that_stopped_beating(monkeypatch):
    """An mpirun stand-in starts three beating "ranks"; rank 1 freezes after 1.5 s: the supervisor's
    EngineProcess names it (and only it) within the time limit and ends every process of the job.
    The stand-in never reports ready, so the limit is a starting engine's: twice --comm-timeout."""
    from tpi_mpi.engine_process import EngineProcess

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    launcher = ("import subprocess, sys\n"
                f"ranks = [subprocess.Popen([sys.executable, '-c', code]) for code in {[beating_child(r, 1.5 if r == 1 else None) for r in range(3)]!r}]\n"
                "[p.wait() for p in ranks]\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine = EngineProcess([sys.executable, "-c", launcher], listener, ["localhost", "board-b", "board-c"], 2.0)
    try:
        t0 = time.monotonic()
        while (failure := engine.silence()) is None and time.monotonic() - t0 < 15:
            time.sleep(0.05)
        named_after = time.monotonic() - t0 - 1.5
        assert failure is not None and failure.ranks == [1], failure
        # never ready: the limit of an engine that starts, twice --comm-timeout
        assert "rank 1 (board-b) gave no sign of life for 4 s (2 x --comm-timeout while starting)" in failure.message
        # its last beat came up to BEAT_S before it froze; its start-up (after t0) is the upper slack
        assert 4.0 - BEAT_S - 0.1 <= named_after < 4.0 + 2.5, named_after
        assert not session_pids(engine.proc.pid)                           # the frozen rank too
    finally:
        engine.end()
        listener.close()


def test_a_background_channel_never_blocks_the_sender():
    """The supervisor's sends to a rank 0 that has stopped reading (frozen) return at once, though
    far more than the socket holds is sent; closing the channel ends its writer."""
    a, b = socket.socketpair(socket.AF_UNIX)
    sender = Channel(a, background=True)
    t0 = time.monotonic()
    for i in range(200):
        assert sender.send({"job": {"id": f"cmpl-{i}", "prompt": list(range(2000))}})
    assert time.monotonic() - t0 < 2.0
    reader = Channel(b)
    assert [reader.recv(timeout=5)["job"]["id"] for _ in range(3)] == ["cmpl-0", "cmpl-1", "cmpl-2"]   # in order
    t0 = time.monotonic()
    sender.close()
    assert time.monotonic() - t0 < 1.0
    assert not sender.send({"cancel": "cmpl-0"})
    reader.close()


@pytest.mark.parametrize("given, engine_gets", [(None, "10"), ("3", "3"), ("60", "60")])
def test_serve_ranks_has_its_own_comm_timeout(given, engine_gets):
    import click

    from tpi_mpi.cli import serve
    from tpi_mpi.serving import ServeConfig
    from tpi_mpi.supervisor import SupervisorConfig

    args = ["--ranks", "2"] + (["--comm-timeout", given] if given else [])
    with click.Context(serve) as ctx:
        serve.parse_args(ctx, args)
        cfg = SupervisorConfig.from_command(ServeConfig(), ctx)
    assert cfg.comm_timeout == float(engine_gets)
    assert cfg.engine_args[:2] == ["--comm-timeout", engine_gets] and cfg.engine_args.count("--comm-timeout") == 1


def test_a_comm_timeout_shorter_than_the_heartbeats_is_refused():
    r = subprocess.run([sys.executable, "-m", "tpi_mpi", "serve", "--ranks", "2", "--comm-timeout", "1"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == \
        "tpi_mpi: error: --comm-timeout 1: under --ranks use at least 2 s (the ranks beat every 0.5 s)"


def test_a_host_mpirun_names_by_its_hostname_is_the_hostfile_s_address():
    """Open MPI names a host whose daemon died at launch by the hostname of its node, which a
    hostfile of addresses does not hold: the ranks' beats said which rank runs on which node."""
    from tpi_mpi.engine_process import EngineProcess

    said = (f"{MARK} 0 edge-0\n{MARK} 1 edge-1\n{MARK} 2 edge-2\n"
            "A daemon failed to report back after being spawned.\n  Local host:    edge-0\n"
            "  Remote host:   edge-2\n  Daemon exit status: 0\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    engine = EngineProcess([sys.executable, "-c", f"print({said!r}, end='')"], listener,
                           ["10.77.0.1", "10.77.0.2", "10.77.0.3"], 5.0)
    try:
        engine.proc.wait(timeout=30)
        engine.relay.join(timeout=10)
        failure = engine.failure(None, engine.hosts)
        assert failure.hosts == ["10.77.0.3"] and failure.ranks == [], failure
        assert engine.pulse.nodes == {0: "edge-0", 1: "edge-1", 2: "edge-2"}
    finally:
        engine.end()
        listener.close()
