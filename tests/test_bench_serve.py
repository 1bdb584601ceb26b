"""bench serve against a fake OpenAI-compatible server in this process: the figures it computes from
known delays, its JSON lines, the probe's verdicts, and the one-line error when no server answers.

The fake server streams server-sent events as tpi_mpi serve does: prefill takes PREFILL_BASE plus
`prefill_per_word` per word of the prompt, then one token every `token_s`; usage counts one prompt
token per word plus TEMPLATE_TOKENS. `sequential` makes it answer one request at a time (today's
tpi_mpi serve), otherwise requests run side by side.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tpi_mpi.bench.serve import bench_serve, level_record
from tpi_mpi.bench.serve_client import Reply, read_events
from tpi_mpi.errors import ConfigError
from tpi_mpi.processes import free_port

PREFILL_BASE = 0.05
TEMPLATE_TOKENS = 5


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token_s: float = 0.02, prefill_per_word: float = 0.0, sequential: bool = False,
                 busy_changes_text: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), FakeHandler)
        self.token_s, self.prefill_per_word = token_s, prefill_per_word
        self.busy_changes_text, self.running, self.lock = busy_changes_text, 0, threading.Lock()
        self.gate = threading.Lock() if sequential else None
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class FakeHandler(BaseHTTPRequestHandler):
    server: FakeServer

    def log_message(self, *args) -> None:           # quiet
        pass

    def send_json(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_json({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
        else:
            self.send_json({"status": "ok", "ranks": 2, "allreduce": "mpi", "windows": ["all", "all"],
                            "running": self.server.running, "queued": 0})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["stream"] and body["stream_options"] == {"include_usage": True} and body["ignore_eos"]
        words = len((body["prompt"] if "prompt" in body else body["messages"][0]["content"]).split())
        with self.server.lock:
            self.server.running += 1
        try:
            if self.server.gate:
                with self.server.gate:
                    self.stream(body, words)
            else:
                self.stream(body, words)
        finally:
            with self.server.lock:
                self.server.running -= 1

    def stream(self, body: dict, words: int) -> None:
        s = self.server
        time.sleep(PREFILL_BASE + s.prefill_per_word * words)
        self.send_response(200)                     # as tpi_mpi serve: headers go with the first token
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(data) -> None:
            self.wfile.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        completion = "prompt" in body
        if not completion:
            event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        n = body["max_tokens"]
        for i in range(n):
            word = f" w{i}{words}" + ("!" if s.busy_changes_text and s.running > 1 else "")
            event({"choices": [{"index": 0, "text": word, "finish_reason": None} if completion else
                               {"index": 0, "delta": {"content": word}, "finish_reason": None}]})
            if i < n - 1:
                time.sleep(s.token_s)
        usage = {"prompt_tokens": words + TEMPLATE_TOKENS, "completion_tokens": n, "total_tokens": words + 5 + n}
        event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}], "usage": usage})
        event({"choices": [], "usage": usage})
        event("[DONE]")


@pytest.fixture
def fake():
    servers = []

    def start(**kw) -> FakeServer:
        srv = FakeServer(**kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_levels_report_tokens_latency_and_speedup_from_known_delays(fake, tmp_path, capsys):
    """The fake's sleeps are lower bounds that hold however loaded the machine is; upper bounds are
    ratios to them with wide margins (a busy 2-core machine adds tens of ms per request)."""
    srv = fake(token_s=0.05)
    out = tmp_path / "serve.jsonl"
    levels = bench_serve(srv.url, requests=4, clients=(4, 1), max_tokens=5, out=str(out))["levels"]
    one, four = levels                                  # fewest clients first
    latency = PREFILL_BASE + 4 * 0.05                   # prefill, then 4 gaps between 5 tokens: 0.25 s
    assert [r["clients"] for r in levels] == [1, 4]
    for r in levels:
        assert r["ok"] == 4 and r["failed"] == 0 and r["completion_tokens"] == 20
        assert r["prompt_tokens"] == 10 + TEMPLATE_TOKENS     # the default prompt has 10 words
        # per request, not per level: 4 requests one after another would take 4x
        assert latency <= r["p50_s"] <= r["p95_s"] < 2 * latency
        # to the first token, not to the last: that one comes at least 4 gaps later
        assert PREFILL_BASE <= r["ttft_p50_s"] <= r["ttft_p95_s"] and r["ttft_p50_s"] < latency
        assert r["ttft_p50_s"] <= r["p50_s"] and r["ttft_p95_s"] <= r["p95_s"]
        assert r["completion_tok_s"] == pytest.approx(20 / r["wall_s"])
        assert r["req_per_min"] == pytest.approx(60 * 4 / r["wall_s"])
    assert one["wall_s"] >= 4 * latency                 # one at a time
    assert four["wall_s"] >= latency                    # side by side ...
    assert one["speedup"] == 1.0 and four["speedup"] == pytest.approx(one["wall_s"] / four["wall_s"])
    assert four["speedup"] > 2                          # ... so at most half the time (4x when idle)

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["clients"] for r in records] == [1, 4]
    for field in ("bench", "model", "ranks", "commit", "host", "time", "max_tokens", "speedup", "ttft_p95_s"):
        assert field in records[0], field
    assert records[0]["bench"] == "serve" and records[0]["model"] == "fake-model" and records[0]["ranks"] == 2
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["clients", "requests", "ok"] and table[0].split()[-1] == "speedup"


def test_speedup_is_left_out_without_a_sequential_level(fake):
    srv = fake(token_s=0.0)
    (r,) = bench_serve(srv.url, requests=2, clients=(2,), max_tokens=2)["levels"]
    assert r["speedup"] is None and r["ok"] == 2


def test_a_long_prompt_done_before_the_short_request_is_inconclusive(fake, tmp_path, capsys):
    srv = fake(token_s=0.0)                             # prefill ignores the prompt's length: 0.05 s
    out = tmp_path / "probe.jsonl"
    probe = bench_serve(srv.url, clients=(), long_prompt=50, probe_delay=0.5, probe_repeats=2,
                        out=str(out))["probe"]
    assert probe["verdicts"] == ["inconclusive"] * 2 and probe["conclusive"] == 0
    assert probe["verdict"] == "inconclusive" and probe["ratio"] is None and probe["short_ttft_s"] is None
    assert probe["long_prompt_tokens"] == 50            # the words were rescaled by the server's count
    assert "inconclusive" in capsys.readouterr().out.splitlines()[-1]
    assert json.loads(out.read_text())["bench"] == "serve-probe"


def test_a_sequential_server_blocks_the_short_request_behind_the_long_prompt(fake):
    srv = fake(token_s=0.0, prefill_per_word=0.004, sequential=True)    # 200 words: 0.8 s more
    probe = bench_serve(srv.url, clients=(), long_prompt=200, probe_delay=0.1, probe_repeats=2)["probe"]
    assert probe["verdicts"] == ["blocked"] * 2 and probe["long_busy"] == [False, False]
    assert probe["long_prompt_tokens"] == 200
    short_idle = PREFILL_BASE + 0.004 * 6               # "What is the capital of France?": 6 words
    assert probe["idle_ttft_s"] >= short_idle
    # it waits for the rest of the long prefill (0.85 s - 0.1 s), then has its own
    assert probe["short_ttft_min_s"] >= 0.7
    assert probe["short_ttft_min_s"] <= probe["short_ttft_s"] <= probe["short_ttft_max_s"]
    assert probe["ratio"] == pytest.approx(probe["short_ttft_s"] / probe["idle_ttft_s"])
    assert probe["ratio"] > 3                           # about 11 when idle: the short one waited


def test_a_server_that_interleaves_answers_the_short_request_first(fake):
    srv = fake(token_s=0.0, prefill_per_word=0.004)
    probe = bench_serve(srv.url, clients=(), long_prompt=200, probe_delay=0.1, probe_repeats=1)["probe"]
    assert probe["verdicts"] == ["overlapped"] and probe["long_busy"] == [True]
    assert probe["ratio"] < 4                           # about 1 when idle, 11 had it waited


def test_no_server_is_one_clear_error_naming_the_url():
    port = free_port()                                  # a port nobody listens on
    with pytest.raises(ConfigError, match=rf"no server at http://127.0.0.1:{port} .*serve"):
        bench_serve(f"http://127.0.0.1:{port}/v1", requests=1, clients=(1,))


def test_only_a_server_on_this_machine_is_loaded():
    with pytest.raises(ConfigError, match="on this machine"):
        bench_serve("http://example.com:8000", requests=1, clients=(1,))


def test_failed_requests_are_counted_apart_from_the_figures():
    good = Reply(sent=0.0, first_token=0.5, done=2.0, prompt_tokens=7, completion_tokens=4)
    refused = Reply(sent=0.0, status=429, error="the queue is full")
    r = level_record(1, 4.0, [good, refused], sequential_wall_s=None)
    assert (r["ok"], r["failed"], r["completion_tokens"]) == (1, 1, 4)
    assert r["first_error"] == "HTTP 429: the queue is full"
    assert r["p50_s"] == r["p95_s"] == 2.0 and r["ttft_p50_s"] == 0.5 and r["req_per_min"] == 15.0


def test_events_give_the_first_text_the_usage_and_in_stream_errors():
    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    lines = [b'data: {"choices": [{"delta": {"role": "assistant", "content": ""}}]}\n', b"\n",
             b'data: {"choices": [{"delta": {}, "finish_reason": "length"}], "usage": ' + json.dumps(usage).encode()
             + b"}\n", b"data: [DONE]\n"]
    r = Reply(sent=0.0)
    read_events(lines, r)                                # no text at all: the finish counts as the first token
    assert r.ok and r.first_token is not None and (r.prompt_tokens, r.completion_tokens) == (3, 1)
    broken = Reply(sent=0.0)
    read_events([b'data: {"error": {"message": "engine failed"}}\n'], broken)
    assert not broken.ok and broken.error == "engine failed"
    cut = Reply(sent=0.0)
    read_events([b'data: {"choices": [{"delta": {"content": "a"}}]}\n'], cut)
    assert not cut.ok and "before data: [DONE]" in cut.error


@pytest.mark.parametrize("busy_changes_text", [False, True])
def test_distinct_prompts_alone_then_together_tell_whether_each_answer_is_its_solo_one(fake, tmp_path, busy_changes_text):
    from tpi_mpi.bench.serve import server_fields
    from tpi_mpi.bench.serve_client import Server
    from tpi_mpi.bench.serve_solo import bench_distinct, distinct_prompts

    prompts = distinct_prompts(3, 30)
    assert len(set(prompts)) == 3 and all(len(p.split()) == 32 for p in prompts)      # "Request i:" + 30 words
    srv = fake(token_s=0.15, busy_changes_text=busy_changes_text)
    server = Server(srv.url)
    out = tmp_path / "distinct.jsonl"
    r = bench_distinct(server, server_fields(server)[1], 3, 40, 4, str(out))
    # the fake counts a token a word and 5 more: 107 for the probe's 102 words, so 38 words (and
    # "Request i:") for 40 tokens
    assert r["failed"] == 0 and r["prompt_tokens"] == 40 + TEMPLATE_TOKENS and r["completion_tokens"] == [4] * 3
    assert r["most_running"] >= 2                      # /health saw them side by side
    assert r["equal"] == (0 if busy_changes_text else 3)
    assert r["together_wall_s"] < r["solo_wall_s"]
    assert json.loads(out.read_text())["bench"] == "serve_distinct"
