"""Allreduce modes against NumPy sums on real multi-rank groups (each launches mpirun)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import mpi_env, mpirun_cmd
from tpi_mpi.comm import LocalComm

SCRIPT = Path(__file__).parent / "mpi" / "check_allreduce.py"


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
