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
    """One sequence's draft and how much of it to ask for: k grows while proposals are accepted,
    shrinks to what was, and a draft that misses outright sits out more and more steps."""

    def __init__(self, draft, tokens: list[int]) -> None:
        """`draft`: an NgramDraft or a draft_model.ModelDraft, told the sequence's tokens as they come."""
        self.draft = draft
        self.draft.extend(tokens)
        self.k, self.pause, self.idle = 2, 0, 0
        self.proposed = self.accepted = self.checks = 0

    def propose(self, limit: int) -> list[int]:
        """The tokens to check after the last one (none: a plain decode step); at most `limit`."""
        if self.idle:
            self.idle -= 1
            return []
        return self.draft.propose(min(self.k, limit))

    def checked(self, proposed: int, hits: int) -> None:
        """After a check of `proposed` tokens of which the first `hits` were accepted."""
        self.proposed, self.accepted, self.checks = self.proposed + proposed, self.accepted + hits, self.checks + 1
        if hits == proposed:
            self.k, self.pause = min(K_MAX, self.k * 2), 0
        elif hits:
            self.k, self.pause = max(1, hits + 1), 0
        else:
            self.k = 1
            self.pause = min(PAUSE_MAX, max(1, 2 * self.pause))
            self.idle = self.pause

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
