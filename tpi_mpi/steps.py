"""The step protocol: how rank 0 drives the other ranks, one control header at a time.

Rank 0 (`Root`) owns the tokenizer, the embedding table, sampling and the text. Every step starts
with a `Header` broadcast as a small int64 array; a forward step then broadcasts, in one message,
the step's sequence table (batch.py: slot, position, tokens, logits wanted, KV blocks) and the
hidden states of all its rows. The other ranks (`follow`) only ever receive headers, that table and float hidden
states, run their slice of every layer, and send back partial sums and their share of the logits.

`run_steps(session, work)` is the one place where ranks branch: rank 0 runs `work(root)`, the
others follow until rank 0 releases them, failed or not.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, replace
from enum import IntEnum

import numpy as np
import torch

from .batch import Batch, SeqStep, Want
from .config import ALLREDUCE_MODES
from .errors import CommError, PeerFailed


class Cmd(IntEnum):
    FORWARD = 1          # run the model on the sequence table and hidden states that follow
    STOP = 2             # the run is over
    RESET_STATS = 3      # zero the timing counters (benchmarks, after warm-up)
    IDLE = 4             # the next step may be long in coming: wait for it without a time limit
    SET_ALLREDUCE = 5    # switch the allreduce algorithm (benchmarks compare them in one job)
    MEMORY = 6           # every rank sends rank 0 its resident memory (serve's /cluster and /metrics)


@dataclass
class Header:
    """One step's control message; each field has one meaning, whatever the command."""
    cmd: Cmd
    n_seqs: int = 0              # FORWARD: sequences in this step
    n_tokens: int = 0            # FORWARD: rows of hidden states, all sequences together
    failed: bool = False         # STOP: rank 0 failed; the workers exit non-zero too
    allreduce: int = 0           # SET_ALLREDUCE: index into ALLREDUCE_MODES
    n_runs: int = 0              # FORWARD: runs of KV blocks, all sequences together

    SIZE = 6                     # int64 fields on the wire

    def pack(self) -> np.ndarray:
        return np.array([int(v) for v in astuple(self)], dtype=np.int64)

    @classmethod
    def unpack(cls, buf: np.ndarray) -> Header:
        cmd, n_seqs, n_tokens, failed, allreduce, n_runs = (int(v) for v in buf)
        return cls(Cmd(cmd), n_seqs, n_tokens, bool(failed), allreduce, n_runs)


