"""Requests of this process (generate, chat, bench generate) on rank 0: they go through the scheduler
that serve runs (scheduler.Batcher), one request as a batch of one, so that every command decodes,
samples, stops and turns tokens into text by the same code.

Each step goes through steps.py's `Root.step`, which the other ranks follow; sampling and the text
never leave rank 0.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .scheduler import FINISHING, Batcher, Sequence
from .config import PIECE
from .errors import ConfigError
from .jobs import Job
from .sampling import SamplingConfig
from .steps import Root


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)
    text: str = ""
    ttft_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    first_logits: np.ndarray | None = None     # (vocab,) the first new token is sampled from
    prompt_logits: np.ndarray | None = None    # (prompt_len, vocab) when asked for
    steps: int = 0                             # forward steps after the prompt (fewer than tokens with a draft)
    draft: dict | None = None                  # with --draft: tokens proposed and accepted, checks

    @property
    def s_per_token(self) -> float:
        return float(np.mean(self.step_s)) if self.step_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return 1 / self.s_per_token if self.s_per_token else 0.0


@dataclass(eq=False)
class LocalJob(Job):
    """A request of this process: its text goes to `on_text` as it grows; its tokens' times are kept."""
    on_text: Callable[[str], None] | None = None
    text: str = ""
    token_times: list[float] = field(default_factory=list)

    def token(self, token: int, text: str) -> None:
        self.token_times.append(time.perf_counter())
        super().token(token, text)

    def send(self, kind: str, value) -> None:
        if kind == "text":                   # "done" needs nothing here; "error" comes from serve's engine only
            self.text += value
            if self.on_text:
                self.on_text(value)


@dataclass
class Decoded:
    seqs: list[Sequence]        # in the jobs' order
    step_s: list[float]         # each step's seconds
    prefill_steps: int          # the first steps, until every prompt was read


def decode(root: Root, jobs: list[LocalJob], after_prefill=None) -> Decoded:
    """Run `jobs` together to their ends. Prompts are read in as few steps as the scheduler allows
    (one here); `after_prefill()` is called once every prompt has been read (benchmarks zero their
    counters then)."""
    s = root.session
    prompts = [len(j.prompt_ids) - j.cached for j in jobs]
    chunk = PIECE * math.ceil(max(max(prompts), math.ceil(sum(prompts) / FINISHING)) / PIECE)
    batcher = Batcher(root, len(jobs), chunk, s.context, set(s.model_config.eos_ids) | s.codec.stop_ids(), release=False,
                      draft=s.drafts)
    run = Decoded([batcher.admit(job) for job in jobs], [], 0)
    while batcher.running:
        t = time.perf_counter()
        batcher.step()
        run.step_s.append(time.perf_counter() - t)
        if not run.prefill_steps and all(not q.prompt_left for q in run.seqs):
            run.prefill_steps = len(run.step_s)
            if after_prefill:
                after_prefill()
    return run


CHAT_TEMPLATE_TOKENS = 256     # room for a chat template's own tokens (role markers, a default system prompt)


def positions_needed(prompt: str, max_new_tokens: int, chat: bool = False, system: str | None = None) -> int:
    """KV positions a `generate` run can use, known before the tokenizer is loaded: its prompt's
    tokens (at most two per UTF-8 byte, for byte-level BPE and SentencePiece alike, plus a few
    special ones; the template's with --chat) and its new tokens. The memory budget reserves these
    rather than --context's 4096."""
    n = 2 * len(prompt.encode()) + 8 + max_new_tokens
    return n + 2 * len((system or "").encode()) + CHAT_TEMPLATE_TOKENS if chat else n


def run_generation(root: Root, prompt_ids: list[int], sampling: SamplingConfig, max_new_tokens: int,
                   ignore_eos: bool = False, on_text=None, keep_prompt_logits: bool = False,
                   after_prefill=None, cached: int = 0, rng: np.random.Generator | None = None) -> Generation:
    """Prefill the prompt in one step, then decode token by token (rank 0).

    `cached`: how many leading prompt tokens the KV caches already hold (a chat's earlier turns);
    only the rest is prefilled. `on_text(delta)` receives the text as it grows.
    """
    m = root.session.model_config
    if not prompt_ids:
        raise ConfigError("the prompt is empty: give some text with --prompt")
    if len(prompt_ids) >= m.max_seq_len:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the model's context is {m.max_seq_len}: shorten it")
    if len(prompt_ids) >= root.session.context:
        raise ConfigError(f"the prompt has {len(prompt_ids)} tokens, the KV cache holds {root.session.context}: "
                          f"raise --context")
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    job = LocalJob("generate", list(prompt_ids), sampling, max_new_tokens, [], ignore_eos,
                   cached=0 if keep_prompt_logits else min(cached, len(prompt_ids) - 1),
                   keep_prompt_logits=keep_prompt_logits, rng=rng, on_text=on_text)
    t0 = time.perf_counter()
    run = decode(root, [job], after_prefill)
    seq = run.seqs[0]
    times = [t0, *job.token_times]
    g = Generation(job.prompt_ids, seq.generated, job.text, times[1] - t0, list(np.diff(times[1:])),
                   seq.first_logits.numpy().copy(), steps=len(run.step_s) - run.prefill_steps,
                   draft=seq.speculation.stats() if seq.speculation else None)
    if keep_prompt_logits:
        g.prompt_logits = np.concatenate([x.numpy() for x in seq.prompt_logits])
    return g


@dataclass
class BatchRun:
    """Greedy generation of several prompts together (bench generate --batch)."""
    prefill_s: float
    step_s: list[float]
    tokens: list[list[int]]


def run_batch(root: Root, prompts: list[list[int]], new_tokens: int, after_prefill=None) -> BatchRun:
    """Every prompt a request of its own, all admitted at once: the prompts read together, then one
    token of each per step, through the scheduler, the sampler and the detokenizer as serve runs them."""
    jobs = [LocalJob(f"batch-{i}", p, SamplingConfig(0.0), new_tokens, [], True) for i, p in enumerate(prompts)]
    run = decode(root, jobs, after_prefill)
    n = run.prefill_steps
    return BatchRun(sum(run.step_s[:n]), run.step_s[n:], [q.generated for q in run.seqs])
