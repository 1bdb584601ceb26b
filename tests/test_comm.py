"""Allreduce modes against NumPy sums on real multi-rank groups (each launches mpirun), and the
simulated link of --link-model."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import mpi_env, mpirun_cmd, run_mpi, run_tpi
from tpi_mpi import comm as tpi_comm
from tpi_mpi.allreduce_auto import AutoChoice
from tpi_mpi.local_comm import LocalComm
from tpi_mpi.errors import ConfigError
from tpi_mpi.link_model import SimulatedLink

SCRIPT = Path(__file__).parent / "mpi" / "check_allreduce.py"
LINK_SCRIPT = Path(__file__).parent / "mpi" / "check_link_model.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_allreduce_modes_equal_numpy_sum(n):
    r = run_mpi(mpirun_cmd(n) + [sys.executable, str(SCRIPT)], capture_output=True, text=True,
                timeout=120, env=mpi_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert f"allreduce ok on {n} ranks" in r.stdout


def test_segments_are_views_covering_the_buffer(monkeypatch):
    monkeypatch.setattr(tpi_comm, "SEGMENT_BYTES", 100)            # 25 float32 values a segment
    buf = np.zeros((5, 11), dtype=np.float32)                   # 55 values: 25 + 25 + 5
    segments = tpi_comm._segments(buf)
    assert [p.size for p in segments] == [25, 25, 5]
    for i, p in enumerate(segments):
        p[...] = i + 1                                          # a receive into a segment fills the buffer
    assert np.array_equal(buf.reshape(-1), np.repeat([1, 2, 3], [25, 25, 5]).astype(np.float32))
    assert [p.size for p in tpi_comm._segments(np.zeros(0, dtype=np.float32))] == [0]
    with pytest.raises(ValueError, match="contiguous"):
        tpi_comm._segments(buf[:, ::2])


def test_local_comm_is_the_identity():
    x = torch.randn(4, 8)
    comm = LocalComm()
    assert comm.allreduce(x) is x
    assert comm.agree(True) == -1 and comm.agree(False) == 0


def drive(choice: AutoChoice, seconds: dict, calls: int) -> list[int]:
    """`calls` real calls costing `seconds[algorithm]` each, or, for a list, its i-th item in the
    algorithm's i-th window of the current match (the last item after that); returns the calls at
    which the ranks agreed (one rank here: its figures are the agreed ones)."""
    checks = []
    for _ in range(calls):
        cost = seconds[choice.pick]
        if isinstance(cost, list):
            done = choice.schedule[:len(choice.played)].count(choice.pick)
            cost = cost[min(done, len(cost) - 1)]
        if choice.record(cost):
            checks.append(choice.calls)
            choice.revise(choice.figures())
    return checks


MATCH = 8 * 2 * AutoChoice.ROUNDS       # calls in a match of two, windows of 8 calls


def test_auto_keeps_the_contender_fastest_on_real_calls():
    # the trial ranks recdouble first, ring within 1.5x of it; star and mpi are not tried again
    choice = AutoChoice({"star": 0.010, "ring": 0.008, "recdouble": 0.0065, "mpi": 0.020})
    assert choice.pick == "recdouble" and choice.players == ["recdouble", "ring"]
    checks = drive(choice, {"recdouble": 0.012, "ring": 0.009, "star": 0.001, "mpi": 0.001}, 1000)
    # windows of 8 calls (52 ms at the trial's 6.5 ms): the ranks agree when the match is over,
    # then at checks 4 and 16 windows later
    assert choice.window == 8 and checks[:3] == [MATCH, MATCH + 32, MATCH + 160]
    rounds = AutoChoice.ROUNDS
    assert choice.explored == {"recdouble": [pytest.approx(0.012)] * rounds, "ring": [pytest.approx(0.009)] * rounds}
    assert choice.observed == pytest.approx({"recdouble": 0.012, "ring": 0.009})
    assert choice.pick == "ring" and choice.first_pick == "recdouble" and not choice.changes


def test_auto_plays_every_other_round_in_reverse():
    choice = AutoChoice({"star": 0.010, "ring": 0.011, "recdouble": 0.012})
    order = []
    while choice.exploring:
        order.append(choice.pick)
        drive(choice, {"star": 0.010, "ring": 0.010, "recdouble": 0.010}, 8)
    assert order[:9] == ["star", "ring", "recdouble", "recdouble", "ring", "star", "star", "ring", "recdouble"]
    assert len(order) == 3 * AutoChoice.ROUNDS


def test_auto_with_one_contender_plays_no_match():
    choice = AutoChoice({"star": 0.001, "ring": 0.010})
    assert choice.pick == "star" and not choice.exploring


def test_auto_is_not_swayed_by_a_few_fast_windows():
    # recdouble caught in a fast phase in 2 of its windows, at its usual speed in the others
    choice = AutoChoice({"ring": 0.154, "recdouble": 0.206})
    drive(choice, {"ring": 0.158, "recdouble": [0.141, 0.139, 0.220]}, MATCH)
    assert not choice.exploring and choice.pick == "ring"
    assert choice.observed == pytest.approx({"ring": 0.158, "recdouble": 0.220})


def test_auto_keeps_the_trials_pick_on_a_tie():
    choice = AutoChoice({"star": 0.0068, "recdouble": 0.0080})
    drive(choice, {"star": 0.0080, "recdouble": 0.0079}, MATCH)    # within 5%
    assert choice.pick == "star" and not choice.exploring


def test_auto_switches_when_its_pick_stays_slow_later():
    choice = AutoChoice({"star": 0.010, "recdouble": 0.009})
    drive(choice, {"recdouble": 0.009, "star": 0.010}, MATCH)      # both tried: recdouble stays
    assert choice.pick == "recdouble" and not choice.exploring and choice.next_check == MATCH + 32
    drive(choice, {"recdouble": 0.020, "star": 0.010}, 32)         # its link gets slow: a rematch
    assert choice.rematches == 1 and choice.exploring and choice.players == ["recdouble", "star"]
    drive(choice, {"recdouble": 0.020, "star": 0.010}, MATCH)
    assert choice.pick == "star" and not choice.exploring
    assert choice.changes == [{"call": 2 * MATCH + 32, "from": "recdouble", "to": "star"}]


def test_auto_keeps_its_pick_after_one_slow_stretch():
    choice = AutoChoice({"star": 0.010, "recdouble": 0.009})
    drive(choice, {"recdouble": 0.009, "star": 0.010}, MATCH)
    drive(choice, {"recdouble": 0.020, "star": 0.010}, 32)         # slow until the check: a rematch
    drive(choice, {"recdouble": 0.009, "star": 0.010}, MATCH)      # and recdouble is back to 9 ms
    assert choice.rematches == 1 and choice.pick == "recdouble" and not choice.exploring and not choice.changes


def test_auto_rechecks_on_the_median_stretch_not_the_mean():
    choice = AutoChoice({"star": 0.010, "recdouble": 0.009})
    drive(choice, {"recdouble": 0.009, "star": 0.010}, MATCH)
    for call in range(32):                  # 3 slow calls in one stretch of 8: the mean is 19% up
        if choice.record(0.030 if call < 3 else 0.009):
            choice.revise(choice.figures())
    assert choice.calls == choice.next_check - 128 and choice.observed["recdouble"] == pytest.approx(0.009)
    assert choice.pick == "recdouble" and not choice.exploring and choice.rematches == 0


def test_auto_sizes_windows_from_the_trial():
    choice = AutoChoice({"star": 1e-4, "recdouble": 1e-4})
    checks = drive(choice, {"star": 1e-4, "recdouble": 1e-4}, 23000)
    # 8 calls of 0.1 ms are not 50 ms: a window is 500 calls; re-checks cover whole windows
    assert choice.window == 500 and checks[:4] == [1000 * AutoChoice.ROUNDS, 1000 * AutoChoice.ROUNDS + 2000,
                                                   1000 * AutoChoice.ROUNDS + 6000, 1000 * AutoChoice.ROUNDS + 10000]
    assert {a: len(w) for a, w in choice.explored.items()} == {"star": AutoChoice.ROUNDS, "recdouble": AutoChoice.ROUNDS}


def test_a_stalled_first_window_does_not_shorten_the_match():
    # 4 ranks, 0 ms, 1x576: the trial's 1.48 ms a call sets windows of 34 calls (50 ms), however
    # long the first one takes (49 ms a call once made 8-call windows count as long enough)
    choice = AutoChoice({"recdouble": 0.00148, "star": 0.00190})
    drive(choice, {"recdouble": [0.049, 0.0015], "star": 0.0019}, 34 * 2 * AutoChoice.ROUNDS)
    assert choice.window == 34 and not choice.exploring and choice.pick == "recdouble"
    assert choice.explored["recdouble"][:2] == [pytest.approx(0.049), pytest.approx(0.0015)]


def test_link_model_parses_delay_and_rate():
    assert SimulatedLink.parse("2ms,300mbit") == SimulatedLink(0.002, 300e6)
    assert SimulatedLink.parse(" 500us , 1gbit ") == SimulatedLink(0.0005, 1e9)
    assert SimulatedLink.parse("5ms,1000mbit").cost(125_000) == pytest.approx(0.005 + 0.001)
    for bad in ("2ms", "300mbit,2ms", "2 parsecs,1mbit", "1ms,0mbit", "1.2.3ms,1mbit"):
        with pytest.raises(ConfigError, match="--link-model"):
            SimulatedLink.parse(bad)


@pytest.mark.mpi
def test_link_model_charges_two_hops_for_a_star_and_changes_no_result():
    r = run_mpi(mpirun_cmd(2) + [sys.executable, str(LINK_SCRIPT)], capture_output=True, text=True,
                timeout=120, env=mpi_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "link model ok on 2 ranks" in r.stdout


@pytest.mark.mpi
def test_bench_comm_on_a_simulated_link(tmp_path):
    out = tmp_path / "comm.jsonl"
    r = run_tpi(["bench", "comm", "--sizes", "1x576,8", "--algorithms", "star,auto", "--repeats", "8",
                 "--min-repeats", "6", "--budget", "0.001", "--warmup", "1", "--idle-seconds", "0.1",
                 "--link-model", "5ms,1000mbit", "--out", str(out)], n=2, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "auto chose" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {rec["kind"] for rec in records} == {"pingpong", "allreduce", "idle_cpu"}
    assert all(rec["repeats"] == 6 for rec in records if rec["kind"] != "idle_cpu")   # the budget fits none
    assert all(rec["link"] == {"kind": "simulated", "delay_ms": 5.0, "rate_mbit": 1000.0} for rec in records)
    star = [rec for rec in records if rec.get("algorithm") == "star" and rec["kind"] == "allreduce"]
    assert len(star) == 2 and all(rec["median_s"] >= 0.010 for rec in star)
    ping = [rec for rec in records if rec["kind"] == "pingpong"]
    assert all(rec["median_s"] >= 0.005 for rec in ping)
    auto = [rec for rec in records if rec.get("algorithm") == "auto" and rec["kind"] == "allreduce"]
    assert len(auto) == 2 and all(rec["auto_window_calls"] == max(8, math.ceil(0.05 / min(rec["auto_trials_s"].values())))
                                  for rec in auto)     # 50 ms at the trial's best


@pytest.mark.mpi
def test_bench_generate_compares_algorithms_switched_on_every_rank(checkpoints, tmp_path):
    """One job, algorithms switched between generations: on a simulated 10 ms link a star (two hops
    per allreduce) must cost about twice recursive doubling's one hop at 2 ranks; had a worker not
    switched with rank 0, the two would wait on different messages until the comm timeout."""
    out = tmp_path / "generate.jsonl"
    r = run_tpi(["bench", "generate", "--model", str(checkpoints("llama")), "--cache-dir", str(tmp_path / "cache"),
                 "--compare", "star,recdouble,auto", "--rounds", "2", "--prompt-tokens", "8", "--new-tokens", "3",
                 "--warmup", "1", "--link-model", "10ms,1000mbit", "--comm-timeout", "20", "--quiet",
                 "--out", str(out)], n=2, timeout=180)
    assert r.returncode == 0, r.stderr
    assert "auto / best fixed (recdouble)" in r.stdout
    records = {rec["allreduce"].split(" ")[0]: rec for rec in map(json.loads, out.read_text().splitlines())}
    assert set(records) == {"star", "recdouble", "auto"}
    assert all(len(rec["round_s_per_token"]) == 2 and rec["compared"] == ["star", "recdouble", "auto"]
               for rec in records.values())
    layers = 2                                       # the checkpoint's decoder layers: 2 allreduces each
    assert records["star"]["s_per_token"] >= 2 * layers * 2 * 0.010
    assert records["recdouble"]["s_per_token"] < 0.75 * records["star"]["s_per_token"]
    assert records["auto"]["allreduce"].startswith("auto (")


def test_bench_generate_compare_refuses_an_unknown_algorithm():
    r = run_tpi(["bench", "generate", "--compare", "star,fastest"])
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].endswith("list algorithms from auto,star,mpi,ring,recdouble")


@pytest.mark.mpi
def test_a_send_that_never_completes_names_its_destination():
    """A rank frozen while another sends it more than the link buffers: the sender's timeout names
    the frozen rank (before: 'a peer rank did not answer')."""
    script = Path(__file__).parent / "mpi" / "check_frozen.py"
    r = run_mpi(mpirun_cmd(2) + [sys.executable, str(script), "send"], capture_output=True, text=True, timeout=120,
                env=mpi_env())
    assert "error: rank 1 took nothing for 2 s (sending to a frozen rank)" in r.stdout, (r.stdout, r.stderr)


@pytest.mark.mpi
def test_a_rank_waited_on_that_waits_in_turn_is_not_the_one_named():
    """Recursive doubling at 3 ranks with rank 2 frozen: rank 0 waits on rank 1, which waits on
    rank 2. The roll call names rank 2 (before: rank 1, and a supervisor dropped the healthy one)."""
    script = Path(__file__).parent / "mpi" / "check_frozen.py"
    r = run_mpi(mpirun_cmd(3) + [sys.executable, str(script), "third"], capture_output=True, text=True, timeout=120,
                env=mpi_env())
    assert "error: rank 2 " in r.stdout and "rank 1" in r.stdout, (r.stdout, r.stderr)
    assert "error: rank 2 answered no roll call (rank 1 waited on it) for 2 s" in r.stdout, r.stdout
