"""`python -m tpi_mpi.netem`: the emulator's command line (run, calibrate, cleanup, probe)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from .emulator import EdgeNet, calibrate, cleanup, format_table
from .switch import Link, check_host, netem_available


def _list(text: str, kind=float) -> list:
    return [kind(x) for x in text.split(",") if x]


@click.group(help="Edge-network emulation: ranks in network namespaces joined by a delayed, rate-limited link.")
def cli() -> None:
    pass


_link_options = [
    click.option("--mtu", type=int, default=9000, show_default=True, help="MTU of the emulated link"),
    click.option("--backend", type=click.Choice(["auto", "netem", "forwarder"]), default="auto",
                 show_default=True, help="tc netem where the kernel has it, else the user-space forwarder"),
]


def link_options(f):
    for option in reversed(_link_options):
        f = option(f)
    return f


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--ranks", type=int, required=True, help="ranks, one per namespace")
@click.option("--delay-ms", type=float, default=0.0, show_default=True, help="one-way delay")
@click.option("--rate-mbit", type=float, default=300.0, show_default=True, help="link rate")
@link_options
@click.option("--mpirun-arg", "mpirun_args", multiple=True, help="extra mpirun argument (repeatable)")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(ranks, delay_ms, rate_mbit, mtu, backend, mpirun_args, command):
    """Run COMMAND as RANKS MPI ranks on the emulated link; exits with its exit code."""
    try:
        with EdgeNet(ranks, Link(delay_ms, rate_mbit, mtu), backend) as net:
            code = net.run(list(command), mpirun_args)
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


@cli.command("calibrate")
@click.option("--ranks", default="2", show_default=True, help="rank counts, comma separated")
@click.option("--delay-ms", default="0,1,2,5", show_default=True, help="one-way delays, comma separated")
@click.option("--rate-mbit", default="300", show_default=True, help="rates, comma separated")
@link_options
@click.option("--sizes", default="8,1048576", show_default=True, help="message bytes, comma separated")
@click.option("--iters", type=int, default=30, show_default=True)
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="append one JSON line per link here")
def calibrate_cmd(ranks, delay_ms, rate_mbit, mtu, backend, sizes, iters, warmup, out):
    """MPI ping-pong over the emulated link: measured one-way latency and bandwidth vs requested."""
    rows = []
    for n in _list(ranks, int):
        for rate in _list(rate_mbit):
            for delay in _list(delay_ms):
                row = calibrate(n, Link(delay, rate, mtu), _list(sizes, int), iters, warmup, backend)
                rows.append(row)
                if out is not None:
                    with open(out, "a") as f:
                        f.write(json.dumps(row) + "\n")
                click.echo("\n".join(format_table([row]).splitlines()[1:]), err=True)   # progress
    click.echo(format_table(rows))


@cli.command("cleanup")
@click.option("--run", "run_id", help="only this run's (default: every tpi-* one, runs still going included)")
def cleanup_cmd(run_id):
    """Remove leftover tpi-* namespaces (killing what runs in them) and tpi-* links."""
    removed = cleanup(run_id)
    click.echo(f"removed {len(removed)}: {' '.join(removed)}" if removed else "nothing to remove")


@cli.command("probe")
def probe_cmd():
    """Say whether the kernel has the netem qdisc (else the user-space forwarder is used)."""
    check_host()
    click.echo("netem: available" if netem_available() else "netem: not available, using the user-space forwarder")


def main() -> None:
    run_tool(cli, "netem")


def run_tool(group: click.Group, name: str) -> None:
    """`python -m tpi_mpi.NAME`: click's own messages for usage errors, one line for the rest (the
    network and Slurm emulators share it)."""
    try:
        group.main(prog_name=f"python -m tpi_mpi.{name}", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.exit(130)
    except (ValueError, RuntimeError, PermissionError, FileNotFoundError, subprocess.TimeoutExpired) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(1)

