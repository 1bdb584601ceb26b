"""What every benchmark writes: its table rows, and beside its figures the commit and host of the run,
one JSON line each.

Standard library only, so a client-side benchmark (bench serve) needs neither torch nor MPI.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def host_fields() -> dict:
    """The machine and moment of a run: a shared machine's load explains many a slow figure."""
    return {"load_avg": [round(x, 2) for x in os.getloadavg()], "host": platform.node(), "cpus": os.cpu_count(),
            "commit": git_commit(), "time": time.strftime("%FT%T")}


def append_json(path: str | None, record: dict) -> None:
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def print_row(columns: list[tuple[str, int, str]], record: dict, header: bool = True) -> None:
    """One fixed-width row of `record` ((name, width, format) per column; a missing figure is '-'),
    with the header above it."""
    if header:
        print(" ".join(name.rjust(w) for name, w, _ in columns))
    cells = [(fmt.format(record[name]) if record.get(name) is not None else "-").rjust(w) for name, w, fmt in columns]
    print(" ".join(cells), flush=True)
