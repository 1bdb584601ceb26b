"""Source checkpoint -> one folder of shards per rank (the format of shard_format.py), written atomically.

Tensors are read one at a time (each through its own `safe_open`, so no mapping outlives one
tensor) and every file is hashed from the bytes written: a checkpoint larger than RAM splits
with a peak of about one block. Everything is written under a temporary name, fsynced, and the
folder renamed into place last, so an interrupted run never leaves a folder that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig, ParallelConfig, normalized_ratio
from .errors import ConfigError, ShardError
from .parallel import FFN_UNIT, RankShard, plan_shards
from .quant import QTYPES, block_size
from .quant_int8 import INTERLEAVED_TYPES, pack_rows
from .quantize import quantize
from .shard_format import (COMMON, DTYPE_NAMES, DTYPES, EMBED, KINDS, MANIFEST, SAFETENSORS_DTYPES, STAMP, expert_file,
                           TOKENIZER_FILES, Manifest, block_file, content_identity, file_sha256, quant_weight)


def hf_name(ours: str, layer: int | None = None, arch: str = "llama") -> str:
    """Our tensor name (as bound to the model) -> the Hugging Face checkpoint name."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    if layer is None:
        return fixed[ours]
    if ours.startswith(("router.", "experts.")):     # mixture of experts: Mixtral's names, or Qwen3-MoE's
        moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
        if ours == "router.weight":
            return f"model.layers.{layer}.{moe}.gate.weight"
        _, e, proj, kind = ours.split(".")
        names = {"gate": "w1", "up": "w3", "down": "w2"} if arch == "mixtral" else \
            {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        return f"model.layers.{layer}.{moe}.experts.{e}.{names[proj]}.{kind}"
    proj, kind = ours.split(".")
    full = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj", "attn_norm": "input_layernorm",
            "mlp_norm": "post_attention_layernorm", "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm"}[proj]
    return f"model.layers.{layer}.{full}.{kind}"


class HFSource:
    """A Hugging Face model folder: config.json, safetensors (single or sharded), tokenizer files."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder.resolve()          # recorded in the manifest
        if not self.folder.is_dir():
            raise ConfigError(f"model path {self.folder} is not a folder: give a Hugging Face model folder "
                              f"or a folder made by `tpi_mpi prepare`")
        self.config = ModelConfig.from_hf(self.folder / "config.json")
        self.files = self._weight_files()
        self.where: dict[str, Path] = {}
        for f in self.files:
            try:
                with safe_open(f, framework="pt") as st:
                    for name in st.keys():
                        self.where[name] = f
            except (SafetensorError, OSError) as e:
                raise ShardError(f"{f} is not a readable safetensors file ({e}): re-download it") from None
        self.dtype = self._dtype()

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [self.folder / n for n in names]
            missing = [str(f.name) for f in files if not f.exists()]
            if missing:
                raise ShardError(f"{index} names {', '.join(missing)}, which are missing: finish the download")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise ConfigError(f"no *.safetensors in {self.folder}: tpi_mpi reads safetensors checkpoints "
                              f"(convert .bin files with transformers' save_pretrained)")
        return files

    def _dtype(self) -> torch.dtype:
        name = self.name_of("embed.weight")
        with safe_open(self.where[name], framework="pt") as st:
            code = st.get_slice(name).get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise ConfigError(f"{self.where[name]}: tensors of type {code} are not supported; use an fp32, fp16 or bf16 checkpoint")
        return SAFETENSORS_DTYPES[code]

    def name_of(self, ours: str, layer: int | None = None) -> str:
        name = hf_name(ours, layer, self.config.arch)
        if name == "lm_head.weight" and (self.config.tie_embeddings or name not in self.where):
            name = hf_name("embed.weight")
        if name not in self.where:
            raise ShardError(f"tensor {name} is missing from the checkpoint in {self.folder}")
        return name

    def read(self, ours: str, layer: int | None = None, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        """One tensor, or just rows [a, b) or columns [a, b) of it."""
        name = self.name_of(ours, layer)
        with safe_open(self.where[name], framework="pt") as st:
            sl = st.get_slice(name)
            if rows:
                t = sl[rows[0]:rows[1]]
            elif cols:
                t = sl[:, cols[0]:cols[1]]
            else:
                t = sl[:]
        return t.contiguous()

    def tokenizer_files(self) -> list[Path]:
        return [self.folder / n for n in TOKENIZER_FILES if (self.folder / n).exists()]

    def tokenizer_blobs(self) -> dict[str, bytes]:
        """File name -> contents of everything rank 0 needs for text (tokenizer, chat template)."""
        return {f.name: f.read_bytes() for f in self.tokenizer_files()}

    def fingerprint(self) -> str:
        """Cheap identity of the source by content: config and tokenizer bytes, and each weight file's
        name and content identity (its header and samples; hashing a 140 GB checkpoint on every run
        is not cheap)."""
        h = hashlib.sha256()
        for f in [self.folder / "config.json", *self.tokenizer_files()]:
            h.update(f.name.encode() + f.read_bytes())
        for f in self.files:
            with open(f, "rb") as fh:
                header_bytes = 8 + int.from_bytes(fh.read(8), "little")
            h.update(f"{f.name}:{content_identity(f, min(header_bytes, 100_000_000))}".encode())
        return h.hexdigest()


def source_fingerprint(path: Path) -> str:
    """The source's identity without reading any tensor (the prepared cache is keyed by it)."""
    if path.suffix == ".gguf":
        from .gguf import fingerprint_gguf

        return fingerprint_gguf(path)
    return HFSource(path).fingerprint()


