"""The on-disk format of a prepared model: file names, dtypes, the manifest, reading and hashing.

A prepared folder holds one folder per rank (each rank needs only its own `rankN/`):

    rankN/manifest.json              model config, world size, ratio, every rank's slices,
                                     every file's size and sha256 and the GGML type of each of
                                     its quantized matrices, the source fingerprint
    rankN/layer007.attn.safetensors  q/k/v (column slices) and o (row slice) of layer 7
    rankN/layer007.mlp.safetensors   gate/up (column slices) and down (row slice)
    rankN/common.safetensors         norms and this rank's rows of the output head (resident)
    rank0/embed.safetensors          the embedding table: rank 0 only, like the tokenizer files

A quantized matrix is stored as its raw GGML blocks: a uint8 tensor (rows, bytes per row) whose
type ("Q4_K", ...) the manifest names; reading it gives a `QuantWeight` (quant.py). Rows are whole
blocks, so a rank's slice of a matrix is cut at rows, or at columns on block boundaries. Q8_0, Q4_0,
Q4_1, Q5_0 and Q5_1 matrices (not the embedding) are written in the int8 kernels' 8-row layout
(format 3; the file's "packed" list names them), so that streamed and mapped blocks are computed as
resident ones; a folder prepared for a run on the exact path keeps them row after row.

`Manifest.load` is the one place a manifest is parsed and checked. prepare.py writes this
format, ship.py copies it between hosts, weights.py reads it block by block.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import ShardError
from .parallel import RankShard
from .quant import QTYPES, QuantWeight

FORMAT = 4      # 2: quantized matrices; 3: some in the int8 kernels' layout ("packed"); 4: the K-quants packed too
MANIFEST = "manifest.json"
COMMON = "common.safetensors"
EMBED = "embed.safetensors"
STAMP = ".verified.json"        # hashes already checked on this host, by size and modification time
KINDS = ("attn", "mlp")         # the two blocks of a layer, in execution order
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja", "chat_template.json")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CHUNK = 8 << 20                 # bytes per read when hashing or shipping


def block_file(layer: int, kind: str) -> str:
    return f"layer{layer:03d}.{kind}.safetensors"


def expert_file(layer: int, expert: int) -> str:
    """One expert's slice in an MoE layer: read only when the router picks it (weights.ExpertStore)."""
    return f"layer{layer:03d}.expert{expert:03d}.safetensors"


