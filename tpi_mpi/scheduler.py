"""The scheduler on rank 0, continuous batching: requests join and leave between steps. Every
command decodes through it (serve's loop with up to --max-batch requests; generate, chat and bench
as a batch of one or a few, generate.py).

Each admitted request holds one of `max_batch` slots and, in the KV pool (kv.py), the blocks of what
it can use: its prompt and max_tokens new tokens, at most the context. A request is admitted only
when the pool has those blocks free, so no sequence ever runs out of them and none is preempted:
an answer is never recomputed, and never differs from its solo run for it. Every step carries
one token of each sequence that is decoding and, as the prefill budget allows, prompt tokens:
- prompts that can be finished within FINISHING chunks go first, shortest first, so a short
  request arriving while a long prompt is being read waits for at most one step (of one chunk),
  and a burst of short requests is read in few steps;
- otherwise the prompt closest to its end advances by one chunk (`chunk` tokens, a multiple of
  batch.PIECE, so its pieces, and so its numbers, do not depend on how it was spread over steps).
Each sequence samples with its own parameters and generator and stops on its own (EOS, stop
string, max_tokens, the context, a client gone); its slot and blocks are free for the next step.
With a draft (draft.py), a decoding sequence's part of a step is its last token and the tokens the
draft proposes after it, checked at once; it takes those the target agrees with, and one more.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .batch import PIECE, SeqStep, Want
from .draft import Speculation, accept
from .jobs import ApiError, Job
from .sampling import sample, sample_draws
from .text import StopFilter, Streamer

FINISHING = 4        # prompts that end in this step may take this many chunks together


@dataclass(eq=False)
class Sequence:
    """A request holding KV slot `slot`: its prompt, what it has generated, its sampler and text."""
    job: Job
    slot: int
    streamer: Streamer
    stop: StopFilter
    rng: np.random.Generator
    fed: int = 0                                 # tokens in the slot's KV cache
    generated: list[int] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    reason: str | None = None                    # why it ended: "stop", "length", "gone"

    prefill: list[int] = field(default_factory=list)   # read before sampling: the prompt (+ resumed tokens)
    first_logits: object = None                  # the logits its first new token was sampled from (a tensor)
    prompt_logits: list = field(default_factory=list)  # every prompt position's, when the job keeps them
    speculation: Speculation | None = None       # its draft, with --draft
    proposal: list[int] = field(default_factory=list)  # the draft's tokens in the step under way

    @property
    def prompt_left(self) -> int:
        return max(0, len(self.prefill) - self.fed)

    def next_input(self, budget: int, room: int) -> tuple[SeqStep, list[int]]:
        """Its part of the next step: up to `budget` prompt tokens, or the last token it generated and
        what its draft proposes after it (`room`: KV positions it holds beyond that token)."""
        if self.prompt_left:
            n = min(self.prompt_left, budget)
            want = Want.ALL if self.job.keep_prompt_logits else Want.LAST if n == self.prompt_left else Want.NONE
            return SeqStep(self.slot, self.fed, n, want), self.prefill[self.fed:self.fed + n]
        left = self.job.max_tokens - len(self.generated)        # a check gives at most len(proposal) + 1
        self.proposal = self.speculation.propose(min(room, left - 1)) if self.speculation else []
        if self.proposal:
            return SeqStep(self.slot, self.fed, 1 + len(self.proposal), Want.CHECK), self.generated[-1:] + self.proposal
        return SeqStep(self.slot, self.fed, 1), self.generated[-1:]


def plan_step(seqs: list[Sequence], chunk: int) -> list[tuple[Sequence, int]]:
    """Which sequences go into the next step and with how many tokens: every decoding one with one,
    then prompts as described in the module docstring (`chunk` prompt tokens per step)."""
    assert chunk % PIECE == 0, chunk
    plan = [(s, 1) for s in seqs if not s.prompt_left]
    waiting = sorted((s for s in seqs if s.prompt_left), key=lambda s: s.prompt_left)
    budget, finishing = FINISHING * chunk, []
    for s in waiting:
        if s.prompt_left <= budget:
            finishing.append((s, s.prompt_left))
            budget -= s.prompt_left
    if finishing:
        return plan + finishing
    if waiting:
        plan.append((waiting[0], chunk))         # a long prompt: one chunk on, at a PIECE boundary
    return plan


class Batcher:
    """The sequences in flight and the step that advances them all (rank 0's main thread)."""

    def __init__(self, root, max_batch: int, chunk: int, context: int, eos: set[int], release: bool = True,
                 draft=None) -> None:
        """`release`: an ended sequence gives its KV blocks back (serve). Without it a slot keeps them
        for the next request on it: a chat's next turn starts after the cached conversation.
        `draft(slot)`: a new draft for the sequence in `slot`, to decode speculatively (draft.py); None
        not to."""
        self.root, self.max_batch, self.chunk, self.context, self.eos = root, max_batch, chunk, context, eos
        self.pool, self.release, self.draft = root.session.kv_pool, release, draft
        self.running: list[Sequence] = []

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    def positions(self, job: Job) -> int:
        """The KV positions a job can use: its prompt and its new tokens, at most the context."""
        return min(self.context, len(job.prompt_ids) + job.max_tokens)

    def _free_slot(self) -> int:
        used = {s.slot for s in self.running}
        return next(i for i in range(self.max_batch) if i not in used)

    def fits(self, job: Job) -> bool:
        """Whether `job` can be admitted now: a free slot, and the pool's blocks for what it can use."""
        return bool(self.free_slots) and self.pool.can_hold(self._free_slot(), self.positions(job))

    def admit(self, job: Job) -> Sequence:
        slot = self._free_slot()
        self.pool.hold(slot, self.positions(job))        # KVPoolFull if it does not fit: ask fits() first
        seq = Sequence(job, slot, Streamer(self.root.session.codec), StopFilter(job.stops),
                       job.rng or np.random.default_rng(job.sampling.seed), fed=job.cached,
                       prefill=job.prompt_ids + job.generated)
        if self.draft:
            seq.speculation = Speculation(self.draft(slot), job.prompt_ids)
        # a resumed request: its sampler, text and stop state as they were after the tokens it has had;
        # their text is not sent again (should they have ended it, the end is sent now)
        for token in job.generated:
            if not seq.reason:
                self._take(seq, token, resumed=True)
        self.running.append(seq)
        return seq

    def step(self) -> list[Sequence]:
        """One forward step for the running sequences; returns those that ended in it."""
        for s in self.running:
            if s.job.cancelled:
                s.reason = "gone"
        plan = plan_step([s for s in self.running if not s.reason], self.chunk)
        if plan:
            parts = [s.next_input(n, self.positions(s.job) - s.fed - 1) for s, n in plan]
            t0 = time.perf_counter()
            logits = self.root.step([p[0] for p in parts], [t for p in parts for t in p[1]])
            step_s = time.perf_counter() - t0
            for (s, _), (seq_step, _), out in zip(plan, parts, logits):
                if seq_step.want == Want.CHECK:          # the last token and a draft: what the target agrees with
                    tokens = accept(out.numpy(), s.proposal, s.job.sampling, s.rng)
                    s.fed += len(tokens)                 # the last token and the accepted proposal are cached
                    s.speculation.checked(len(s.proposal), len(tokens) - 1, step_s)
                    for token in tokens:
                        if not s.reason:
                            self._take(s, token)
                    continue
                if s.speculation and s.generated:        # a plain decode step: what a check is weighed against
                    s.speculation.plain(step_s)
                s.fed += seq_step.n_tokens
                if out is None:
                    continue
                if seq_step.want == Want.ALL:
                    s.prompt_logits.append(out)
                if not s.prompt_left:                    # its prompt is read: the next token
                    if not s.generated:
                        s.first_logits = out[-1]
                    self._take(s, sample(out[-1].numpy(), s.job.sampling, s.rng))
        ended = [s for s in self.running if s.reason]
        self.running = [s for s in self.running if not s.reason]
        for s in ended:
            if self.release:
                self.pool.release(s.slot)
            if s.speculation:
                s.speculation.draft.close()
        return ended

    def _take(self, s: Sequence, token: int, resumed: bool = False) -> None:
        """A new token for `s`: its text out to the client, and whether it ends the sequence."""
        if resumed:
            sample_draws(s.rng, s.job.sampling, 1)       # as the sampler did for it
        s.generated.append(token)
        if s.speculation:
            s.speculation.draft.extend([token])
        job = s.job
        text = s.stop.push(s.streamer.push(token))
        if not resumed:
            job.token(token, text)
        if s.stop.stopped or (token in self.eos and not job.ignore_eos):
            s.reason = "stop"
        elif len(s.generated) >= job.max_tokens or len(job.prompt_ids) + len(s.generated) >= self.context:
            s.reason = "length"
        elif job.cancelled:
            s.reason = "gone"
        if s.reason and s.reason != "gone":
            if rest := s.stop.push(s.streamer.finish()) + s.stop.finish():
                job.send("text", rest)
            n_prompt, n_new = len(job.prompt_ids), len(s.generated)
            job.send("done", {"finish_reason": s.reason, "usage": {
                "prompt_tokens": n_prompt, "completion_tokens": n_new, "total_tokens": n_prompt + n_new}})

    def fail(self, error: ApiError) -> None:
        """The engine failed: every running request gets `error`."""
        for s in self.running:
            s.job.send("error", error)
            self.pool.release(s.slot)
            if s.speculation:
                s.speculation.draft.close()
        self.running = []
