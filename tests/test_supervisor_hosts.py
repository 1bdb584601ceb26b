"""A lost host, not a lost process (issue 29): `serve --ranks 3 --hostfile H` over four hosts
emulated by tpi_mpi.netem (each its own network namespace, hostname and prted; the fourth a spare).
A host's link cut mid-stream (a device out of Wi-Fi range), or every process of a host killed (it
lost power): the stream ends with the text it would have had, the host is dropped, the spare fills
in, later requests are served. Every namespace is ours and is removed, pass or fail."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import require_mpi_marker
from test_netem import needs_netns

from tpi_mpi.netem import emulator as netem
from tpi_mpi.netem.switch import Link

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")

ROOT = Path(__file__).resolve().parent.parent
CLONE_NEWNET = 0x40000000
PORT = 8000                    # inside host 0's namespace: nothing else listens there


def on_host(ns: str, fn):
    """fn() in a thread of ours moved into network namespace `ns` (setns applies to one thread):
    the client's connections start on the supervisor's host."""
    out = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), f"setns into {ns}")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def health() -> dict:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def stream(prompt: str, max_tokens: int, after=None) -> tuple[str, float]:
    """A greedy streamed completion's text and its longest pause between chunks; `after(i)` after chunk i."""
    body = json.dumps({"model": "x", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    parts, longest, last = [], 0.0, time.monotonic()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: {"):
                continue
            now = time.monotonic()
            longest, last = max(longest, now - last), now
            parts.append(json.loads(line[6:])["choices"][0]["text"])
            if after:
                after(len(parts))
    return "".join(parts), longest


@pytest.mark.mpi
@needs_netns
@pytest.mark.parametrize("how", ["link cut", "host killed"])
def test_a_lost_host_costs_the_stream_a_pause_and_a_spare_fills_in(checkpoints, tmp_path, how):
    require_mpi_marker("mpirun (serve --ranks over tpi_mpi.netem)")
    model = checkpoints("llama")
    timeout = 6               # a loaded host delays beats by up to 5.9 s while an engine starts (twice the limit then)
    log = tmp_path / "supervisor.log"
    with netem.EdgeNet(4, Link(1.0, 300)) as net:
        ns0 = net.namespaces[0]
        cmd = net.inside(0, [sys.executable, "-m", "tpi_mpi", "serve", "--ranks", "3", "--hostfile", str(net.hostfile()),
                             "--launcher-args", " ".join(net.launcher_args()), "--model", str(model), "--cache-dir",
                             str(tmp_path / "c"), "--port", str(PORT), "--comm-timeout", str(timeout)])
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=net.env() | {"PYTHONPATH": str(ROOT)}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def wait(ok, limit=240) -> dict:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                assert proc.poll() is None, f"the supervisor exited: {log.read_text(errors='replace')[-3000:]}"
                try:
                    if ok(h := on_host(ns0, health)):
                        return h
                except OSError:
                    pass
                time.sleep(0.3)
            raise AssertionError(f"/health never satisfied the test: {log.read_text(errors='replace')[-3000:]}")

        try:
            h = wait(lambda h: h["status"] == "ok")
            assert h["hosts"] == [netem.address(i) for i in range(3)], h
            prompt, tokens = "Once upon a time", 80
            whole = on_host(ns0, lambda: stream(prompt, tokens))[0]       # 3 hosts, nothing lost
            lost = []

            def lose(i):
                if i == 20:
                    lost.append(time.time())
                    net.cut(2) if how == "link cut" else net.kill_host(2)

            text, pause = on_host(ns0, lambda: stream(prompt, tokens, lose))
            assert lost and text == whole
            h = wait(lambda h: h["status"] == "ok" and h["restarts"] == 1)
            failure = h["last_failure"]
            assert failure["hosts"] == [netem.address(2)], failure
            assert h["hosts"] == [netem.address(i) for i in (0, 1, 3)], h            # the spare filled in
            assert on_host(ns0, lambda: stream("The cluster", 8))[0]                  # later requests served
            print(f"\n{how}: longest pause {pause:.2f} s, failure known after {failure['at'] - lost[0]:.2f} s "
                  f"({failure['message']}), engine back {failure['recovery_s']:.2f} s after that")
            assert pause <= 30
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert netem.leftovers(net.run_id) == ([], [])
