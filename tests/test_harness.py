"""The test helpers' own behaviour: a launcher failure is retried once, nothing else is."""

import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from conftest import LAUNCHER_FAILURE, run_mpi

# fails like Open MPI's launcher on its first run (a marker file remembers it), then succeeds
FLAKY = """
import pathlib, sys
marker = pathlib.Path(sys.argv[1])
if not marker.exists():
    marker.write_text("ran")
    sys.exit(sys.stderr.write(sys.argv[2]) and 213)
print("ok")
"""


def test_a_launcher_failure_is_run_again(tmp_path):
    r = run_mpi([sys.executable, "-c", FLAKY, str(tmp_path / "m"), LAUNCHER_FAILURE], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok"


def test_other_failures_are_not_run_again(tmp_path):
    r = run_mpi([sys.executable, "-c", FLAKY, str(tmp_path / "m"), "some other error"], capture_output=True, text=True)
    assert r.returncode == 213 and "some other error" in r.stderr


# tests of the `mpi` marker's enforcement, run by a pytest of their own beside a copy of conftest.py
ENFORCED = '''
import subprocess

import pytest

from conftest import mpi_env, mpirun_cmd


def test_unmarked_builds_an_mpirun_line():
    mpirun_cmd(2)


def test_unmarked_runs_a_command_that_starts_mpirun():
    subprocess.run(["mpirun", "--version"], env=mpi_env(), capture_output=True)   # harmless if it ran


@pytest.fixture(scope="module")
def server_line():
    return mpirun_cmd(2)          # set up on behalf of the first test that asks for it


def test_unmarked_and_harmless():
    pass


@pytest.mark.mpi
def test_marked_after_an_unmarked_one_gets_its_module_fixture(server_line):
    assert server_line[1:] == ["--oversubscribe", "-n", "2"]
'''


def test_tests_that_start_mpirun_without_the_mpi_marker_fail(tmp_path):
    here = Path(__file__).parent
    for name in ("conftest.py", "checkpoints.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    mpi: launches mpirun\n")
    (tmp_path / "test_enforced.py").write_text(ENFORCED)
    report = tmp_path / "report.xml"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                        str(tmp_path / "test_enforced.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    outcomes = {}                                     # test name -> (outcome, message)
    for case in ElementTree.parse(report).iter("testcase"):
        bad = [(c.tag, c.get("message", "")) for c in case if c.tag in ("failure", "error", "skipped")]
        outcomes[case.get("name")] = bad[0] if bad else ("passed", "")
    lacks = "test test_enforced.py::{} launches mpirun but lacks @pytest.mark.mpi"
    expected = {
        "test_unmarked_builds_an_mpirun_line": ("failure", lacks.format("test_unmarked_builds_an_mpirun_line")),
        "test_unmarked_runs_a_command_that_starts_mpirun":       # at teardown: the command ran to its end
            ("error", lacks.format("test_unmarked_runs_a_command_that_starts_mpirun")
             + " (a command it ran tried to start it)"),
        "test_unmarked_and_harmless": ("passed", ""),
    }
    marked = "test_marked_after_an_unmarked_one_gets_its_module_fixture"
    skipped = outcomes.get(marked, ("",))[0] == "skipped"                      # where mpirun is missing
    expected[marked] = ("skipped", "mpirun not found") if skipped else ("passed", "")
    assert outcomes.keys() == expected.keys(), r.stdout
    for name, (outcome, message) in expected.items():
        assert outcomes[name][0] == outcome and message in outcomes[name][1], (name, r.stdout)
