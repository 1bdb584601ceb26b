"""The recorder behind TPI_MPI_RECORD, a test's window on what each rank receives: comm.py hands
it every buffer received. No MPI here."""

from __future__ import annotations

import json
import os

import numpy as np


class Recorder:
    """Every buffer this rank receives, appended raw to rankN.bin with a JSON line each in rankN.jsonl
    (set TPI_MPI_RECORD=folder). It lets a test prove what a worker ever gets to see."""

    def __init__(self, folder: str, rank: int) -> None:
        os.makedirs(folder, exist_ok=True)
        self.bin = open(os.path.join(folder, f"rank{rank}.bin"), "ab")
        self.index = open(os.path.join(folder, f"rank{rank}.jsonl"), "a")

    def add(self, op: str, buf: np.ndarray) -> None:
        offset = self.bin.tell()
        self.bin.write(buf.tobytes())
        self.bin.flush()
        self.index.write(json.dumps({"op": op, "dtype": str(buf.dtype), "shape": list(buf.shape),
                                     "offset": offset, "nbytes": buf.nbytes}) + "\n")
        self.index.flush()
