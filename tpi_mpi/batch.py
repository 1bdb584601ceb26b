"""What one forward step computes: a few sequences, each with its own slot, position, new tokens and
blocks of the KV pool (kv.py), their rows of hidden states laid one after another. Pure
bookkeeping, no torch modules.

A sequence's numbers must not depend on what else is in the step (a greedy answer is the same
alone or among others), and neither BLAS nor torch's attention are batch invariant: the rows of
a (T, in) @ W^T differ in their last bits with T. So a step is computed in **pieces** whose shapes
belong to one sequence alone:
- a prompt is cut into pieces of PIECE tokens counted from where its prefill began, each multiplied
  and attended on its own, so it gives the same bits however the scheduler spread it over steps;
- a piece of one row (a decode token) goes to a row kernel whose every row is computed as if alone
  (parallel.linear_rows), so all the one-row pieces of a step share one pass over each weight.
Otherwise (generate, chat: one sequence) a piece is a sequence's whole part of the step and every
row goes through one plain matrix product: nothing to be invariant to, and it is faster.

A speculative step (Want.CHECK: the sequence's last token and the tokens a draft proposes after it)
must give each row the bits a decode step of that token alone would, so that a greedy answer is the
same with a draft or without: its rows are one-row pieces (attention row by row, as decode steps),
and `Rows.alone` asks linear layers for products whose rows do not depend on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property

import numpy as np
import torch

from .config import PIECE
from .kv import Place, Runs


class Want(IntEnum):
    """Which logits a sequence wants from the step."""
    NONE = 0     # a prompt chunk that does not end the prompt
    LAST = 1     # the next token's
    ALL = 2      # every position's (perplexity, tests)
    CHECK = 3    # every position's, each row computed as a decode step (a draft's tokens, checked)


@dataclass(frozen=True)
class SeqStep:
    """One sequence's part of a step: `n_tokens` new tokens at positions pos.. of sequence `slot`, whose
    positions lie in the KV pool's blocks `runs` (rank 0's BlockPool fills them in)."""
    slot: int
    pos: int
    n_tokens: int
    want: Want = Want.LAST
    runs: Runs = ()

    FIELDS = 5      # int64 values per sequence on the wire (slot, pos, n_tokens, want, runs), then 2 per run


@dataclass(frozen=True)
class Rows:
    """How a linear layer computes a step's rows: all at once, or piece by piece with the one-row
    pieces through the batch-invariant row kernel (`invariant`); `alone`: all at once, but each row
    as a product of that row alone would give it (a draft's rows, checked)."""
    pieces: list[Piece]
    invariant: bool
    alone: bool = False

    def subset(self, index: torch.Tensor) -> Rows:
        """The rows `index` (ascending) as rows of their own, each piece keeping those of its rows
        (an expert's tokens): what a piece keeps depends on its own tokens only."""
        pieces = []
        for p in self.pieces:
            lo, hi = (int(i) for i in torch.searchsorted(index, torch.tensor([p.start, p.stop])))
            if hi > lo:
                pieces.append(Piece(p.seq, lo, hi, p.pos))
        return Rows(pieces, self.invariant, self.alone)


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of the step, one sequence's, at positions pos..; `one_row` pieces share a
    row kernel with the step's other one-row pieces."""
    seq: int
    start: int
    stop: int
    pos: int

    @property
    def one_row(self) -> bool:
        return self.stop - self.start == 1


class Batch:
    """The step's sequences and how their rows are computed: pieces, positions and logit rows."""

    def __init__(self, seqs: list[SeqStep], invariant: bool = False) -> None:
        if not seqs:
            raise ValueError("a step needs at least one sequence")
        slots = [s.slot for s in seqs]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one step: {slots}")
        self.seqs, self.invariant = seqs, invariant
        size = PIECE if invariant else max(s.n_tokens for s in seqs)
        pieces: list[Piece] = []
        starts = np.cumsum([0] + [s.n_tokens for s in seqs])
        self.n_rows = int(starts[-1])
        for i, s in enumerate(seqs):
            if s.n_tokens < 1:
                raise ValueError(f"slot {s.slot}: a step needs at least one token per sequence")
            step = 1 if s.want == Want.CHECK else size
            for a in range(0, s.n_tokens, step):
                b = min(a + step, s.n_tokens)
                pieces.append(Piece(i, int(starts[i]) + a, int(starts[i]) + b, s.pos + a))
        alone = any(s.want == Want.CHECK for s in seqs)
        self.rows = Rows(pieces, invariant, alone)
        self.spans = [(int(starts[i]), int(starts[i + 1])) for i in range(len(seqs))]
        self.positions = torch.cat([torch.arange(s.pos, s.pos + s.n_tokens) for s in seqs])
        self.places = [Place(s.runs, s.pos + s.n_tokens) for s in seqs]
        # rows the head computes: every row of ALL, the last of LAST, as pieces of their own
        head_rows, head_pieces, self.logit_spans = [], [], []
        for i, s in enumerate(seqs):
            a, b = self.spans[i]
            every = s.want in (Want.ALL, Want.CHECK)
            rows = range(a, b) if every else range(b - 1, b) if s.want == Want.LAST else range(0)
            at = len(head_rows)
            head_rows.extend(rows)
            self.logit_spans.append((at, len(head_rows)))
            step = 1 if s.want == Want.CHECK else size
            for p in range(0, len(rows), step):
                head_pieces.append(Piece(i, at + p, at + min(p + step, len(rows)), s.pos))
        self.head_rows = torch.tensor(head_rows, dtype=torch.long)
        self.head = Rows(head_pieces, invariant, alone)

    @property
    def decode_rows(self) -> bool:
        """Every row a one-row piece (decode tokens, a draft's checked tokens): rowops.py then computes
        each half-layer in one call."""
        return len(self.rows.pieces) == self.n_rows

    @cached_property
    def row_places(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's position, its sequence's pool start, and the address of its sequence's pool index
        (0 when its blocks are one run): int64, for the compiled attention (rowops.py). The Places the
        addresses point into live as long as this Batch."""
        seq_of = [i for i, s in enumerate(self.seqs) for _ in range(s.n_tokens)]
        start = [self.places[i].start for i in seq_of]
        index = [0 if self.places[i].index is None else self.places[i].index.data_ptr() for i in seq_of]
        return self.positions.contiguous(), torch.tensor(start, dtype=torch.int64), torch.tensor(index, dtype=torch.int64)

    @property
    def n_runs(self) -> int:
        return sum(len(s.runs) for s in self.seqs)

    def pack(self) -> np.ndarray:
        """The sequence table for the wire, int64: FIELDS per sequence, then every sequence's runs."""
        rows = [[s.slot, s.pos, s.n_tokens, int(s.want), len(s.runs)] for s in self.seqs]
        runs = [x for s in self.seqs for run in s.runs for x in run]
        return np.array([x for row in rows for x in row] + runs, dtype=np.int64)

    @classmethod
    def unpack(cls, table: np.ndarray, n_seqs: int, invariant: bool = False) -> Batch:
        rows = table[:n_seqs * SeqStep.FIELDS].reshape(n_seqs, SeqStep.FIELDS).tolist()
        runs = table[n_seqs * SeqStep.FIELDS:].reshape(-1, 2).tolist()
        seqs, at = [], 0
        for slot, pos, n_tokens, want, n_runs in rows:
            seqs.append(SeqStep(slot, pos, n_tokens, Want(want), tuple(map(tuple, runs[at:at + n_runs]))))
            at += n_runs
        return cls(seqs, invariant)


def split_rows(x: torch.Tensor, pieces: list[Piece], one: callable, many: callable) -> torch.Tensor:
    """`one` over the one-row pieces together and `many` over each longer piece: the rows of
    x (T, in) computed piece by piece into one (T, out) result."""
    singles = [p.start for p in pieces if p.one_row]
    if len(singles) == len(pieces) == x.shape[0]:
        return one(x)                               # a decode step: every row alone, in one call
    parts = {}
    if singles:
        idx = torch.tensor(singles)
        for r, y in zip(singles, one(x.index_select(0, idx))):
            parts[r] = y[None]
    for p in pieces:
        if not p.one_row:
            parts[p.start] = many(x[p.start:p.stop])
    return torch.cat([parts[r] for r in sorted(parts)])
