"""tpi_mpi.slurm_emulator and jobs/*.sbatch: every job script, sbatch'ed on a 4-node Slurm cluster
emulated on this machine (root; slurm-wlm and munge installed by the emulator with apt-get), prints
what a local mpirun of the same command prints, and each node ran its share; the cluster leaves
nothing behind. The first tests need neither root nor a cluster: slurm.conf and bad input."""

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, mpi_env, require_mpi_marker, run_tpi

from tpi_mpi.slurm_emulator import cluster as slurm
from tpi_mpi.slurm_emulator.conf import Layout, slurm_conf

JOBS = sorted(p.name for p in (ROOT / "jobs").glob("*.sbatch"))
PROMPT, N_NEW = "The three primary colors are", 8
GREEDY = ["--temperature", "0", "--max-new-tokens", str(N_NEW), "--allreduce", "star"]   # star: sums in rank order
JOB_DEADLINE_S = 300
KEY = "slurm-test-key"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))     # the nodes are on our bridge


def _emulator(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tpi_mpi.slurm_emulator", *args], capture_output=True, text=True,
                          timeout=60, env=mpi_env(), stdin=subprocess.DEVNULL)


def _documented(line: str) -> bool:
    return f"`{line}`" in (ROOT / "docs" / "errors.md").read_text()


# --- no cluster ------------------------------------------------------------------------------------

def test_slurm_conf_names_every_node_at_its_address():
    lay = Layout(Path("/tmp/x"), "10.78.3.254", ("node0", "node1"), ("10.78.3.1", "10.78.3.2"), 7000, 6818, 4, 2048)
    text = slurm_conf(lay)
    assert "SlurmctldHost=tpi-controller(10.78.3.254)" in text and "SlurmctldPort=7000" in text
    nodes = [line for line in text.splitlines() if line.startswith("NodeName=")]
    assert [re.search(r"NodeName=(\S+) NodeAddr=(\S+)", n).groups() for n in nodes] == \
        [("node0", "10.78.3.1"), ("node1", "10.78.3.2")]
    assert all("CPUs=4" in n for n in nodes)
    assert "cgroup" not in text                     # no cgroup plugin: containers seldom allow them
    assert f"AuthInfo=socket={lay.munge_socket}" in text
    with pytest.raises(ValueError, match="2 node names for 1 addresses"):
        Layout(Path("/tmp/x"), "a", ("n0", "n1"), ("b",), 1, 2, 1, 1)


@pytest.mark.parametrize("args, line", [
    (["start", "--nodes", "0"], "slurm_emulator: error: 0 nodes: use 1..64"),
    (["start", "--cpus", "0"], "slurm_emulator: error: 0 CPUs per node: use at least 1"),
    (["stop", "--run", "zzzz"], "slurm_emulator: error: no cluster zzzz is running"),
])
def test_bad_input_is_one_documented_line(args, line):
    r = _emulator(*args)
    assert r.returncode == 1 and r.stderr.strip() == line, r.stderr
    assert _documented(line), f"docs/errors.md lacks `{line}`"


# --- a real cluster --------------------------------------------------------------------------------

def _cluster_reason() -> str | None:
    try:
        slurm.check_host()
    except (PermissionError, FileNotFoundError) as e:
        return str(e)
    return None


needs_root = pytest.mark.skipif(_cluster_reason() is not None, reason=f"no Slurm cluster here: {_cluster_reason()}")


@pytest.fixture(scope="module")
def cluster():
    c = slurm.SlurmCluster(nodes=4, cpus=4)
    t0 = time.monotonic()
    c.start()                                       # installs slurm-wlm and munge first when missing
    print(f"\nslurm cluster up in {time.monotonic() - t0:.1f} s (install included)", file=sys.stderr)
    try:
        yield c
    finally:
        c.stop()
        assert slurm.leftovers(c.run_id) == ([], []) and not c.folder.exists()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The folder the jobs run in (their output files) and the shards' cache: the shared filesystem."""
    return tmp_path_factory.mktemp("slurm_jobs")