def file_sha256(path: Path, drop_cache: bool = False) -> str:
    """sha256 of a file, read in chunks (a block can be hundreds of MB); `drop_cache` then tells
    the OS its pages are no longer needed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
        if drop_cache:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return h.hexdigest()


SAMPLES, SAMPLE_BYTES = 16, 4096


def content_identity(path: Path, head_bytes: int) -> str:
    """A cheap identity of a large file by its content, not its modification time: the size, the sha256
    of its first `head_bytes` (a checkpoint's header: names, shapes, offsets) and of SAMPLES pieces
    spread over the rest, which tell apart two fine-tunes with the same header. Reads well under
    a MB whatever the size, so a new environment finds the cache its files were prepared into."""
    size = path.stat().st_size
    head = min(head_bytes, size)
    h = hashlib.sha256(f"{size}:".encode())
    with open(path, "rb") as f:
        h.update(f.read(head))
        for i in range(SAMPLES):
            f.seek(head + (size - head) * i // SAMPLES)
            h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def read_safetensors(path: Path, buf: Tensor | None = None, sha256: str | None = None,
                     quant: dict[str, str] | None = None,
                     packed: Collection[str] = ()) -> tuple[Tensor, dict[str, Tensor | QuantWeight]]:
    """Read a safetensors file into `buf` (a reused uint8 tensor) or a new one; returns the buffer
    and views into it, a QuantWeight for each tensor `quant` names (name -> GGML type; those in
    `packed` stored in the int8 kernels' layout, quant_int8.pack_rows). Checks the
    sha256 when given. The file's pages are dropped from the page cache afterwards, so the memory a
    block uses is the buffer and nothing hidden."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if buf is None:
            buf = torch.empty(size, dtype=torch.uint8)
        view = buf.numpy()[:size]
        done = 0
        while done < size:
            n = f.readinto(memoryview(view)[done:])
            if not n:
                raise ShardError(f"{path} ended after {done} of {size} bytes")
            done += n
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return buf, parse_safetensors(buf[:size], path, sha256, quant, packed)


def map_safetensors(path: Path, sha256: str | None = None, quant: dict[str, str] | None = None,
                    packed: Collection[str] = ()) -> dict[str, Tensor | QuantWeight]:
    """A safetensors file's tensors as views into a private mapping of it: no copy, the pages are the
    page cache's (read from disk once, then shared). The mapping lives as long as the tensors do."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)     # copy-on-write: writable views, no copy
    mm.madvise(mmap.MADV_WILLNEED)                                  # read ahead now, not page by page
    return parse_safetensors(torch.frombuffer(mm, dtype=torch.uint8), path, sha256, quant, packed)


def parse_safetensors(buf: Tensor, path: Path, sha256: str | None = None, quant: dict[str, str] | None = None,
                      packed: Collection[str] = ()) -> dict[str, Tensor | QuantWeight]:
    """Views into `buf` (a whole safetensors file as uint8) by tensor name; see read_safetensors."""
    view = buf.numpy()
    n = int.from_bytes(view[:8].tobytes(), "little") if view.size >= 8 else 0
    if sha256 and hashlib.sha256(view).hexdigest() != sha256:
        raise ShardError(f"{path} does not match its manifest checksum: the file is corrupt; "
                         f"prepare the model again (or delete the folder to let the cache rebuild it)")
    try:
        header = json.loads(view[8:8 + n].tobytes())
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            raw = buf[8 + n + start: 8 + n + end]
            if quant and name in quant:
                tensors[name] = quant_weight(raw.view(info["shape"]), quant[name], name in packed)
            else:
                tensors[name] = raw.view(SAFETENSORS_DTYPES[info["dtype"]]).view(info["shape"])
    except (ValueError, KeyError, RuntimeError, TypeError) as e:
        raise ShardError(f"{path} is not a valid safetensors file ({e}): prepare the model again") from None
    return tensors


def quant_weight(raw: Tensor, qtype: str, packed: bool = False) -> QuantWeight:
    """A stored (rows, bytes per row) uint8 matrix of GGML type `qtype` as the model uses it."""
    values, nbytes = QTYPES[qtype]
    return QuantWeight(raw, qtype, raw.shape[1] // nbytes * values, interleaved=packed)


def matrix_types(folder: Path, mf: Manifest) -> Counter[str]:
    """How many of a rank's weight matrices are stored in each type: the GGML type the manifest names
    for a quantized one ("Q4_1"), the float dtype's name ("fp32") for the others. Reads only headers."""
    counts: Counter[str] = Counter()
    for name, info in mf.files.items():
        if not name.endswith(".safetensors"):
            continue
        with open(Path(folder) / name, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        quant = info.get("quant", {})
        for t, meta in header.items():
            if t in quant:
                counts[quant[t]] += 1
            elif t != "__metadata__" and len(meta["shape"]) >= 2:
                counts[mf.dtype] += 1
    return counts


def types_label(counts: Counter[str]) -> str:
    """"Q4_1 (5 bits a value), Q8_0 (8.5)": the types, the most used first, with their bits a value."""
    types = [t for t, _ in counts.most_common()]
    bits = [8 * QTYPES[t][1] / QTYPES[t][0] if t in QTYPES else 8 * DTYPES[t].itemsize for t in types]
    return ", ".join(f"{t} ({b:g}{' bits a value' if i == 0 else ''})" for i, (t, b) in enumerate(zip(types, bits)))


@dataclass(frozen=True)
class Manifest:
    """One rank's manifest.json. `files` maps a file name to {"size": bytes, "sha256": hex} and, for
    a file holding quantized matrices, "quant": {tensor name: GGML type}."""
    rank: int
    world_size: int
    ratio: tuple[float, ...]          # normalized: fractions summing to 1
    dtype: str                        # a DTYPES key
    head_on: str
    quant: str                        # how matrices were stored: keep, none, q8_0, q4_0, q4_1, q5_0, q5_1
    model: ModelConfig
    shards: tuple[RankShard, ...]     # every rank's slices
    source_path: str
    source_fingerprint: str
    created: str
    files: dict[str, dict]

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @classmethod
    def load(cls, folder: Path) -> Manifest:
        path = Path(folder) / MANIFEST
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise ShardError(f"{path} is missing: {folder} is not a prepared shard folder") from None
        return cls.from_bytes(raw, path)

    @classmethod
    def from_bytes(cls, raw: bytes, where: Path | str) -> Manifest:
        try:
            d = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ShardError(f"{where} is not valid JSON: prepare the model again") from None
        if not isinstance(d, dict) or d.get("format") not in (2, 3, FORMAT):   # 2: no file lists "packed"
            raise ShardError(f"{where} has format {d.get('format') if isinstance(d, dict) else None}, "
                             f"this tpi_mpi reads formats 2 to {FORMAT}: prepare the model again")
        try:
            mf = cls(rank=int(d["rank"]), world_size=int(d["world_size"]), ratio=tuple(d["ratio"]),
                     dtype=d["dtype"], head_on=d["head_on"], quant=d["quant"], model=ModelConfig.from_json(d["model"]),
                     shards=tuple(RankShard(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                                  for s in d["shards"]),
                     source_path=d["source"]["path"], source_fingerprint=d["source"]["fingerprint"],
                     created=d.get("created", ""), files=dict(d["files"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ShardError(f"{where} is damaged ({type(e).__name__}: {e}): prepare the model again") from None
        if mf.dtype not in DTYPES:
            raise ShardError(f"{where} names dtype {mf.dtype!r}: prepare the model again")
        for name, info in mf.files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ShardError(f"{where} names {name!r}, outside its folder: refusing it; prepare the model again")
            unknown = set(info.get("quant", {}).values()) - set(QTYPES)
            if unknown:
                raise ShardError(f"{where}: {name} holds matrices of type {', '.join(sorted(unknown))}, which this "
                                 f"tpi_mpi does not read: prepare the model again")
        return mf

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": FORMAT, "rank": self.rank, "world_size": self.world_size, "ratio": list(self.ratio),
            "dtype": self.dtype, "head_on": self.head_on, "quant": self.quant, "model": self.model.to_json(),
            "shards": [s.to_json() for s in self.shards],
            "source": {"path": self.source_path, "fingerprint": self.source_fingerprint},
            "created": self.created, "files": self.files,
        }, indent=1).encode()

    def block_files(self) -> list[str]:
        """The streamed blocks' file names, in execution order."""
        return [block_file(i, k) for i in range(self.model.n_layers) for k in KINDS]

    def expert_files(self) -> list[str]:
        """Every MoE layer's expert files (empty for a dense model)."""
        m = self.model
        return [expert_file(i, e) for i in m.moe_layers for e in range(m.n_experts)]
