"""`python -m tpi_mpi.slurm_emulator`: start, stop, run, cleanup (the cluster itself is cluster.py)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys

import click

from ..netem.cli import run_tool
from .cluster import ClusterError, SlurmCluster, leftovers, running, teardown


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def _signals_interrupt():
    """Ctrl-C, kill and hang-up raise KeyboardInterrupt, so a start cut short still tears down (SIGINT
    too: a shell starts background jobs with it ignored)."""
    saved = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


_cluster_options = [
    click.option("--nodes", type=int, default=4, show_default=True, help="slurmd daemons, one per namespace"),
    click.option("--cpus", type=int, default=4, show_default=True,
                 help="CPUs each node declares (the jobs ask for 4; not checked against this machine)"),
]


def cluster_options(f):
    for option in reversed(_cluster_options):
        f = option(f)
    return f


@click.group(help="A Slurm cluster on this machine (root): slurmctld, and one slurmd per node in its own "
                  "network namespace. Installs Debian's slurm-wlm and munge when missing.")
def cli() -> None:
    pass


@cli.command()
@cluster_options
def start(nodes, cpus):
    """Start a cluster and leave it running; prints `export SLURM_CONF=...` for sbatch and friends."""
    cluster = SlurmCluster(nodes, cpus)
    with _signals_interrupt():
        cluster.start()                   # a failed or interrupted start has torn itself down
    click.echo(f"export SLURM_CONF={cluster.layout.conf_path}")


@cli.command()
@click.option("--run", "run_id", help="the cluster to stop (needed only when several run)")
def stop(run_id):
    """Stop a cluster started by `start`: jobs, daemons, namespaces, files."""
    clusters = [s for s in running() if run_id in (None, s["run"])]
    if not clusters:
        raise ClusterError(f"no cluster {run_id or ''} is running".replace("  ", " "))
    if len(clusters) > 1:
        raise ClusterError(f"{len(clusters)} clusters run ({', '.join(s['run'] for s in clusters)}): pick one with --run")
    teardown(clusters[0])
    click.echo(f"stopped cluster {clusters[0]['run']}")


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@cluster_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(nodes, cpus, command):
    """Start a cluster, run COMMAND with SLURM_CONF set, stop the cluster; exits with COMMAND's code."""
    try:
        with _signals_interrupt(), SlurmCluster(nodes, cpus) as cluster:
            code = subprocess.run(list(command), env=cluster.env()).returncode
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@cli.command()
def cleanup():
    """Stop every cluster and remove what killed ones left (tpi-slurm-* namespaces, tsl-* links)."""
    stopped = [s["run"] for s in running()]
    for state in running():
        teardown(state)
    namespaces, links = leftovers()
    teardown({"namespaces": namespaces, "links": links})
    removed = stopped + namespaces + links
    click.echo(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")


def main() -> None:
    run_tool(cli, "slurm_emulator")
