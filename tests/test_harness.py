"""The test helpers' own behaviour: a launcher failure is retried once, nothing else is."""

import sys

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
