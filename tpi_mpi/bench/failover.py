"""`bench failover`: kill engine ranks of a supervised server (serve --ranks) while clients stream,
and check that every answer comes whole and the same as without kills.

It starts its own server, asks every prompt once alone (the reference texts), then soaks it: client
threads stream greedy answers while a killer thread SIGKILLs (or SIGSTOPs) a random worker rank and
waits for /health to say the engine is back. If it came back short of a rank, the killer rewrites
the hostfile so the dropped device returns at the next relaunch; only then, since the supervisor
takes any change of the file as "every slot is back", the rank just killed included. Per kill:
which rank, how long the supervisor took (its recovery_s) and the longest pause a client saw; at the
end, SIGINT to the supervisor and the time until none of its processes is left.
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import DEVNULL, STDOUT, Popen

from ..errors import ConfigError, TpiError
from ..processes import free_port, proc_stat, session_pids
from .record import append_json, host_fields, print_row
from .serve_client import Server

PROMPTS = ["Write a short story about a cluster of small computers.",
           "Explain what a hostfile is to a new system administrator.",
           "List five things to check when a server stops answering.",
           "Describe a lighthouse keeper's morning in a few sentences.",
           "Why do distributed systems need timeouts? Answer briefly.",
           "Give a recipe for a simple tomato soup."]
SIGNALS = {signal.SIGKILL: "KILL", signal.SIGSTOP: "STOP"}

# world: ranks when killed, world_after: when serving again; named: the rank(s) the supervisor blamed
KILL_COLUMNS = [("kill", 4, "{}"), ("signal", 6, "{}"), ("rank", 4, "{}"), ("named", 5, "{}"), ("world", 5, "{}"),
                ("world_after", 11, "{}"), ("in_flight", 9, "{}"), ("recovery_s", 10, "{:.2f}"),
                ("ready_s", 7, "{:.2f}"), ("pause_s", 7, "{:.2f}")]
SUMMARY_COLUMNS = [("ranks", 5, "{}"), ("requests", 8, "{}"), ("ok", 3, "{}"), ("equal", 5, "{}"),
                   ("kills", 5, "{}"), ("recovery_p50_s", 14, "{:.2f}"), ("recovery_max_s", 14, "{:.2f}"),
                   ("pause_max_s", 11, "{:.2f}"), ("wall_s", 7, "{:.1f}"), ("shutdown_s", 10, "{:.2f}"),
                   ("left", 4, "{}")]


@dataclass
class Stream:
    """One streamed answer: `times` (time.monotonic) holds the send, then every chunk's arrival."""
    prompt: int
    times: list[float] = field(default_factory=list)
    text: str = ""
    error: str | None = None


# --- processes ------------------------------------------------------------------------------------

def start_server(argv: list[str], log: Path, server: Server, timeout: float) -> Popen:
    """The supervisor in a session of its own (so its processes can be found), ready once /health answers."""
    with open(log, "wb") as f:
        proc = Popen(argv, stdin=DEVNULL, stdout=f, stderr=STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            last = (log.read_text(errors="replace").strip().splitlines() or ["(no output)"])[-1]
            raise TpiError(f"the server exited (status {proc.returncode}) before it was ready: {last} (log: {log})")
        try:
            if server.get("/health")["status"] == "ok":
                return proc
        except ConfigError:                  # not listening yet
            pass
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    raise TpiError(f"the server was not ready after {timeout:.0f} s (log: {log})")


def shutdown(proc: Popen, sessions: set[int], timeout: float = 60.0) -> tuple[float, list[int]]:
    """SIGINT to the supervisor; seconds until no process of its session or its engines' is left,
    and the ones still there after `timeout` (then killed, so nothing outlives the benchmark)."""
    sessions = sessions | {s[2] for e in os.listdir("/proc")    # the engine now running: mpirun's session
                           if e.isdigit() and (s := proc_stat(e)) and s[1] == proc.pid}
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    while time.monotonic() - t0 < timeout:
        proc.poll()                          # reap the supervisor, our child
        if not session_pids(*sessions):
            return time.monotonic() - t0, []
        time.sleep(0.05)
    left = session_pids(*sessions)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    return time.monotonic() - t0, left


# --- clients --------------------------------------------------------------------------------------

def ask(client, model: str, prompt: int, max_tokens: int) -> Stream:
    """One greedy streamed answer of exactly max_tokens tokens; a failure is noted, not raised."""
    s = Stream(prompt, [time.monotonic()])
    try:
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": PROMPTS[prompt]}], max_tokens=max_tokens,
                temperature=0, stream=True, extra_body={"ignore_eos": True}):
            s.times.append(time.monotonic())
            if chunk.choices:
                s.text += chunk.choices[0].delta.content or ""
    except Exception as e:                   # the openai client's errors and broken connections alike
        s.error = f"{type(e).__name__}: {e}"
    return s


