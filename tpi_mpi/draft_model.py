"""A draft model for speculative decoding (--draft PATH): a small model with the target's tokenizer,
or the target's own weights quantized smaller, run by rank 0 alone, whole and in memory. No other
rank sees it; its cost is rank 0's compute, which on slow links is cheaper than the synchronisation
rounds of the target's steps it saves.

Each sequence keeps its own positions in the draft's KV pool (`ModelDraft`); a proposal reads the
tokens since the draft last agreed with the sequence, then runs the draft greedily, one token a
forward. A greedy proposal is a single token at each position, so draft.accept's rule keeps the
target's distribution exactly, sampled or not.
"""

from __future__ import annotations

import numpy as np

from . import cache, quant_int8
from .batch import Batch, SeqStep, Want
from .chat import common_prefix
from .config import RunConfig, kv_dtype_name
from .errors import ConfigError
from .kv import BlockPool, blocks_for
from .local_comm import LocalComm
from .model import Transformer
from .shard_format import COMMON, DTYPES
from .text import TextCodec
from .weights import EmbeddingTable, Shard, WeightWindow


PROBE = "The quick brown fox, 0123456789: über naïve café! <tag> \n\tend"   # two tokenizers agree on it, or differ


class DraftModel:
    """The draft, loaded whole on rank 0: `step(slot, pos, ids)` gives the next-token logits."""

    def __init__(self, path: str, run: RunConfig, codec: TextCodec, vocab_size: int, positions: int, log,
                 progress=None) -> None:
        cfg = RunConfig(model=path, cache_dir=run.cache_dir, matmul=run.matmul, kv_dtype=run.kv_dtype, quiet=run.quiet)
        folder = cache.locate(cfg, 1, log, progress)
        shard = Shard(folder / "rank0", 0, 1)
        why = (f"a vocabulary of {shard.model.vocab_size} tokens, the model's {vocab_size}"
               if shard.model.vocab_size != vocab_size else
               "the same text gives other tokens" if TextCodec(shard.folder).encode(PROBE) != codec.encode(PROBE) else None)
        if why:
            raise ConfigError(f"--draft {path}: its tokenizer is not the model's ({why}): a draft must share it")
        quantized = any(info.get("quant") for info in shard.files.values())
        form = quant_int8.interleaved if quantized and quant_int8.int8_on() else None
        self.window = WeightWindow(shard, None, resident_form=form)
        kv_dtype = DTYPES[kv_dtype_name(run.kv_dtype, "auto", shard.manifest.dtype)]
        self.model = Transformer(shard.model, shard.shards, 0, LocalComm(), self.window, shard.dtype,
                                 blocks_for(positions), kv_dtype)
        common = shard.read(COMMON)[1]
        self.model.load_resident(form(common) if form else common)
        self.embed = EmbeddingTable(shard)
        self.pool = BlockPool(blocks_for(positions))
        self.name = path

    def step(self, slot: int, pos: int, ids: list[int]) -> np.ndarray:
        runs = self.pool.hold(slot, pos + len(ids))
        logits = self.model(self.embed[ids], Batch([SeqStep(slot, pos, len(ids), Want.LAST, runs)]))
        return logits[-1].numpy()

    def close(self) -> None:
        self.window.close()


class ModelDraft:
    """One sequence's proposals from the draft model (the same interface as draft.NgramDraft)."""

    def __init__(self, model: DraftModel, slot: int) -> None:
        self.model, self.slot = model, slot
        self.tokens: list[int] = []          # the sequence's tokens
        self.cached: list[int] = []          # what the draft's KV cache holds for it (its proposals too)

    def extend(self, tokens: list[int]) -> None:
        self.tokens.extend(tokens)

    def propose(self, k: int) -> list[int]:
        if k < 1 or not self.tokens:
            return []
        # the cache is good up to where it parts from the tokens; the last token is fed again: its logits are needed
        same = min(common_prefix(self.cached, self.tokens), len(self.tokens) - 1)
        logits = self.model.step(self.slot, same, self.tokens[same:])
        self.cached = list(self.tokens)
        out = []
        for i in range(k):
            out.append(int(np.argmax(logits)))
            if i < k - 1:
                logits = self.model.step(self.slot, len(self.cached), out[-1:])
                self.cached.append(out[-1])
        return out

    def close(self) -> None:
        self.model.pool.release(self.slot)
