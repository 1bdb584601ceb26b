"""/health has one schema for `serve` and `serve --ranks` (the supervisor in front of the engine)."""

import queue
from types import SimpleNamespace

from tpi_mpi.serving import Engine, ServeConfig
from tpi_mpi.supervisor import Supervisor

KEYS = {"status", "model", "ranks", "hosts", "pids", "allreduce", "windows", "max_batch", "running", "queued",
        "restarts", "last_failure", "error"}


def serve_health(failed=None):
    jobs = queue.Queue()
    jobs.put("waiting")
    session = SimpleNamespace(comm=SimpleNamespace(size=2, mode="star"), pids=[11, 12], windows=["all", "all"])
    engine = SimpleNamespace(root=SimpleNamespace(session=session), cfg=ServeConfig(max_batch=4), failed=failed,
                             busy=3, jobs=jobs, waiting=None)
    return Engine.health(engine)


def supervisor_health(state, error=None):
    ready = {"pids": [21, 22, 23], "allreduce": "mpi", "windows": [1, 1, 1]}
    sup = SimpleNamespace(engine=SimpleNamespace(ready=ready), live=state == "serving", jobs=dict.fromkeys("abcdef"),
                          cfg=ServeConfig(max_batch=4), state=state, hosts=["a", "a", "b"], restarts=1,
                          last_failure={"ranks": [3]}, error=error)
    return Supervisor.health(sup)


def test_serve_and_supervisor_answer_the_same_keys():
    for body, status in [serve_health(), serve_health("rank 1 died"), supervisor_health("serving"),
                         supervisor_health("restarting"), supervisor_health("failed", "no engine can start")]:
        assert set(body) == KEYS, sorted(set(body) ^ KEYS)
    assert serve_health() == ({
        "status": "ok", "model": ServeConfig().model_id, "ranks": 2, "hosts": None, "pids": [11, 12],
        "allreduce": "star", "windows": ["all", "all"], "max_batch": 4, "running": 3, "queued": 1, "restarts": 0,
        "last_failure": None, "error": None}, 200)
    body, status = serve_health("rank 1 died")
    assert status == 503 and body["status"] == "failed" and body["error"] == "rank 1 died"
    body, status = supervisor_health("serving")
    assert status == 200 and body["status"] == "ok" and (body["running"], body["queued"]) == (4, 2)
    assert body["pids"] == [21, 22, 23] and body["windows"] == [1, 1, 1]
    body, status = supervisor_health("restarting")
    assert status == 200 and body["status"] == "restarting" and body["pids"] == []   # no engine to name
    assert supervisor_health("failed", "no engine can start")[1] == 503
