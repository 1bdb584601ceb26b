"""MPI in this process: starting it, the thread settings the waits rely on, and ending the whole job.
comm.py's MpiComm starts MPI here and does everything else; nothing here moves data.
"""

from __future__ import annotations

import ctypes
import sys

from .errors import CommError

_TIMER_SLACK_NS = 1000      # Linux rounds a thread's sleeps up by its timer slack, 50 us by default


def start_mpi():
    """mpi4py's MPI module, MPI started. MPI_Init waits for every rank; mpi4py calls it holding the
    GIL, so a rank of a supervised engine starts MPI itself through ctypes, which lets go of the GIL
    during the call: its heartbeat thread beats meanwhile (heartbeat.py), and a rank frozen before
    MPI_Init is told from the ranks waiting for it there."""
    import mpi4py

    from . import heartbeat

    if heartbeat.beating and "mpi4py.MPI" not in sys.modules:
        mpi4py.rc.initialize, mpi4py.rc.finalize = False, True
        from mpi4py import MPI

        with open("/proc/self/maps") as maps:     # the libmpi mpi4py has loaded
            lib = next((line.split()[-1] for line in maps if "/libmpi.so" in line), None)
        if lib is None:                            # not Open MPI's name: mpi4py's own way
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
        else:
            provided = ctypes.c_int()
            if ctypes.CDLL(lib).MPI_Init_thread(None, None, MPI.THREAD_MULTIPLE, ctypes.byref(provided)) != 0:
                raise CommError("MPI_Init_thread failed (see the MPI messages above)", [])
        return MPI
    from mpi4py import MPI

    return MPI


def fine_sleeps() -> None:
    """Let this thread's short sleeps (the waits' polls) be as short as asked: Linux's timer slack, where
    it has one (prctl PR_SET_TIMERSLACK), down from 50 us to 1 us."""
    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(29, _TIMER_SLACK_NS, 0, 0, 0)    # 29: PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def abort_job(code: int = 1) -> None:
    """End every rank of the job at once (MPI_Abort) if MPI is running with peers; else return.
    Asked of MPI itself, so no module needs to remember the comm in use."""
    mpi4py = sys.modules.get("mpi4py.MPI")
    if mpi4py is not None and mpi4py.Is_initialized() and not mpi4py.Is_finalized() \
            and mpi4py.COMM_WORLD.Get_size() > 1:
        mpi4py.COMM_WORLD.Abort(code)
