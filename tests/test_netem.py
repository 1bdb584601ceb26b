"""tpi_mpi.netem and netem_switch: the link model as pure arithmetic, then real emulated links (root
and `ip netns` only): a ping-pong over a 5 ms link, run by `bench comm --pingpong-only` through
tpi_mpi's comm layer, measures about 5 ms one way, and no namespace outlives its run, whether the
command succeeds, fails or is interrupted."""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import mpi_env, require_mpi_marker
from tpi_mpi.netem import emulator as netem
from tpi_mpi.netem.switch import Link, LinkModel


def _netns_reason() -> str | None:
    try:
        netem.check_host()
        netem.find_mpirun()
    except (PermissionError, FileNotFoundError) as e:
        return str(e)
    return None


needs_netns = pytest.mark.skipif(_netns_reason() is not None, reason=f"netem cannot run here: {_netns_reason()}")


def _netem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    require_mpi_marker(f"mpirun (python -m tpi_mpi.netem {args[0]})")      # run and calibrate start it
    return subprocess.run([sys.executable, "-m", "tpi_mpi.netem", *args], capture_output=True, text=True,
                          timeout=timeout, env=mpi_env(), stdin=subprocess.DEVNULL)


def _run_id(stderr: str) -> str:
    m = re.search(r"netem: run ([0-9a-f]{4}):", stderr)
    assert m, stderr
    return m.group(1)


def _left_behind(run_id: str) -> list[str]:
    namespaces, links = netem.leftovers(run_id)
    return namespaces + links


def _commands_in(ns: str) -> list[str]:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    names = []
    for pid in pids:
        try:
            names.append(open(f"/proc/{pid}/comm").read().strip())
        except OSError:
            pass
    return names


# --- the model -------------------------------------------------------------------------------------

def test_link_model_serialises_then_delays():
    m = LinkModel(3, delay_s=0.005, rate_bps=8e6)         # 8 Mbit/s: 1000 bytes take 1 ms
    sent = m.send(0.0, 1000, src=0)
    assert sent == pytest.approx(0.001)
    assert m.arrive(sent, 1000, dst=1) == pytest.approx(0.006)
    sent = m.send(0.0, 1000, src=0)                        # queued behind the first on 0's uplink
    assert sent == pytest.approx(0.002)
    assert m.arrive(sent, 1000, dst=1) == pytest.approx(0.007)
    sent = m.send(0.0, 1000, src=2)                        # another sender: its own uplink is idle...
    assert sent == pytest.approx(0.001)
    assert m.arrive(sent, 1000, dst=1) == pytest.approx(0.008)   # ...but 1's downlink is busy until 2 ms
    assert m.arrive(m.send(0.5, 1000, src=1), 1000, dst=0) == pytest.approx(0.506)   # idle link: no queue


def test_link_rejects_impossible_settings():
    with pytest.raises(ValueError, match="negative"):
        Link(-1, 300)
    with pytest.raises(ValueError, match="positive"):
        Link(1, 0)
    with pytest.raises(ValueError, match="ranks"):
        netem.EdgeNet(0, Link(1, 300))


# --- real namespaces -------------------------------------------------------------------------------

@pytest.mark.mpi
@needs_netns
def test_pingpong_measures_the_requested_delay(tmp_path):
    out = tmp_path / "cal.jsonl"
    r = _netem("calibrate", "--ranks", "2", "--delay-ms", "5", "--rate-mbit", "300", "--sizes", "8,1048576",
               "--iters", "8", "--warmup", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text().splitlines()[-1])
    small, large = row["results"]
    assert 4.5 <= small["one_way_ms"] <= 8.0, row
    # 1 MiB takes at least delay + 8 Mibit / 300 Mbit/s = 33 ms, so it never beats the rate
    assert large["one_way_ms"] > 33.0 and large["effective_mbit"] < 300, row
    assert row["dropped"] == 0 and max(row["rank_cpu_per_wall"]) < 0.9, row   # waiting ranks do not spin
    assert _left_behind(row["run"]) == []


@pytest.mark.mpi
@needs_netns
def test_failing_command_exit_code_and_teardown():
    r = _netem("run", "--ranks", "2", "--delay-ms", "1", "--", sys.executable, "-c",
               "import os, sys; sys.exit(3 if os.environ['OMPI_COMM_WORLD_RANK'] == '1' else 0)")
    assert r.returncode == 3, r.stderr
    assert _left_behind(_run_id(r.stderr)) == []


@pytest.mark.mpi
@needs_netns
def test_interrupted_run_leaves_nothing():
    require_mpi_marker("mpirun (python -m tpi_mpi.netem run)")
    proc = subprocess.Popen([sys.executable, "-m", "tpi_mpi.netem", "run", "--ranks", "2", "--", "sleep", "60"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=mpi_env(),
                            stdin=subprocess.DEVNULL)
    try:
        run_id = _run_id(proc.stderr.readline())          # the network is up once this line is out
        deadline = time.monotonic() + 30
        while "sleep" not in _commands_in(netem.namespace(run_id, 1)) and time.monotonic() < deadline:
            time.sleep(0.2)                               # wait for rank 1 to be running
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _left_behind(run_id) == []


def _kernel_has_netem() -> bool | None:
    """What the kernel says about the netem qdisc, without trying it: True when it is loaded or built
    in, False when the kernel was built without it, None when it is a module not loaded yet (whether
    it may be loaded here is another matter) or no kernel config is readable."""
    if os.path.exists("/sys/module/sch_netem"):
        return True
    for path in ("/proc/config.gz", f"/boot/config-{os.uname().release}"):
        try:
            with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
                text = f.read()
        except OSError:
            continue
        if "CONFIG_NET_SCH_NETEM=y" in text:
            return True
        if "# CONFIG_NET_SCH_NETEM is not set" in text:
            return False
        return None
    return None


@needs_netns
def test_netem_probe_matches_the_kernel_and_picks_the_backend():
    expected = _kernel_has_netem() if shutil.which("tc") else False
    netem.netem_available.cache_clear()
    available = netem.netem_available()
    if expected is not None:                                # on this machine's kernel: known
        assert available is expected
    assert not [n for n in netem.leftovers()[0] if n.endswith("-probe")]
    # auto takes the netem qdisc where the probe found it, the switch's own delay otherwise
    with netem.EdgeNet(2, Link(1, 300), log=lambda msg: None) as net:
        assert net.backend == ("netem" if available else "forwarder")
        if shutil.which("tc"):
            qdiscs = subprocess.run(["tc", "-n", net.namespaces[1], "qdisc", "show"], capture_output=True,
                                    text=True, check=True).stdout
            assert ("netem" in qdiscs) == available, qdiscs
    assert _left_behind(net.run_id) == []
    if not available:                                       # asked for by name: refused, nothing made
        forced = netem.EdgeNet(2, Link(1, 300), backend="netem", log=lambda msg: None)
        with pytest.raises(RuntimeError, match="no netem qdisc"):
            with forced:
                pass
        assert _left_behind(forced.run_id) == []
