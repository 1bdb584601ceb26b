"""The engine apart from its tools: the modules that run a model (the steps, the scheduler, the
layers, the transport) import no HTTP and no command-line package, so that a program embedding the
engine needs neither, and the tools (serve's HTTP side, the supervisor, bench, the CLI) sit on top."""

import subprocess
import sys

ENGINE = ["model", "parallel", "comm", "allreduce", "weights", "steps", "batch", "scheduler", "generate",
          "chat", "serving", "startup", "sampling", "text", "jobs", "channel", "quant", "quant_int8", "prepare", "cache",
          "kv", "budget", "draft", "draft_model", "payload", "rowops", "local_comm", "heartbeat"]
TOOLS_ONLY = ["starlette", "uvicorn", "click", "fastapi", "httpx", "prometheus_client"]


def test_engine_modules_import_no_http_or_cli_package():
    # a fresh interpreter: this one has imported the tools already. Each module in turn, so that the
    # first one that pulls a tool package in is the one named.
    code = (
        "import importlib, sys\n"
        f"for m in {ENGINE!r}:\n"
        "    importlib.import_module('tpi_mpi.' + m)\n"
        f"    bad = [p for p in {TOOLS_ONLY!r} if p in sys.modules]\n"
        "    if bad:\n"
        "        sys.exit(f'tpi_mpi.{m} imports {bad}')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


def test_the_check_sees_a_tool_import():
    """The same check names serve.py, which is a tool (its HTTP side imports starlette)."""
    code = "import sys, tpi_mpi.serve\nsys.exit(0 if 'starlette' in sys.modules else 1)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


SUPERVISOR_SIDE = ["supervisor", "serve", "metrics", "hub"]


def test_the_supervisors_side_loads_no_torch():
    """`serve --ranks`'s supervisor shares rank 0's device and keeps no model: what it imports (the
    HTTP front, the metrics, naming a Hub model) must not pull torch in (266 MiB resident instead of 80)."""
    code = (
        "import importlib, sys\n"
        f"for m in {SUPERVISOR_SIDE!r}:\n"
        "    importlib.import_module('tpi_mpi.' + m)\n"
        "    if 'torch' in sys.modules:\n"
        "        sys.exit(f'tpi_mpi.{m} imports torch')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
