"""Issue 7: no code execution from data, raw data only on rank 0, and dead or frozen ranks end the
job promptly with a message naming them."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, launcher_failed, mpi_env, mpirun_cmd, run_mpi, run_tpi
from tpi_mpi.batch import SeqStep
from tpi_mpi.steps import Cmd, Header

PACKAGE = ROOT / "tpi_mpi"


def test_no_pickle_anywhere_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal") for n in names), path
            if isinstance(node, ast.Attribute) and node.attr == "load":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), f"torch.load in {path}"
            if isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
                pytest.fail(f"{node.arg}= in {path}")


def test_only_buffer_methods_of_mpi4py():
    """Lower-case mpi4py methods pickle their arguments; only the capitalised ones may be called."""
    pickling = {"send", "recv", "isend", "irecv", "bcast", "gather", "scatter", "allgather", "alltoall",
                "reduce", "allreduce", "sendrecv", "ibcast", "igather", "iallreduce", "bsend", "ssend"}
    tree = ast.parse((PACKAGE / "comm.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            if owner in ("self.world", "MPI.COMM_WORLD", "local") and node.func.attr in pickling:
                pytest.fail(f"comm.py calls {owner}.{node.func.attr}, which pickles")
    for path in PACKAGE.rglob("*.py"):
        if path == PACKAGE / "comm.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.startswith("mpi4py") for n in names), f"{path.name} imports mpi4py: only comm.py may"


@pytest.mark.mpi
def test_workers_never_receive_token_ids_or_text(checkpoints, tmp_path):
    model = checkpoints("llama")
    prompt = "The quick brown fox jumps over the lazy dog"
    env = mpi_env() | {"TPI_MPI_RECORD": str(tmp_path / "rec")}
    cmd = mpirun_cmd(3) + ["-x", "TPI_MPI_RECORD", sys.executable, "-m", "tpi_mpi", "generate", "--model", str(model),
                           "--cache-dir", str(tmp_path / "c"), "--prompt", prompt, "--temperature", "0",
                           "--max-new-tokens", "8", "--ignore-eos", "--json", "--quiet", "--allreduce", "auto"]
    r = run_mpi(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    ids = out["prompt_ids"] + out["generated_ids"]
    secrets = [prompt.encode(), out["text"].encode()[:12]] + [
        np.array(ids[i:i + 3], dtype=dt).tobytes() for dt in (np.int64, np.int32) for i in range(0, len(ids) - 2)]
    dim = json.loads((model / "config.json").read_text())["hidden_size"]
    for rank in (1, 2):
        data = (tmp_path / "rec" / f"rank{rank}.bin").read_bytes()
        records = [json.loads(line) for line in (tmp_path / "rec" / f"rank{rank}.jsonl").read_text().splitlines()]
        assert records, "nothing recorded"
        forward = None                      # the last FORWARD header: its payload comes next
        for rec in records:
            if rec["dtype"] == "int64":     # control: the step header, or a start-up vote
                assert rec["shape"] in ([Header.SIZE], [1]), rec
                if rec["shape"] == [Header.SIZE]:
                    raw = np.frombuffer(data[rec["offset"]:rec["offset"] + 8 * Header.SIZE], dtype=np.int64)
                    h = Header.unpack(raw)          # fields: command, sequences, tokens, two flags, KV runs
                    assert h.cmd in (Cmd.FORWARD, Cmd.STOP, Cmd.RESET_STATS, Cmd.IDLE) and 0 <= h.n_tokens < 256 \
                        and set(raw[3:].tolist()) <= {0, 1}, rec
                    forward = h if h.cmd == Cmd.FORWARD else None
            elif rec["dtype"] == "uint8" and rec["op"] == "bcast" and forward:
                # a step: the sequence table (slot, position, tokens, logits wanted, KV runs; then the runs:
                # first block and blocks), then hidden states
                table_bytes = (forward.n_seqs * SeqStep.FIELDS + 2 * forward.n_runs) * 8
                assert forward.n_seqs == 1 and rec["shape"] == [table_bytes + forward.n_tokens * 4 * dim], rec
                slot, pos, n, want, n_runs, first, blocks = np.frombuffer(data[rec["offset"]:rec["offset"] + table_bytes],
                                                                          dtype=np.int64)
                assert slot == 0 and 0 <= pos < 256 and n == forward.n_tokens and want in (1, 2), rec
                assert n_runs == 1 and first == 0 and 16 * blocks >= pos + n, rec
                forward = None
            elif rec["dtype"] == "uint8" and rec["op"] == "bcast":   # the prepared folder's path
                assert rec["shape"] == [4096], rec
            elif rec["dtype"] == "uint8":   # start-up shipping: this rank's manifest (and shard files if missing)
                assert rec["op"] == "p2p", rec
            else:                           # partial sums and totals (and auto's trial timings)
                assert rec["dtype"] in ("float32", "float64"), rec
        for secret in secrets:
            assert secret not in data, f"rank {rank} received {secret!r}"


def _long_run(checkpoints, tmp_path, n=2, extra=()):
    model = checkpoints("llama", context=8192)
    cmd = mpirun_cmd(n) + [sys.executable, "-m", "tpi_mpi", "generate", "--model", str(model), "--cache-dir",
                           str(tmp_path / "c"), "--prompt", "Once upon a time", "--max-new-tokens", "8000",
                           "--ignore-eos", "--temperature", "0", "--quiet", *extra]
    for attempt in (1, 2):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=mpi_env(),
                                start_new_session=True)
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:      # wait until tokens stream: generation is under way
            if proc.stdout.read(64):
                return proc, str(tmp_path / "c")
            if proc.poll() is not None:
                break
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("no tokens within 120 s")
        err = proc.stderr.read().decode()
        if attempt == 2 or not launcher_failed(err):   # see conftest.LAUNCHER_FAILURE
            pytest.fail(err)


def _rank_pids(marker: str) -> dict[int, int]:
    pids = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() not in (proc / "cmdline").read_bytes() or b"mpirun" in (proc / "cmdline").read_bytes():
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(item.split(b"=")[1])] = int(proc.name)
    return pids


def _finish(proc, within: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        proc.wait(timeout=within)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the job was still running {within} s later")
    return proc.returncode, proc.stderr.read().decode(errors="replace"), time.monotonic() - t0


@pytest.mark.mpi
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_rank_ends_every_rank_promptly(checkpoints, tmp_path, victim):
    proc, marker = _long_run(checkpoints, tmp_path)
    pids = _rank_pids(marker)
    assert sorted(pids) == [0, 1]
    os.kill(pids[victim], signal.SIGKILL)
    code, err, took = _finish(proc, 10)
    assert code != 0
    assert f"rank {victim}" in err
    time.sleep(0.5)
    assert _rank_pids(marker) == {}


@pytest.mark.mpi
@pytest.mark.parametrize("allreduce", ["star", "mpi"])   # point to point; an MPI collective, named by a roll call
def test_frozen_worker_is_named_after_the_comm_timeout(checkpoints, tmp_path, allreduce):
    proc, marker = _long_run(checkpoints, tmp_path, extra=["--comm-timeout", "3", "--allreduce", allreduce])
    pids = _rank_pids(marker)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        code, err, took = _finish(proc, 20)
    finally:
        for pid in _rank_pids(marker).values():
            os.kill(pid, signal.SIGKILL)
    assert code != 0
    assert "rank 1 sent nothing for 3 s" in err, err
    assert 2.5 < took < 20


@pytest.mark.mpi
def test_ctrl_c_on_mpirun_stops_every_rank(checkpoints, tmp_path):
    proc, marker = _long_run(checkpoints, tmp_path)
    os.kill(proc.pid, signal.SIGINT)
    code, err, took = _finish(proc, 10)
    assert code != 0
    time.sleep(0.5)
    assert _rank_pids(marker) == {}


def test_interrupted_prepare_leaves_nothing_that_looks_valid(checkpoints, tmp_path):
    from tpi_mpi.config import ParallelConfig
    from tpi_mpi.prepare import prepare

    out = tmp_path / "p"
    script = ("import sys, os, tpi_mpi.prepare as p\n"
              "from tpi_mpi.config import ParallelConfig\n"
              "real = p._save_atomic\n"
              "def dying(path, *a, **k):\n"
              "    r = real(path, *a, **k)\n"
              "    if 'layer001' in path.name: os._exit(9)   # killed half way\n"
              "    return r\n"
              "p._save_atomic = dying\n"
              "p.prepare(sys.argv[1], sys.argv[2], ParallelConfig(2))\n")
    r = subprocess.run([sys.executable, "-c", script, str(checkpoints("llama")), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9
    assert not out.exists()
    assert list(tmp_path.glob(".p.partial-*"))          # the staging folder, never taken for a model
    prepare(checkpoints("llama"), out, ParallelConfig(2))
    assert not list(tmp_path.glob(".p.partial-*"))      # cleaned up by the next prepare
    assert (out / "rank1" / "manifest.json").exists()


@pytest.mark.mpi
def test_prepared_folder_for_another_ratio_or_source_version(checkpoints, tmp_path):
    import shutil

    from tpi_mpi.config import ParallelConfig
    from tpi_mpi.prepare import prepare

    src = tmp_path / "src"
    shutil.copytree(checkpoints("llama"), src)
    prepared = prepare(src, tmp_path / "p", ParallelConfig(2))
    r = run_tpi(["generate", "--model", str(prepared), "--prompt", "hi", "--ratio", "3,1", "--quiet"], n=2)
    assert r.returncode != 0 and "prepared with ratio 0.5,0.5, not 3,1" in r.stderr, r.stderr
    r = run_tpi(["generate", "--model", str(prepared), "--prompt", "hi", "--quiet"], n=3)
    assert r.returncode != 0 and "prepared for 2 ranks, not 3" in r.stderr, r.stderr
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")   # the source changed since: new weights, same shapes
    tensors["model.layers.1.mlp.down_proj.weight"] += 1e-3
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    r = run_tpi(["generate", "--model", str(prepared), "--prompt", "hi", "--quiet"], n=2)
    assert r.returncode != 0 and "prepared from an older version" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
