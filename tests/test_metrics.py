"""serve's /metrics, /cluster and page, on the real HTTP front (serve.Api in uvicorn) with a scripted
engine in its place: every token's time is known, so the counts and histograms can be checked
exactly, parsed by prometheus_client's own parser. The real engine's figures are checked in
test_web.py."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("prometheus_client", reason="the serve extra is not installed (pip install -e '.[serve]')")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from tpi_mpi.jobs import ApiError  # noqa: E402
from tpi_mpi.serve import WEB, Api, HttpThread  # noqa: E402
from tpi_mpi.serving import ServeConfig, health_body  # noqa: E402

GAP_S = 0.03          # the scripted engine's time between two tokens


class Codec:
    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode(" ".join(m["content"] for m in messages)) + [0, 0]


class ScriptedEngine:
    """A front that answers each job with max_tokens tokens "t0 t1 ...", GAP_S apart, from a thread
    of its own (as the engine's main thread does); `refuse` makes submit answer 429."""

    def __init__(self) -> None:
        self.cfg, self.codec, self.context = ServeConfig(max_batch=4), Codec(), 256
        self.refuse = False

    def submit(self, job) -> None:
        if self.refuse:
            raise ApiError(429, "queue full", code="queue_full")
        threading.Thread(target=self._answer, args=(job,), daemon=True).start()

    def _answer(self, job) -> None:
        for i in range(job.max_tokens):
            time.sleep(GAP_S)
            if job.cancelled:
                return
            job.token(i, f"t{i} ")
        n = len(job.prompt_ids)
        job.send("done", {"finish_reason": "length", "usage": {"prompt_tokens": n, "completion_tokens": job.max_tokens,
                                                               "total_tokens": n + job.max_tokens}})

    def health(self):
        return health_body("ok", self.cfg, running=1, queued=2, ranks=2, pids=[7, 8], windows=["all", 2]), 200

    def engine_state(self):
        return {"kv_blocks_used": 3, "kv_blocks_total": 40, "hosts": ["a", "b"], "resident": [0, 5],
                "rss_bytes": [100 << 20, 80 << 20], "peak_rss_bytes": [120 << 20, 90 << 20]}

    def log(self, msg: str) -> None:
        print(msg)


@pytest.fixture
def server():
    engine = ScriptedEngine()
    api = Api(engine)
    http = HttpThread(api.app(), "127.0.0.1", 0)
    http.start()
    try:
        yield engine, http.port
    finally:
        http.stop()


def request(port: int, method: str, path: str, body=None) -> tuple[int, str, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=json.dumps(body) if isinstance(body, dict) else body,
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.headers.get("content-type", ""), r.read()
    finally:
        c.close()


def samples(port: int) -> dict:
    """{(sample name, labels as a sorted tuple): value} of one scrape."""
    status, kind, text = request(port, "GET", "/metrics")
    assert status == 200 and kind.startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode()) for s in family.samples}


