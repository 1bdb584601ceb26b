"""`--allreduce-payload`: how an allreduce's float32 partial sums travel. Pure array code, no MPI.

- fp32: as they are (4 bytes a value); the default, and what parity tests use.
- bf16: each value rounded to bfloat16, to nearest even (2 bytes a value; relative error <= 2^-8).
- q8:  blocks of 32 values along the last axis as int8 with one float32 scale per block, the scale
  max |x| / 127 (llama.cpp's Q8_0 and distributed-llama's Q80 sync, with a float32 scale instead of
  fp16: 36 bytes per 32 values; error <= scale / 2 per value).

A codec maps a float32 buffer to a flat uint8 wire buffer and back. Each value's code depends only
on its own row (the last axis: a token's hidden state), never on the other rows of the message, so a
token's sum is the same whatever batch it travels in (batch.py); a row whose length is no multiple
of 32 ends with a shorter block. allreduce.py's star sends each rank's part encoded, the hub adds
the decoded parts in float32 in rank order and sends the encoded total, which every rank (the hub
included) decodes: the same bits everywhere.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 32       # q8's values per scale


class Bf16:
    name = "bf16"

    @staticmethod
    def wire_bytes(shape: tuple) -> int:
        return 2 * int(np.prod(shape, dtype=np.int64))

    @staticmethod
    def encode(x: np.ndarray, wire: np.ndarray) -> None:
        # torch rounds to nearest even and keeps NaN a NaN (NumPy has no bfloat16)
        wire.view(np.int16)[...] = torch.from_numpy(x.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy()

    @staticmethod
    def decode(wire: np.ndarray, out: np.ndarray) -> None:
        out.reshape(-1).view(np.uint32)[...] = wire.view(np.uint16).astype(np.uint32) << 16


class Q8:
    """One row is `blocks(d)` blocks; the wire holds every block's 32 int8 values (a short last block
    padded with zeros), then every block's float32 scale."""
    name = "q8"

    @staticmethod
    def _layout(shape: tuple) -> tuple[int, int, int]:
        d = int(shape[-1]) if shape else 1
        rows = int(np.prod(shape, dtype=np.int64)) // d if d else 0
        return rows, d, -(-d // BLOCK)

    @classmethod
    def wire_bytes(cls, shape: tuple) -> int:
        rows, _, nb = cls._layout(shape)
        return rows * nb * (BLOCK + 4)

    @classmethod
    def _views(cls, wire: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        rows, _, nb = cls._layout(shape)
        n = rows * nb * BLOCK                # a multiple of 4: the scales are aligned
        return wire[:n].view(np.int8).reshape(rows, nb * BLOCK), wire[n:].view(np.float32).reshape(rows, nb)

    @classmethod
    def encode(cls, x: np.ndarray, wire: np.ndarray) -> None:
        rows, d, nb = cls._layout(x.shape)
        q, scale = cls._views(wire, x.shape)
        blocks = x.reshape(rows, d)
        if d != nb * BLOCK:                  # a short last block: zeros change no maximum
            blocks = np.concatenate([blocks, np.zeros((rows, nb * BLOCK - d), np.float32)], axis=1)
        blocks = blocks.reshape(rows, nb, BLOCK)
        np.divide(np.abs(blocks).max(axis=2), np.float32(127), out=scale)
        inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0)
        q.reshape(rows, nb, BLOCK)[...] = np.clip(np.rint(blocks * inv[:, :, None]), -127, 127)

    @classmethod
    def decode(cls, wire: np.ndarray, out: np.ndarray) -> None:
        rows, d, nb = cls._layout(out.shape)
        q, scale = cls._views(wire, out.shape)
        values = q.reshape(rows, nb, BLOCK) * scale[:, :, None]          # float32
        out.reshape(rows, d)[...] = values.reshape(rows, nb * BLOCK)[:, :d]


CODECS = {"fp32": None, "bf16": Bf16, "q8": Q8}
