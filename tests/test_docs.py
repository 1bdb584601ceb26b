"""Tables in docs/ that a tool writes are that tool's output, so they cannot go stale."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.mpi
def test_errors_md_holds_the_bad_input_table_as_the_tool_prints_it():
    """Every bad input of tools/bad_input_table.py run again under mpirun (about 4 minutes on 2 cores):
    docs/errors.md must hold the same table, row for row; only measured figures (seconds, a memory
    minimum that counts the process's resident memory) may differ."""
    tool = load_tool("bad_input_table")
    text = tool.DOC.read_text()
    start, stop = tool.doc_table(text)
    in_doc = text.splitlines()[start:stop]
    printed = tool.table()
    assert [tool.comparable(r) for r in in_doc] == [tool.comparable(r) for r in printed], \
        "docs/errors.md is stale: run python tools/bad_input_table.py --write"