def open_source(path: str | Path):
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model path {p} does not exist: check the path")
    if p.suffix == ".gguf":
        from .gguf import GGUFSource     # imports the gguf package, which only GGUF files need
        return GGUFSource(p)
    return HFSource(p)


# -- writing ------------------------------------------------------------------------------------

QUANTIZE = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")     # --quant modes that quantize floats here
QUANT_BYTES = {mode: QTYPES[mode.upper()][1] / QTYPES[mode.upper()][0] for mode in QUANTIZE}   # per value


def resolve_quant(src, mode: str) -> str:
    """--quant auto -> keep for a GGUF (its own types), none for floats; keep needs a GGUF. `src`: a
    source or its path (as open_source tells them apart, by the suffix: no file is read)."""
    path = getattr(src, "path", src)
    keeps = Path(str(path)).suffix == ".gguf"
    if mode == "auto":
        return "keep" if keeps else "none"
    if mode == "keep" and not keeps:
        raise ConfigError(f"--quant keep keeps a GGUF's own types, and {path} holds floats: "
                          f"use --quant none, {', '.join(QUANTIZE)}")
    return mode


def ffn_unit(src, mode: str, m: ModelConfig) -> int:
    """The MLP columns' split unit: kept K-quant `down` matrices split only at 256-value blocks."""
    if mode != "keep":
        return FFN_UNIT
    return max([FFN_UNIT] + [src.block_size("experts.0.down.weight" if m.is_moe(i) else "down.weight", i)
                             for i in range(m.n_layers)])


def _matrix(src, mode: str, dtype, name: str, layer: int | None = None, rows=None, cols=None):
    """(tensor, GGML type or None): a weight matrix's slice as it is stored. Kept in the GGUF's type when
    the slice falls on whole blocks (rows always do; a column cut between blocks is stored as floats),
    quantized here for QUANTIZE modes when its rows are whole blocks, else floats in `dtype`."""
    if mode == "keep":
        kept = src.read_quantized(name, layer, rows=rows, cols=cols)
        if kept is not None:
            return kept
    w = src.read(name, layer, rows=rows, cols=cols)
    if mode in QUANTIZE and w.numel() and w.shape[-1] % block_size(mode.upper()) == 0:
        return quantize(w.float(), mode.upper()), mode.upper()
    return w.to(dtype), None


