"""Entry point: `python -m tpi_mpi` and the `tpi-mpi` script.

Every error ends the whole job with one line on stderr: errors every rank meets alike are printed
once, by rank 0; an error on one rank in the middle of a run prints its rank and calls MPI_Abort,
so no rank is left waiting (an unhandled exception would otherwise hang the others at finalize).
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import click

from .errors import PeerFailed, TpiError


def main(argv: list[str] | None = None) -> None:
    from .launcher import launch_rank, launched_by_mpi

    rank = launch_rank()
    if "--channel" in (argv if argv is not None else sys.argv) and launched_by_mpi():
        from .heartbeat import start_beating

        start_beating(rank)          # a rank of a supervised engine: from its first moment (heartbeat.py)
    from .cli import cli

    debug = "--debug" in (argv if argv is not None else sys.argv)
    try:
        cli.main(args=argv, prog_name="tpi_mpi", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:          # bad options: every rank parses the same argv
        if rank == 0:
            e.show()
        _leave(e.exit_code, reporter=rank == 0)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except PeerFailed:                         # the failing rank reports; the others just leave
        _leave(1, reporter=False)
    except Exception as e:
        from .comm import abort_job

        if debug:
            traceback.print_exc()
        if getattr(e, "coordinated", False):   # every rank knows about it: exit, no abort
            print(f"tpi_mpi: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        if not _mpi_running():                 # before any communication, all ranks fail alike
            if rank == 0:
                print(f"tpi_mpi: error: {_describe(e)}", file=sys.stderr, flush=True)
            _leave(1, reporter=rank == 0)
        print(f"tpi_mpi: rank {rank}: error: {_describe(e)}", file=sys.stderr, flush=True)
        abort_job(1)


def _mpi_running() -> bool:
    """Whether MPI was started with peers (an error after that happened on this rank alone)."""
    mpi = sys.modules.get("mpi4py.MPI")
    return mpi is not None and mpi.Is_initialized() and mpi.COMM_WORLD.Get_size() > 1


def _leave(code: int, reporter: bool) -> None:
    """Exit; a rank that is not the one reporting gives it a moment first: mpirun ends the whole
    job as soon as any rank exits non-zero, which could cut the reporter off before it prints."""
    if not reporter and "OMPI_COMM_WORLD_SIZE" in os.environ:
        time.sleep(2)
    sys.exit(code)


def _describe(e: Exception) -> str:
    if isinstance(e, (TpiError, FileNotFoundError, ValueError)):
        return str(e)
    return f"internal error {type(e).__name__}: {e} (run with --debug for the traceback)"


if __name__ == "__main__":
    main()
