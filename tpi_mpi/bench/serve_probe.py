"""`bench serve --long-prompt N`: how long a short request waits behind a long prompt's prefill.

(a) The short request's time to first token on the idle server, median of 3. (b) A request whose
prompt is about N tokens (max_tokens small), then, after --probe-delay seconds, the short request:
its time to first token under that load, and the ratio to (a). A server that prefills one request at
a time answers the short one only after the long prefill; one that interleaves answers it while the
long prefill still runs. Each trial's verdict:
- "overlapped": the short request had its first token before the long one (the server interleaved);
- "blocked": it was sent while the long prefill ran and had to wait for it;
- "inconclusive": the long request had its first token before the short one was even sent, so there
  was nothing to wait behind (raise N or lower --probe-delay).
Medians are over the conclusive trials.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .record import append_json, host_fields, print_row
from .serve_client import Reply, Server

SHORT_QUESTION = "What is the capital of France?"
# plain, common words: about one token each in the usual BPE vocabularies, so N words ~ N tokens
WORDS = "apple river stone cloud green table window music paper garden".split()

PROBE_COLUMNS = [("trial", 6, "{}"), ("long_tokens", 11, "{}"), ("long_ttft_s", 11, "{:.2f}"),
                 ("idle_ttft_s", 11, "{:.3f}"), ("short_ttft_s", 12, "{:.3f}"), ("ratio", 7, "{:.1f}"),
                 ("long_busy", 9, "{}"), ("verdict", 12, "{}")]


def word_prompt(n_words: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n_words))


@dataclass
class Trial:
    long: Reply
    short: Reply

    @property
    def long_busy(self) -> bool:
        """The long prompt was still in progress when the short request had its first token."""
        return self.short.first_token < self.long.first_token

    @property
    def verdict(self) -> str:
        if self.long.first_token <= self.short.sent:
            return "inconclusive"
        return "overlapped" if self.long_busy else "blocked"


def run_trial(server: Server, long_body: dict, short_body: dict, delay: float) -> Trial:
    """The long request from a thread, the short one `delay` seconds later from this one."""
    got: dict[str, Reply] = {}
    thread = threading.Thread(target=lambda: got.update(long=server.stream(long_body)), daemon=True)
    thread.start()
    time.sleep(delay)
    short = server.stream(short_body)
    thread.join()
    for name, reply in (("long", got["long"]), ("short", short)):
        if not reply.ok:
            raise ConfigError(f"the probe's {name} request failed (HTTP {reply.status}): {reply.error}")
    return Trial(got["long"], short)


def fit_long_prompt(server: Server, model: str, n_tokens: int, max_tokens: int) -> str:
    """N words, rescaled once by what the server counts (template and tokenizer vary); this first
    long request also warms the server up for long prompts."""
    reply = server.stream(server.chat_body(model, word_prompt(n_tokens), max_tokens))
    if not reply.ok:
        raise ConfigError(f"--long-prompt {n_tokens}: the server refused it (HTTP {reply.status}): {reply.error}")
    if not reply.prompt_tokens or abs(reply.prompt_tokens - n_tokens) <= 0.02 * n_tokens:
        return word_prompt(n_tokens)
    return word_prompt(max(1, round(n_tokens * n_tokens / reply.prompt_tokens)))


def idle_ttft(server: Server, short_body: dict, runs: int = 3) -> list[float]:
    replies = [server.stream(short_body) for _ in range(runs + 1)][1:]     # the first warms up
    bad = [r for r in replies if not r.ok]
    if bad:
        raise ConfigError(f"the probe's short request failed (HTTP {bad[0].status}): {bad[0].error}")
    return [r.ttft_s for r in replies]


def bench_probe(server: Server, base: dict, n_tokens: int, delay: float, repeats: int, max_tokens: int,
                out: str | None) -> dict:
    """Print one row per trial and a summary line; append one JSON record for the whole probe."""
    if n_tokens < 1 or repeats < 1 or delay < 0:
        raise ConfigError(f"--long-prompt {n_tokens} --probe-repeats {repeats} --probe-delay {delay}: "
                          "the first two must be at least 1, the delay not negative")
    short_body = server.chat_body(base["model"], SHORT_QUESTION, max_tokens)
    idle = idle_ttft(server, short_body)
    idle_s = float(np.median(idle))
    long_body = server.chat_body(base["model"], fit_long_prompt(server, base["model"], n_tokens, max_tokens),
                                 max_tokens)
    trials = []
    for i in range(repeats):
        t = run_trial(server, long_body, short_body, delay)
        trials.append(t)
        print_row(PROBE_COLUMNS, {"trial": i + 1, "long_tokens": t.long.prompt_tokens, "long_ttft_s": t.long.ttft_s,
                                    "idle_ttft_s": idle_s, "short_ttft_s": t.short.ttft_s,
                                    "ratio": t.short.ttft_s / idle_s, "long_busy": "yes" if t.long_busy else "no",
                                    "verdict": t.verdict}, header=i == 0)
    record = {"bench": "serve-probe", **base, **probe_figures(trials, idle), "long_prompt_target": n_tokens,
              "short_prompt": SHORT_QUESTION, "short_prompt_tokens": trials[0].short.prompt_tokens,
              "max_tokens": max_tokens, "delay_s": delay, "repeats": repeats, **host_fields()}
    print(probe_summary(record), flush=True)
    append_json(out, record)
    return record


def probe_figures(trials: list[Trial], idle: list[float]) -> dict:
    """Medians and spread over the conclusive trials; every trial's figures as lists."""
    idle_s = float(np.median(idle))
    good = [t for t in trials if t.verdict != "inconclusive"]
    short = [t.short.ttft_s for t in good]
    verdicts = [t.verdict for t in trials]
    return {"idle_ttft_s": idle_s, "idle_ttft_runs": idle,
            "long_prompt_tokens": int(np.median([t.long.prompt_tokens for t in trials])),
            "long_ttft_s": float(np.median([t.long.ttft_s for t in trials])),
            "short_ttft_s": float(np.median(short)) if good else None,
            "short_ttft_min_s": min(short) if good else None, "short_ttft_max_s": max(short) if good else None,
            "ratio": float(np.median(short)) / idle_s if good else None,
            "conclusive": len(good), "inconclusive": len(trials) - len(good),
            "verdict": majority([t.verdict for t in good]) if good else "inconclusive",
            "verdicts": verdicts, "long_busy": [t.long_busy for t in trials],
            "short_ttft_runs": [t.short.ttft_s for t in trials], "long_ttft_runs": [t.long.ttft_s for t in trials]}


def majority(words: list[str]) -> str:
    return max(sorted(set(words)), key=words.count)


def probe_summary(r: dict) -> str:
    if not r["conclusive"]:
        return (f"inconclusive: in all {r['repeats']} trials the long prompt ({r['long_prompt_tokens']} tokens) had "
                f"its first token before the short request was sent: raise --long-prompt or lower --probe-delay")
    return (f"short request's TTFT behind a {r['long_prompt_tokens']}-token prompt: median {r['short_ttft_s']:.3f} s "
            f"(range {r['short_ttft_min_s']:.3f}-{r['short_ttft_max_s']:.3f} over {r['conclusive']} conclusive "
            f"trials of {r['repeats']}), idle {r['idle_ttft_s']:.3f} s: x{r['ratio']:.1f}; verdict {r['verdict']}")