class Stored(dict):
    """Tensors of one file to write, the GGML type of each quantized one and the bytes they all take
    dequantized to `dtype` (both for the manifest)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.quant: dict[str, str] = {}
        self.packed: list[str] = []          # matrices written in the int8 kernels' layout (quant_int8.pack_rows)
        self.itemsize = dtype.itemsize

    def add(self, name: str, stored: tuple[torch.Tensor, str | None]) -> None:
        self[name], qtype = stored
        if qtype:
            self.quant[name] = qtype

    def pack(self) -> Stored:
        """The matrices the int8 kernels multiply in their layout, so that streamed and mapped blocks
        have it too (resident ones could be regrouped at load, streamed ones not without a copy a token).
        The embedding's rows are looked up by token: it stays row after row."""
        for name, qtype in self.quant.items():
            if qtype in INTERLEAVED_TYPES and name != "embed.weight" and self[name].shape[0] >= 8:
                self[name] = pack_rows(self[name], qtype)
                self.packed.append(name)
        return self

    def dequantized_bytes(self) -> int:
        return self.itemsize * sum(math.prod(quant_weight(t, self.quant[name]).shape) if name in self.quant
                                   else t.numel() for name, t in self.items())


def _block_tensors(src, m: ModelConfig, s: RankShard, layer: int, kind: str, dtype, mode: str) -> Stored:
    hd = m.head_dim
    q_rows = (s.heads[0] * hd, s.heads[1] * hd)
    kv_rows = (s.kv_heads[0] * hd, s.kv_heads[1] * hd)
    if kind == "attn":
        spec = {"q.weight": {"rows": q_rows}, "k.weight": {"rows": kv_rows}, "v.weight": {"rows": kv_rows},
                "o.weight": {"cols": q_rows}}
        if m.qkv_bias:
            spec |= {"q.bias": {"rows": q_rows}, "k.bias": {"rows": kv_rows}, "v.bias": {"rows": kv_rows}}
        if m.o_bias:
            spec["o.bias"] = {}
        if m.qk_norm:                 # one head_dim vector each, the same for every head: every rank a copy
            spec |= {"q_norm.weight": {}, "k_norm.weight": {}}
    elif m.is_moe(layer):             # the router, whole on every rank; the experts have files of their own
        spec = {"router.weight": {}}
    else:
        spec = {"gate.weight": {"rows": s.ffn}, "up.weight": {"rows": s.ffn}, "down.weight": {"cols": s.ffn}}
        if m.mlp_bias:
            spec |= {"gate.bias": {"rows": s.ffn}, "up.bias": {"rows": s.ffn}, "down.bias": {}}
    out = Stored(dtype)
    for name, how in spec.items():
        if name.endswith(".weight") and not name.endswith("norm.weight") and name != "router.weight":
            out.add(name, _matrix(src, mode, dtype, name, layer, **how))
        else:
            out[name] = src.read(name, layer, **how).to(dtype)
    return out


def _expert_tensors(src, s: RankShard, layer: int, expert: int, dtype, mode: str) -> Stored:
    """This rank's columns of one expert, as its own file: read only when routed."""
    out = Stored(dtype)
    for proj, how in (("gate", {"rows": s.expert_ffn}), ("up", {"rows": s.expert_ffn}), ("down", {"cols": s.expert_ffn})):
        out.add(f"{proj}.weight", _matrix(src, mode, dtype, f"experts.{expert}.{proj}.weight", layer, **how))
    return out


def _common_tensors(src, m: ModelConfig, s: RankShard, dtype, mode: str) -> Stored:
    out = Stored(dtype)
    out["norm.weight"] = src.read("norm.weight").to(dtype)
    for i in range(m.n_layers):
        out[f"layers.{i}.attn_norm.weight"] = src.read("attn_norm.weight", i).to(dtype)
        out[f"layers.{i}.mlp_norm.weight"] = src.read("mlp_norm.weight", i).to(dtype)
    out.add("head.weight", _matrix(src, mode, dtype, "head.weight", rows=s.vocab))
    return out


def _file_entry(path: Path) -> dict:
    """Size and sha256 of a written file, once it is on disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def _save_atomic(path: Path, tensors: Stored | None = None, data: bytes | None = None, packed: bool = False) -> dict:
    """Write tensors (as safetensors; `packed`: Stored.pack first) or bytes under a temporary name,
    fsync, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    if tensors is not None and packed:
        tensors.pack()
    if tensors is not None:
        save_file(dict(tensors), tmp)
    else:
        tmp.write_bytes(data)
    entry = _file_entry(tmp)
    if tensors is not None and tensors.quant:
        entry["quant"] = tensors.quant
        entry["dequantized"] = tensors.dequantized_bytes()
    if tensors is not None and tensors.packed:
        entry["packed"] = sorted(tensors.packed)
    tmp.rename(path)
    return entry