@pytest.fixture(scope="module")
def reference(shared) -> dict:
    """What 4 ranks started by a local mpirun print for the jobs' prompt (and prepares the shards)."""
    r = run_tpi(["generate", "--prompt", PROMPT, *GREEDY, "--json", "--quiet", "--threads", "1",
                 "--cache-dir", str(shared / "cache")], 4)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _job_env(c: slurm.SlurmCluster, **extra) -> dict:
    env = {**mpi_env(), "SLURM_CONF": c.env()["SLURM_CONF"]}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"     # the jobs' python and mpirun: ours
    return {**env, **extra}


def _sbatch(c: slurm.SlurmCluster, cwd: Path, job: str, args: list[str], **env) -> int:
    # --cpus-per-task=1: the 4 "nodes" share this machine's 2 cores (the scripts ask for 4 each)
    r = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", str(ROOT / "jobs" / job), *args],
                       cwd=cwd, env=_job_env(c, **env), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().split(";")[0])


def _job(c: slurm.SlurmCluster, job_id: int) -> dict:
    r = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=c.env(), capture_output=True, text=True,
                       timeout=30)
    return dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)


def _wait(c: slurm.SlurmCluster, job_id: int, states: set[str], output: Path, deadline_s: float = JOB_DEADLINE_S) -> dict:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        info = _job(c, job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", str(job_id)], env=c.env(), timeout=30)
    pytest.fail(f"job {job_id} not {'/'.join(states)} after {deadline_s} s: {info.get('JobState')}; "
                f"{_tail(output)}", pytrace=False)


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path.name} not written)"


def _nodes_that_ran(c: slurm.SlurmCluster, job_id: int) -> list[str]:
    """The nodes whose slurmd log shows a step of the job launched (node0: the batch script)."""
    step = re.compile(rf"launch task StepId={job_id}\.\d+ |Launching batch job {job_id} ")
    return [n for n in c.layout.node_names if step.search((c.folder / "spool" / f"{n}.log").read_text())]


def _answer(output: Path) -> dict:
    lines = [x for x in output.read_text().splitlines() if x.startswith("{")]
    assert lines, _tail(output)
    return json.loads(lines[-1])


def _finish_generate(c, shared, reference, job, **env) -> str:
    job_id = _sbatch(c, shared, job, ["-", PROMPT, *GREEDY], **env)
    output = shared / f"tpi_mpi-{job_id}.out"
    info = _wait(c, job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}, output)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _tail(output)
    answer = _answer(output)
    assert answer["world_size"] == 4
    assert answer["generated_ids"] == reference["generated_ids"] and answer["text"] == reference["text"]
    assert _nodes_that_ran(c, job_id) == list(c.layout.node_names)
    return output.read_text()


@pytest.mark.mpi
@needs_root
@pytest.mark.parametrize("job", JOBS)
def test_every_job_script_answers_on_the_emulated_cluster(cluster, shared, reference, job):
    require_mpi_marker(f"mpirun (sbatch jobs/{job})")
    if job == "generate-4nodes.sbatch":
        _finish_generate(cluster, shared, reference, job, TPI_CACHE_DIR=str(shared / "cache"))
    elif job == "generate-nodes-srun.sbatch":
        # per-node caches, as on node-local disks: rank 0 prepares and ships the other ranks' shards
        printed = _finish_generate(cluster, shared, reference, job, TPI_CACHE_DIR=str(shared / "local-{rank}"))
        assert "launcher: srun --mpi=pmix" in printed      # the PMIx path, not the mpirun fallback
        assert "shipping" in printed and (shared / "local-3").is_dir()
    elif job == "serve-supervised.sbatch":
        _serve(cluster, shared, reference, job)
    else:
        pytest.fail(f"no expectation for jobs/{job}: add one to this test", pytrace=False)


