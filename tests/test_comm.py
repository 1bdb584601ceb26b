"""Allreduce modes against NumPy sums on real multi-rank groups (each launches mpirun), and the
simulated link of --link-model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import mpi_env, mpirun_cmd, run_tpi
from tpi_mpi.allreduce import AutoChoice
from tpi_mpi.comm import LocalComm, SimulatedLink
from tpi_mpi.errors import ConfigError

SCRIPT = Path(__file__).parent / "mpi" / "check_allreduce.py"
LINK_SCRIPT = Path(__file__).parent / "mpi" / "check_link_model.py"


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_allreduce_modes_equal_numpy_sum(n):
    r = subprocess.run(mpirun_cmd(n) + [sys.executable, str(SCRIPT)], capture_output=True, text=True,
                       timeout=120, env=mpi_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert f"allreduce ok on {n} ranks" in r.stdout


def test_local_comm_is_the_identity():
    x = torch.randn(4, 8)
    comm = LocalComm()
    assert comm.allreduce(x) is x
    assert comm.agree(True) == -1 and comm.agree(False) == 0


def test_auto_revises_a_pick_that_its_trial_flattered():
    choice = AutoChoice({"star": 0.010, "ring": 0.008, "recdouble": 0.006})
    assert choice.pick == "recdouble"
    checks = []
    for call in range(1, 100):
        if choice.record(0.012):
            checks.append(call)
            choice.revise(choice.mean_s())
    # observed 12 ms: worse than ring's 8 ms trial, so ring; then worse than star's 10 ms, so star;
    # then every candidate has been seen at 12 ms and star stays
    assert checks == [4, 16, 64]
    assert [(c["from"], c["to"]) for c in choice.changes] == [("recdouble", "ring"), ("ring", "star")]
    assert choice.pick == "star" and choice.times == pytest.approx({"star": 0.012, "ring": 0.012, "recdouble": 0.012})


def test_auto_keeps_a_pick_within_its_slack():
    choice = AutoChoice({"star": 0.010, "mpi": 0.0102})
    for _ in range(4):
        choice.record(0.0104)          # 4% slower than its trial, 2% slower than mpi's: keep star
    choice.revise(choice.mean_s())
    assert choice.pick == "star" and not choice.changes and choice.next_check == 16


def test_link_model_parses_delay_and_rate():
    assert SimulatedLink.parse("2ms,300mbit") == SimulatedLink(0.002, 300e6)
    assert SimulatedLink.parse(" 500us , 1gbit ") == SimulatedLink(0.0005, 1e9)
    assert SimulatedLink.parse("5ms,1000mbit").cost(125_000) == pytest.approx(0.005 + 0.001)
    for bad in ("2ms", "300mbit,2ms", "2 parsecs,1mbit", "1ms,0mbit", "1.2.3ms,1mbit"):
        with pytest.raises(ConfigError, match="--link-model"):
            SimulatedLink.parse(bad)


@pytest.mark.mpi
def test_link_model_charges_two_hops_for_a_star_and_changes_no_result():
    r = subprocess.run(mpirun_cmd(2) + [sys.executable, str(LINK_SCRIPT)], capture_output=True, text=True,
                       timeout=120, env=mpi_env(), stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert "link model ok on 2 ranks" in r.stdout


@pytest.mark.mpi
def test_bench_comm_on_a_simulated_link(tmp_path):
    out = tmp_path / "comm.jsonl"
    r = run_tpi(["bench", "comm", "--sizes", "1x576,8", "--algorithms", "star,auto", "--repeats", "5",
                 "--warmup", "1", "--idle-seconds", "0.1", "--link-model", "5ms,1000mbit", "--out", str(out)],
                n=2, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "auto chose" in r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {rec["kind"] for rec in records} == {"pingpong", "allreduce", "idle_cpu"}
    assert all(rec["link"] == {"kind": "simulated", "delay_ms": 5.0, "rate_mbit": 1000.0} for rec in records)
    star = [rec for rec in records if rec.get("algorithm") == "star" and rec["kind"] == "allreduce"]
    assert len(star) == 2 and all(rec["median_s"] >= 0.010 for rec in star)
    ping = [rec for rec in records if rec["kind"] == "pingpong"]
    assert all(rec["median_s"] >= 0.005 for rec in ping)
