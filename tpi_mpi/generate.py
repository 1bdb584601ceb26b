"""Prefill and decode on rank 0: a prompt in, tokens out, streamed as text.

Each step goes through steps.py's `Root.forward`, which the other ranks follow; sampling and the
text never leave rank 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .errors import ConfigError
from .batch import SeqStep
from .sampling import SamplingConfig, sample
from .steps import Root
from .text import Streamer


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    first_logits: np.ndarray | None = None     # (vocab,) the first new token is sampled from
    prompt_logits: np.ndarray | None = None    # (prompt_len, vocab) when asked for

    @property
    def s_per_token(self) -> float:
        return float(np.mean(self.step_s)) if self.step_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1 / self.s_per_token if self.s_per_token else 0.0


def run_generation(root: Root, prompt_ids: list[int], sampling: SamplingConfig, max_new_tokens: int,
                   ignore_eos: bool = False, on_text=None, keep_prompt_logits: bool = False,
                   after_prefill=None, cached: int = 0, rng: np.random.Generator | None = None,
                   should_stop=None) -> Generation:
    """Prefill the prompt in one pass, then decode token by token (rank 0).

    `cached`: how many leading prompt tokens the KV caches already hold (a chat's earlier turns);
    only the rest is prefilled. `on_text(delta)` receives the text as it grows; `should_stop(text)`
    is asked after every token (a stop string, a client gone) and ends the generation when true.
    """
    s = root.s
    m = s.m
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give some text with --prompt")
    if len(prompt_ids) >= m.max_seq_len:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the model's context is {m.max_seq_len}: shorten it")
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    rng = rng or np.random.default_rng(sampling.seed)
    eos = set(m.eos_ids) | s.codec.stop_ids()
    streamer = Streamer(s.codec)
    g = Generation(list(prompt_ids))
    start = 0 if keep_prompt_logits else min(cached, len(prompt_ids) - 1)
    t0 = time.perf_counter()
    logits = root.forward(g.prompt_ids[start:], start, all_logits=keep_prompt_logits)
    g.first_logits = logits[-1].numpy().copy()
    if keep_prompt_logits:
        g.prompt_logits = logits.numpy().copy()
    token = sample(g.first_logits, sampling, rng)
    g.ttft_s = time.perf_counter() - t0
    if after_prefill:
        after_prefill()
    pos = len(g.prompt_ids)
    while True:
        g.generated_ids.append(token)
        delta = streamer.push(token)
        if on_text and delta:
            on_text(delta)
        done = (token in eos and not ignore_eos) or len(g.generated_ids) >= max_new_tokens \
            or pos + 1 >= m.max_seq_len or (should_stop is not None and should_stop(streamer.shown))
        if done:
            break
        t = time.perf_counter()
        logits = root.forward([token], pos)
        token = sample(logits[-1].numpy(), sampling, rng)
        g.step_s.append(time.perf_counter() - t)
        pos += 1
    rest = streamer.finish()
    if on_text and rest:
        on_text(rest)
    g.text = streamer.shown
    return g


@dataclass
class BatchRun:
    """Greedy generation of several prompts in lockstep (bench generate --batch)."""
    prefill_s: float
    step_s: list[float]
    tokens: list[list[int]]


def run_batch(root: Root, prompts: list[list[int]], new_tokens: int, after_prefill=None) -> BatchRun:
    """Prefill every prompt in one step (slot i for prompt i), then decode one token of each per step."""
    t0 = time.perf_counter()
    ids = [t for p in prompts for t in p]
    logits = root.step([SeqStep(i, 0, len(p)) for i, p in enumerate(prompts)], ids)
    run = BatchRun(time.perf_counter() - t0, [], [[int(x[-1].argmax())] for x in logits])
    if after_prefill:
        after_prefill()
    for k in range(new_tokens - 1):
        t = time.perf_counter()
        logits = root.step([SeqStep(i, len(p) + k, 1) for i, p in enumerate(prompts)], [g[-1] for g in run.tokens])
        for g, x in zip(run.tokens, logits):
            g.append(int(x[-1].argmax()))
        run.step_s.append(time.perf_counter() - t)
    return run
