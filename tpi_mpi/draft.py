"""Speculative decoding: a draft proposes the next few tokens of a sequence, the cluster checks them
all in one step (batch.Want.CHECK: one forward of k + 1 positions, one set of allreduces), and the
sequence keeps those the target model agrees with, plus the target's own next token. On links where
a step costs its synchronisation rounds more than its compute, each accepted token is a step saved.

`NgramDraft` is prompt lookup (llama.cpp's --lookup, vLLM's n-gram speculator): the tokens that
followed the latest earlier occurrence of the sequence's last 2-4 tokens, in its prompt or its
answer so far. It costs nothing to run and pays where an answer repeats its input (editing,
summarising, code). `Speculation` wraps a draft for one sequence and sizes its proposals by how
many were accepted, pausing a draft that keeps missing, so that a useless one costs little.

`accept` is the rule that makes the answer the target's own: greedy, the target's argmax at each
position (the same tokens as without a draft, the rows being computed as decode steps are); sampled,
the standard accept/reject rule (Leviathan et al., 2023) for a proposal that is a single token,
which keeps the target's distribution exactly.
"""

from __future__ import annotations

import time

import numpy as np

from .sampling import SamplingConfig, distribution, sample

K_MAX = 8           # tokens proposed at most per check
N_MAX, N_MIN = 4, 2  # n-gram lengths looked up, longest first
PAUSE_MAX = 64      # decode steps a draft that keeps missing sits out, at most


class NgramDraft:
    """Prompt lookup over one sequence's tokens, kept as an index updated token by token."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.seen: list[dict[tuple[int, ...], int]] = [{} for _ in range(N_MAX + 1)]   # n-gram -> its last end
        self.earlier: list[int | None] = [None] * (N_MAX + 1)    # where the current tail of n tokens ended before

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.tokens.append(t)
            end = len(self.tokens) - 1
            for n in range(N_MIN, N_MAX + 1):
                if end + 1 >= n:
                    key = tuple(self.tokens[end + 1 - n:])
                    self.earlier[n] = self.seen[n].get(key)
                    self.seen[n][key] = end

    def close(self) -> None:
        pass

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the last tokens where they occurred before (longest match first)."""
        for n in range(N_MAX, N_MIN - 1, -1):
            end = self.earlier[n]
            if end is not None:
                return self.tokens[end + 1:end + 1 + k]
        return []


class Speculation:
    """One sequence's draft and how many tokens to ask of it: the k that gives the most tokens per
    second, from what it has measured. Each proposed token is accepted with a rate `rate` (its
    recent share, prior one half), so a check of k gives (1 - rate^(k+1)) / (1 - rate) tokens on
    average; it costs a plain step, plus `row_cost` of one for each row checked beside the first,
    plus the draft's own time for k tokens. Where no k beats a plain step, the draft sits out 1, 2,
    4 ... PAUSE_MAX steps, then is tried again with one token."""

    DECAY = 0.8          # weight of the past in the running figures

    def __init__(self, draft, tokens: list[int]) -> None:
        """`draft`: an NgramDraft or a draft_model.ModelDraft, told the sequence's tokens as they come."""
        self.draft = draft
        self.draft.extend(tokens)
        self.hits, self.tries = 1.0, 2.0            # accepted of proposed tokens looked at, decayed
        self.step_s: float | None = None            # a plain decode step's seconds
        self.row_cost, self.draft_s = 0.05, 0.0     # a checked row beside the first (share of a step); a drafted token (s)
        self.pause, self.idle, self.probe = 0, 0, False
        self.proposed = self.accepted = self.checks = 0

    def best_k(self, limit: int) -> int:
        """The k (0: none) with the most tokens per unit of time, at most `limit`."""
        if self.probe:
            return min(1, limit)
        rate = min(self.hits / self.tries, 0.99)
        draft = self.draft_s / self.step_s if self.step_s else 0.0
        best, value = 0, 1.0                        # a plain step: one token for one step's time
        for k in range(1, min(K_MAX, limit) + 1):
            v = (1 - rate ** (k + 1)) / (1 - rate) / (1 + k * (self.row_cost + draft))
            if v > value:
                best, value = k, v
        return best

    def propose(self, limit: int) -> list[int]:
        """The tokens to check after the last one (none: a plain decode step); at most `limit`."""
        if self.idle:
            self.idle -= 1
            self.probe = not self.idle               # after a pause: one token, to see again
            return []
        k = self.best_k(limit)
        if k == 0:
            if limit > 0:
                self.pause = min(PAUSE_MAX, max(1, 2 * self.pause))
                self.idle = self.pause
            return []
        t = time.perf_counter()
        proposal = self.draft.propose(k)
        if proposal:
            self.draft_s = self._mean(self.draft_s, (time.perf_counter() - t) / len(proposal))
        return proposal

    def plain(self, step_s: float) -> None:
        """After a plain decode step of `step_s` seconds."""
        self.step_s = step_s if self.step_s is None else self._mean(self.step_s, step_s)

    def checked(self, proposed: int, hits: int, step_s: float | None = None) -> None:
        """After a check of `proposed` tokens of which the first `hits` were accepted, in `step_s`."""
        self.proposed, self.accepted, self.checks = self.proposed + proposed, self.accepted + hits, self.checks + 1
        looked = hits + (hits < proposed)            # the tokens whose fate was seen: the accepted and the first miss
        self.hits = self.DECAY * self.hits + hits
        self.tries = self.DECAY * self.tries + looked
        self.probe = False
        if hits:
            self.pause = 0
        if step_s and self.step_s:
            self.row_cost = self._mean(self.row_cost, max(0.0, (step_s / self.step_s - 1) / proposed))

    def _mean(self, old: float, new: float) -> float:
        return self.DECAY * old + (1 - self.DECAY) * new

    def stats(self) -> dict:
        return {"proposed": self.proposed, "accepted": self.accepted, "checks": self.checks}


def accept(logits: np.ndarray, proposal: list[int], cfg: SamplingConfig, rng: np.random.Generator) -> list[int]:
    """The tokens a check gives: the accepted prefix of `proposal`, then one of the target's own (a
    correction where it disagreed, else the token after the last proposed). `logits` (len(proposal) + 1,
    vocab): row i is the target's next-token logits after the last token and proposal[:i]."""
    out = []
    for i, d in enumerate(proposal):
        if cfg.temperature == 0:
            t = int(np.argmax(logits[i]))
            out.append(t)
            if t != d:
                return out
            continue
        ids, p = distribution(logits[i], cfg)
        at = np.flatnonzero(ids == d)
        pd = float(p[at[0]]) if len(at) else 0.0
        if rng.random() < pd:                  # accepted with the target's probability of the proposal
            out.append(d)
            continue
        if len(at):                            # rejected: the target's distribution without the proposal
            p = p.copy()
            p[at[0]] = 0.0
            p /= p.sum()
        out.append(int(ids[rng.choice(p.size, p=p)]))
        return out
    out.append(sample(logits[len(proposal)], cfg, rng))
    return out
