"""What mpirun tells a process through its environment, read before MPI starts and without
importing it (or torch): the supervisor and the entry point need no more."""

from __future__ import annotations

import os

RANK_KEYS = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")


def launch_rank() -> int:
    """This process's rank as the launcher set it (0 when not launched by mpirun)."""
    for key in RANK_KEYS:
        if key in os.environ:
            return int(os.environ[key])
    return 0


def launched_by_mpi() -> bool:
    return any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", *RANK_KEYS))