def _payload(h: Header, dim: int, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """One buffer for a forward step's sequence table and hidden states, and views of both parts."""
    n_tokens = h.n_tokens
    table_bytes = (h.n_seqs * SeqStep.FIELDS + 2 * h.n_runs) * 8
    raw = torch.empty(table_bytes + n_tokens * dim * dtype.itemsize, dtype=torch.uint8)
    table = raw[:table_bytes].numpy().view(np.int64)
    hidden = raw[table_bytes:].view(dtype).view(n_tokens, dim)
    return raw.numpy(), table, hidden


class Root:
    """Rank 0's side of the steps: embed, send the header and hidden states, run its own slice."""

    def __init__(self, s) -> None:
        self.session = s

    def _send(self, header: Header) -> None:
        self.session.comm.bcast(header.pack())

    def step(self, seqs: list[SeqStep], ids: list[int]) -> list[torch.Tensor | None]:
        """One forward step over sequences whose new tokens, one sequence after another, are `ids`:
        each sequence's logits (float32, full vocabulary; (1, vocab) for Want.LAST, (n_tokens, vocab)
        for Want.ALL, None for Want.NONE). Each sequence's slot holds the KV blocks its step writes
        (held already by an admitted request; a slot that holds too few gets more from the pool)."""
        s = self.session
        seqs = [replace(q, runs=s.kv_pool.hold(q.slot, q.pos + q.n_tokens)) for q in seqs]
        batch = Batch(seqs, s.batch_invariant)
        if batch.n_rows != len(ids):
            raise ValueError(f"the step's sequences hold {batch.n_rows} tokens, {len(ids)} given")
        header = Header(Cmd.FORWARD, n_seqs=len(seqs), n_tokens=len(ids), n_runs=batch.n_runs)
        self._send(header)
        raw, table, hidden = _payload(header, s.model_config.dim, s.dtype)
        table[:] = batch.pack().reshape(-1)
        hidden[:] = s.embed[ids]
        s.comm.bcast(raw)
        logits = s.forward(hidden, batch)
        return [None if a == b else logits[a:b] for a, b in batch.logit_spans]

    def forward(self, ids: list[int], pos: int, all_logits: bool = False, slot: int = 0) -> torch.Tensor:
        """One sequence's step: the logits of its last token, or of every token with `all_logits`."""
        return self.step([SeqStep(slot, pos, len(ids), Want.ALL if all_logits else Want.LAST)], ids)[0]

    def reset_stats(self) -> None:
        """Zero the timing counters on every rank (benchmarks call this after warm-up)."""
        self._send(Header(Cmd.RESET_STATS))
        self.session.reset_stats()

    def set_allreduce(self, mode: str) -> None:
        """Switch every rank to another allreduce algorithm (benchmarks compare them in one job)."""
        self._send(Header(Cmd.SET_ALLREDUCE, allreduce=ALLREDUCE_MODES.index(mode)))
        self.session.comm.mode = mode

    def memory(self) -> tuple[list[float], list[float]]:
        """Every rank's resident and peak resident memory, in bytes (between steps)."""
        self._send(Header(Cmd.MEMORY))
        return self.session.gather_memory()

    def idle(self) -> None:
        """Tell the workers the next step may be long in coming (rank 0 waits for a person or a
        client): they wait for it without a time limit. Otherwise a silent rank 0 is an error."""
        self._send(Header(Cmd.IDLE))

    def stop(self, failed: bool = False) -> None:
        """Release the workers; `failed` makes them exit non-zero too (rank 0 reports the error)."""
        self._send(Header(Cmd.STOP, failed=failed))

    def run(self, work):
        """Run `work(self)` on rank 0, then stop the workers, failed or not."""
        try:
            result = work(self)
        except CommError:
            raise                 # a peer is gone: nobody to tell; the entry point aborts the job
        except BaseException as e:
            self.stop(failed=True)
            e.coordinated = True
            raise
        self.stop()
        return result


def follow(s) -> None:
    """A worker's whole life: obey rank 0's headers until told to stop."""
    buf = np.zeros(Header.SIZE, dtype=np.int64)
    patient = True                               # before the first step rank 0 may be tokenizing a long prompt
    while True:
        s.comm.bcast(buf, timeout=None if patient else True)
        header = Header.unpack(buf)
        if header.cmd == Cmd.MEMORY:             # asked between steps: rank 0's idleness is unchanged
            s.gather_memory()
            continue
        patient = header.cmd == Cmd.IDLE
        if header.cmd == Cmd.STOP:
            if header.failed:
                e = PeerFailed("rank 0 failed")
                e.coordinated = True
                raise e
            return
        if header.cmd == Cmd.RESET_STATS:
            s.reset_stats()
        elif header.cmd == Cmd.SET_ALLREDUCE:
            s.comm.mode = ALLREDUCE_MODES[header.allreduce]
        elif header.cmd == Cmd.FORWARD:
            raw, table, hidden = _payload(header, s.model_config.dim, s.dtype)
            s.comm.bcast(raw)
            s.forward(hidden, Batch.unpack(table, header.n_seqs, s.batch_invariant))


def run_steps(s, work):
    """Rank 0 runs `work(root)` and gets its result; every other rank follows until released and
    gets None. Every command that runs the model goes through here."""
    if s.rank == 0:
        return Root(s).run(work)
    follow(s)
    return None