@pytest.mark.mpi
@needs_root
def test_srun_job_falls_back_to_mpirun_without_pmix(cluster, shared, reference, tmp_path):
    """A Slurm whose PMIx plugin does not load (an srun that refuses --mpi=pmix and passes the rest,
    mpirun's daemon launches included, to the real one): the job says so and answers through mpirun."""
    require_mpi_marker("mpirun (sbatch jobs/generate-nodes-srun.sbatch)")
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\n"
                    'for a in "$@"; do [ "$a" = --mpi=pmix ] && { echo "srun: no PMIx here" >&2; exit 1; }; done\n'
                    f'exec {shutil.which("srun")} "$@"\n')
    fake.chmod(0o755)
    env = _job_env(cluster)
    printed = _finish_generate(cluster, shared, reference, "generate-nodes-srun.sbatch",
                               PATH=f"{tmp_path}:{env['PATH']}", TPI_CACHE_DIR=str(shared / "cache"))
    assert "launcher: mpirun (srun --mpi=pmix does not work on this cluster)" in printed


def _serve(c, shared, reference, job) -> None:
    port = 8000
    job_id = _sbatch(c, shared, job, ["-"], TPI_MPI_API_KEY=KEY, TPI_PORT=str(port),
                     TPI_CACHE_DIR=str(shared / "cache"), TPI_HOSTFILE=str(shared / "hosts.txt"))
    output = shared / f"tpi_mpi-serve-{job_id}.out"
    try:
        _wait(c, job_id, {"RUNNING"}, output, 60)
        base = f"http://{c.layout.node_addrs[0]}:{port}/v1"   # the first node, across the bridge
        end = time.monotonic() + JOB_DEADLINE_S
        while "serving smollm2" not in _tail(output, 200):
            assert time.monotonic() < end and _job(c, job_id).get("JobState") == "RUNNING", _tail(output)
            time.sleep(1)
        body = json.dumps({"model": "smollm2-135m-instruct", "prompt": PROMPT, "max_tokens": N_NEW,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/completions", body, {"Authorization": f"Bearer {KEY}",
                                                                    "Content-Type": "application/json"})
        with NO_PROXY.open(req, timeout=120) as r:
            text = json.loads(r.read())["choices"][0]["text"]
        assert text == reference["text"]
        assert (shared / "hosts.txt").read_text().split() == ["node0", "slots=1", "node1", "slots=1", "node2",
                                                               "slots=1", "node3", "slots=1"]
        assert _nodes_that_ran(c, job_id) == list(c.layout.node_names)
        with pytest.raises(urllib.error.HTTPError, match="401"):      # the key is required
            NO_PROXY.open(urllib.request.Request(f"{base}/completions", body), timeout=30)
    finally:
        subprocess.run(["scancel", str(job_id)], env=c.env(), timeout=30)
    _wait(c, job_id, {"CANCELLED", "COMPLETED", "FAILED"}, output, 60)
    end = time.monotonic() + 30
    while (left := _job_processes(c)) and time.monotonic() < end:
        time.sleep(0.5)
    assert not left, f"left on the nodes after scancel: {left}"


def _job_processes(c: slurm.SlurmCluster) -> list[str]:
    """Commands running in the nodes' namespaces other than slurmd itself."""
    names = []
    for i in range(c.nodes):
        pids = subprocess.run(["ip", "netns", "pids", slurm.netns_name(c.run_id, i)], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
    return [n for n in names if n != "slurmd"]


@needs_root
def test_a_failed_start_leaves_nothing(monkeypatch):
    """slurmd that never registers (a deadline of 0 s): the start fails with the reason, and every
    daemon, namespace, link and file it made is gone."""
    c = slurm.SlurmCluster(nodes=2, log=lambda msg: None, start_timeout=0)
    with pytest.raises(slurm.ClusterError, match=r"^no .* after 0 s"):
        c.start()
    assert slurm.leftovers(c.run_id) == ([], []) and not c.folder.exists()
    assert _processes_mentioning(str(c.folder)) == []


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(text in a for a in args):
            found.append(" ".join(args))
    return found