def longest_gap(streams: list[Stream], t0: float, t1: float) -> float | None:
    """The longest gap between two chunks of one stream (or its send and first chunk) that overlaps
    [t0, t1]: a request sent while the engine restarts waits too (None: no stream was open)."""
    return max((b - a for s in streams for a, b in zip(s.times, s.times[1:]) if a < t1 and b > t0), default=None)


# --- the killer -----------------------------------------------------------------------------------

class Killer(threading.Thread):
    """Kills a random worker rank at random moments until `kills` are done or the soak ends."""

    def __init__(self, server: Server, sup_pid: int, hostfile: Path, ranks: int, kills: int, gap: float,
                 stop_share: float, seed: int, timeout: float) -> None:
        super().__init__(daemon=True, name="failover-killer")
        self.server, self.sup_pid, self.hostfile, self.ranks, self.kills = server, sup_pid, hostfile, ranks, kills
        self.gap, self.stop_share, self.rng, self.timeout = gap, stop_share, random.Random(seed), timeout
        self.done, self.records, self.sessions, self.error = threading.Event(), [], {sup_pid}, None

    def run(self) -> None:
        try:
            while len(self.records) < self.kills and not self.done.wait(self.rng.uniform(0, 2 * self.gap)):
                health = self.server.get("/health")
                if health["status"] == "ok" and len(health["pids"]) > 1:
                    self.kill(health)
                else:                        # one rank left, or restarting: wait for the next engine
                    self.wait_ready(health["restarts"] + (health["status"] == "ok"), until_done=True)
        except TpiError as e:
            self.error = str(e)

    def kill(self, health: dict) -> None:
        rank = self.rng.randrange(1, len(health["pids"]))
        pid, sig = health["pids"][rank], signal.SIGSTOP if self.rng.random() < self.stop_share else signal.SIGKILL
        stat = proc_stat(pid)
        engine = stat and proc_stat(stat[2])
        if not engine or engine[1] != self.sup_pid:      # only ever a rank of the mpirun our server started
            raise TpiError(f"pid {pid} (rank {rank} in /health) is not a rank of this server's engine: not killed")
        self.sessions.add(stat[2])
        t = time.monotonic()
        os.kill(pid, sig)
        back = self.wait_ready(health["restarts"] + 1)
        ready_s = time.monotonic() - t
        if len(back["pids"]) < self.ranks:   # a new mtime: every device back at the next launch, none before
            self.hostfile.write_text(self.hostfile.read_text())
        failure = back["last_failure"] or {}
        self.records.append({"kill": len(self.records) + 1, "signal": SIGNALS[sig], "rank": rank, "pid": pid,
                             "at": t, "world": len(health["pids"]), "world_after": len(back["pids"]),
                             "in_flight": health["running"] + health["queued"],
                             "named": ",".join(map(str, failure.get("ranks", []))),
                             "message": failure.get("message"), "recovery_s": failure.get("recovery_s"),
                             "ready_s": ready_s, "restarts": back["restarts"] - health["restarts"]})

    def wait_ready(self, restarts: int, until_done: bool = False) -> dict | None:
        """/health once the engine serves again after `restarts` launches in all; `until_done`: or None
        when the soak ends first (no kill of ours is coming to restart it)."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            health = self.server.get("/health")
            failure = health["last_failure"]
            if health["status"] == "ok" and health["restarts"] >= restarts and \
                    (failure is None or failure["recovery_s"] is not None):   # set just after the status
                return health
            if self.done.wait(0.1) and until_done:
                return None
        raise TpiError(f"the server was not serving again {self.timeout:.0f} s after a kill: {health}")


# --- the benchmark --------------------------------------------------------------------------------

def bench_failover(ranks: int = 3, requests: int = 30, clients: int = 4, kills: int = 10, seed: int = 0,
                   stop_share: float = 0.0, max_tokens: int = 64, max_batch: int = 4, comm_timeout: float = 10.0,
                   kill_gap: float | None = None, model: str | None = None, cache_dir: str | None = None,
                   timeout: float = 600.0, out: str | None = None) -> dict:
    """Start a server, take the reference texts, soak it under kills, shut it down; one record."""
    try:
        import openai
    except ImportError:
        raise ConfigError("bench failover needs the openai package: pip install 'tpi_mpi[test]'") from None
    if ranks < 2 or requests < 1 or clients < 1 or kills < 0 or not 0 <= stop_share <= 1:
        raise ConfigError(f"--ranks {ranks} --requests {requests} --clients {clients} --kills {kills} "
                          f"--stop-share {stop_share}: ranks at least 2, requests and clients 1, share 0 to 1")
    work = Path(tempfile.mkdtemp(prefix="tpi_mpi-failover-"))
    hostfile, log, port = work / "hostfile", work / "server.log", free_port()
    hostfile.write_text(f"localhost slots={ranks}\n")
    argv = [sys.executable, "-m", "tpi_mpi", "serve", "--ranks", str(ranks), "--hostfile", str(hostfile),
            "--port", str(port), "--max-batch", str(max_batch), "--comm-timeout", str(comm_timeout),
            *(["--model", model] if model else []), *(["--cache-dir", cache_dir] if cache_dir else [])]
    server = Server(f"http://127.0.0.1:{port}", timeout=30)
    proc = start_server(argv, log, server, timeout)
    killer = None
    try:
        name = server.get("/v1/models")["data"][0]["id"]
        client = openai.OpenAI(base_url=f"{server.base}/v1", api_key="none", max_retries=0, timeout=timeout,
                               http_client=openai.DefaultHttpxClient(trust_env=False))
        reference = [ask(client, name, i, max_tokens) for i in range(len(PROMPTS))]
        if bad := next((s for s in reference if s.error), None):
            raise TpiError(f"a reference request failed, with no kill: {bad.error} (log: {log})")
        mean_s = statistics.mean(s.times[-1] - s.times[0] for s in reference)
        gap = kill_gap if kill_gap is not None else mean_s * requests / clients / (kills + 1)
        killer = Killer(server, proc.pid, hostfile, ranks, kills, gap, stop_share, seed, timeout)
        t0 = time.monotonic()
        killer.start()
        with ThreadPoolExecutor(max_workers=clients) as pool:
            streams = list(pool.map(lambda i: ask(client, name, i % len(PROMPTS), max_tokens), range(requests)))
        wall_s = time.monotonic() - t0
        ended = proc.poll()                  # the supervisor should outlive every kill
    finally:
        if killer:
            killer.done.set()
            killer.join()
        shutdown_s, left = shutdown(proc, killer.sessions if killer else {proc.pid})
    record = {"bench": "failover", "model": name, "ranks": ranks, "max_batch": max_batch, "comm_timeout": comm_timeout,
              "clients": clients, "max_tokens": max_tokens, "seed": seed, "stop_share": stop_share, "kill_gap_s": gap,
              "reference_s": mean_s, "kills_asked": kills, "killer_error": killer.error, "server_ended": ended,
              **make_record(streams, reference, killer.records, wall_s, shutdown_s, left), **host_fields()}
    for i, k in enumerate(killer.records):
        print_row(KILL_COLUMNS, k, header=i == 0)
    print()
    print_row(SUMMARY_COLUMNS, record, header=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        append_json(out, record)
    if found := problems(record):
        raise TpiError(f"bench failover: {'; '.join(found)} (server log: {log})")
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return record


def make_record(streams: list[Stream], reference: list[Stream], kills: list[dict], wall_s: float, shutdown_s: float,
                left: list[int]) -> dict:
    """The soak's figures; each kill gets the longest pause a client saw across its moment."""
    for k in kills:
        at = k.pop("at")
        k["pause_s"] = longest_gap(streams, at, at + k["ready_s"])
    recoveries = [k["recovery_s"] for k in kills if k["recovery_s"] is not None]
    pauses = [k["pause_s"] for k in kills if k["pause_s"] is not None]
    failed = [s.error for s in streams if s.error]
    return {"requests": len(streams), "ok": len(streams) - len(failed), "first_error": failed[0] if failed else None,
            "equal": sum(s.error is None and s.text == reference[s.prompt].text for s in streams),
            "differ": [i for i, s in enumerate(streams) if s.error is None and s.text != reference[s.prompt].text],
            "kills": len(kills), "recovery_p50_s": statistics.median(recoveries) if recoveries else None,
            "recovery_max_s": max(recoveries, default=None), "pause_max_s": max(pauses, default=None),
            "wall_s": wall_s, "shutdown_s": shutdown_s, "left": len(left), "left_pids": left, "per_kill": kills}


def problems(r: dict) -> list[str]:
    """What the run found wrong, a phrase each (empty: every check passed)."""
    found = []
    if r["ok"] < r["requests"]:
        found.append(f"{r['requests'] - r['ok']} request(s) failed, first: {r['first_error']}")
    if r["differ"]:
        found.append(f"{len(r['differ'])} text(s) differ from the reference (requests {r['differ']})")
    if wrong := [k for k in r["per_kill"] if k["named"] != str(k["rank"])]:    # the wrong device was dropped
        found.append("the supervisor named another rank than the one killed: " + ", ".join(
            f"kill {k['kill']} ({k['signal']} rank {k['rank']}, named {k['named'] or 'none'})" for k in wrong))
    if r["killer_error"]:
        found.append(f"the killer stopped: {r['killer_error']}")
    if r["server_ended"] is not None:
        found.append(f"the server ended during the soak (exit status {r['server_ended']})")
    if r["left"]:
        found.append(f"{r['left']} process(es) left after SIGINT (killed): {r['left_pids']}")
    return found