def _remove_abandoned(out: Path) -> None:
    """Delete staging folders of earlier runs for `out` that were killed before they finished."""
    for old in out.parent.glob(f".{out.name}.partial-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)


def prepare(src_path, out: str | Path, par: ParallelConfig, dtype: str = "auto",
            head_on: str = "split", progress=None, quant: str = "auto", packed: bool = True) -> Path:
    """Split `src_path` (a path, or a source object such as SyntheticSource) into `out`, storing the
    matrices as `quant` says (config.QUANT_MODES), in the int8 kernels' layout where they have one
    unless not `packed` (for runs on the exact path, which would regroup a streamed block at every
    use); returns `out`. Refuses to overwrite a folder that exists."""
    out = Path(out)
    src = open_source(src_path) if isinstance(src_path, (str, Path)) else src_path
    m = src.config
    quant = resolve_quant(src, quant)
    shards = plan_shards(m, par, head_on, ffn_unit(src, quant, m))
    if dtype not in ("auto", *DTYPES):
        raise ConfigError(f"--dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
    torch_dtype = src.dtype if dtype == "auto" else DTYPES[dtype]
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another --out")
    fingerprint = src.fingerprint()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for s in shards:
            (staging / f"rank{s.rank}").mkdir(parents=True)
        files: list[dict] = [{} for _ in shards]
        steps = (m.n_layers * 2 + len(m.moe_layers) * m.n_experts) * par.world + 2 * par.world
        bar = progress(total=steps, desc="prepare", unit="block") if progress else None
        for i in range(m.n_layers):
            for kind in KINDS:
                for s in shards:
                    name = block_file(i, kind)
                    tensors = _block_tensors(src, m, s, i, kind, torch_dtype, quant)
                    files[s.rank][name] = _save_atomic(staging / f"rank{s.rank}" / name, tensors, packed=packed)
                    del tensors
                    bar and bar.update()
            for e in range(m.n_experts if m.is_moe(i) else 0):
                for s in shards:
                    name = expert_file(i, e)
                    files[s.rank][name] = _save_atomic(staging / f"rank{s.rank}" / name,
                                                       _expert_tensors(src, s, i, e, torch_dtype, quant), packed=packed)
                    bar and bar.update()
        for s in shards:
            files[s.rank][COMMON] = _save_atomic(staging / f"rank{s.rank}" / COMMON,
                                                 _common_tensors(src, m, s, torch_dtype, quant), packed=packed)
            bar and bar.update()
        rank0 = staging / "rank0"
        embed = Stored(torch_dtype)
        embed.add("embed.weight", _matrix(src, quant, torch_dtype, "embed.weight"))
        files[0][EMBED] = _save_atomic(rank0 / EMBED, embed)
        for name, data in src.tokenizer_blobs().items():
            files[0][name] = _save_atomic(rank0 / name, data=data)
        bar and bar.update(par.world)
        bar and bar.close()
        source_path = str(src.path)
        created = time.strftime("%Y-%m-%dT%H:%M:%S")
        for s in shards:
            manifest = Manifest(rank=s.rank, world_size=par.world, ratio=normalized_ratio(par.parts),
                                dtype=DTYPE_NAMES[torch_dtype], head_on=head_on, quant=quant, model=m, shards=tuple(shards),
                                source_path=source_path, source_fingerprint=fingerprint, created=created,
                                files=files[s.rank])
            # the hashes just computed, so a rank on a shared filesystem need not hash again (ship.py)
            stamps = {name: [info["size"], (staging / f"rank{s.rank}" / name).stat().st_mtime_ns, info["sha256"]]
                      for name, info in files[s.rank].items()}
            (staging / f"rank{s.rank}" / STAMP).write_text(json.dumps(stamps))
            # written last: a folder without a manifest is never taken for a prepared one
            _save_atomic(staging / f"rank{s.rank}" / MANIFEST, data=manifest.to_bytes())
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