def test_metrics_count_what_the_clients_got(server):
    engine, port = server
    sizes = [3, 5, 2]
    for n in sizes:                                            # plain completions
        status, _, body = request(port, "POST", "/v1/completions", {"prompt": "a b c d", "max_tokens": n})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == n
    status, _, body = request(port, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x y"}],
                                                                      "max_tokens": 4, "stream": True})
    assert status == 200 and body.decode().rstrip().endswith("data: [DONE]")
    assert request(port, "POST", "/v1/completions", b"{not json")[0] == 400
    engine.refuse = True
    assert request(port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 1})[0] == 429

    m = samples(port)
    count = {o: m[("tpi_mpi_requests_total", (("outcome", o),))] for o in
             ("stop", "length", "cancelled", "refused", "invalid", "error")}
    assert count == {"stop": 0, "length": 4, "cancelled": 0, "refused": 1, "invalid": 1, "error": 0}
    generated = sizes + [4]
    assert m[("tpi_mpi_prompt_tokens_total", ())] == 3 * 4 + 4          # 4 words per prompt; the chat's 2 + 2
    assert m[("tpi_mpi_generation_tokens_total", ())] == sum(generated)
    assert m[("tpi_mpi_time_to_first_token_seconds_count", ())] == 4
    assert m[("tpi_mpi_time_to_first_token_seconds_sum", ())] >= 4 * GAP_S
    gaps = sum(n - 1 for n in generated)
    assert m[("tpi_mpi_time_per_output_token_seconds_count", ())] == gaps
    assert GAP_S * gaps <= m[("tpi_mpi_time_per_output_token_seconds_sum", ())] < 10 * GAP_S * gaps
    assert m[("tpi_mpi_time_per_output_token_seconds_bucket", (("le", "0.01"),))] == 0   # no gap under the sleep
    assert m[("tpi_mpi_time_per_output_token_seconds_bucket", (("le", "+Inf"),))] == gaps
    # what the front and its engine hold, read at the scrape
    assert (m[("tpi_mpi_requests_running", ())], m[("tpi_mpi_requests_waiting", ())]) == (1, 2)
    assert (m[("tpi_mpi_kv_blocks_used", ())], m[("tpi_mpi_kv_blocks_total", ())]) == (3, 40)
    assert m[("tpi_mpi_rank_resident_memory_bytes", (("rank", "1"),))] == 80 << 20
    assert m[("tpi_mpi_rank_peak_resident_memory_bytes", (("rank", "0"),))] == 120 << 20
    assert (m[("tpi_mpi_engine_restarts_total", ())], m[("tpi_mpi_ranks", ())], m[("tpi_mpi_up", ())]) == (0, 2, 1)


def test_a_client_gone_mid_stream_is_counted_as_cancelled(server):
    engine, port = server
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 200, "stream": True}),
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    r.fp.readline()                                            # the first event, then the client goes
    c.close()
    deadline = time.monotonic() + 10
    while samples(port)[("tpi_mpi_requests_total", (("outcome", "cancelled"),))] != 1:
        assert time.monotonic() < deadline, "the gone client was not counted"
        time.sleep(0.05)
    assert samples(port)[("tpi_mpi_generation_tokens_total", ())] < 200


def test_two_servers_keep_their_counts_apart(server):
    _, port = server
    other = HttpThread(Api(ScriptedEngine()).app(), "127.0.0.1", 0)
    other.start()
    try:
        assert request(port, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
        assert samples(port)[("tpi_mpi_requests_total", (("outcome", "length"),))] == 1
        assert samples(other.port)[("tpi_mpi_requests_total", (("outcome", "length"),))] == 0
    finally:
        other.stop()


def test_cluster_state_and_the_page(server):
    _, port = server
    request(port, "POST", "/v1/completions", {"prompt": "a b", "max_tokens": 3})
    status, _, body = request(port, "GET", "/cluster")
    state = json.loads(body)
    assert status == 200 and state["ranks"] == 2 and state["windows"] == ["all", 2]
    assert state["engine"]["resident"] == [0, 5] and state["engine"]["kv_blocks_total"] == 40
    assert (state["prompt_tokens"], state["generated_tokens"], state["requests"]["length"]) == (2, 3, 1)
    status, kind, page = request(port, "GET", "/")
    assert status == 200 and kind.startswith("text/html") and b'id="rank-table"' in page
    for name in ("app.js", "style.css"):
        assert request(port, "GET", f"/static/{name}")[0] == 200
    assert request(port, "GET", "/static/nothing.js")[0] == 404


def test_the_page_is_package_data():
    """A non-editable install ships what pyproject's package-data names: every file of the page."""
    patterns = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["tpi_mpi"]
    shipped = {p for pattern in patterns for p in WEB.parent.glob(pattern)}
    assert {"index.html", "app.js", "style.css"} <= {p.name for p in shipped}
    assert set(WEB.iterdir()) <= shipped


def test_serve_without_prometheus_client_says_what_to_install():
    """An install whose serve extra predates /metrics: one line naming the package and the fix."""
    code = ("import sys; sys.modules['prometheus_client'] = None\n"         # as if not installed
            "from tpi_mpi.__main__ import main; sys.argv = ['tpi_mpi', 'serve']; main()")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert run.stderr.strip() == ("tpi_mpi: error: serve needs the HTTP stack (prometheus_client is missing): "
                                  "pip install 'tpi_mpi[serve]'")
