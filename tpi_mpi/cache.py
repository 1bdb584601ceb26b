"""Where prepared models live: the cache of shard folders, keyed by the source's content.

`locate` is rank 0's first step of every run: the prepared folder for `--model` (a Hub model is
downloaded first, by hub.py), preparing it into the cache on first use. A cache hit reads no tensor and parses no checkpoint: the key is the
source's fingerprint (its content: sizes, headers, samples; see prepare.source_fingerprint), the
world size, the ratio, the dtype, the head placement and the shard format. `entries` and `clear`
back the `cache` command.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import ParallelConfig, RunConfig, normalized_ratio
from .errors import ConfigError, ShardError
from .parallel import plan_shards
from .prepare import ffn_unit, open_source, prepare, resolve_quant, source_fingerprint
from .quant_int8 import int8_chosen
from .shard_format import FORMAT, MANIFEST, Manifest, matrix_types, types_label


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tpi_mpi"


def cache_dir(cfg: RunConfig, rank: int) -> Path:
    """--cache-dir may hold "{rank}": a cache of its own per rank, as on hosts that share no disk."""
    return Path((cfg.cache_dir or str(default_cache_dir())).format(rank=rank)).expanduser()


def cache_key(fingerprint: str, par: ParallelConfig, dtype: str, head_on: str, quant: str, packed: bool = True) -> str:
    """The prepared folder's name; `packed` (the int8 kernels' layout, prepare) or not: an exact run has
    a folder of its own, stored row after row."""
    ratio = ",".join(f"{r:g}" for r in normalized_ratio(par.parts))
    layout = "" if packed else "|plain"
    digest = hashlib.sha256(f"{fingerprint}|{par.world}|{ratio}|{dtype}|{head_on}|{quant}|{FORMAT}{layout}".encode())
    return f"w{par.world}-{dtype}-{quant}-{head_on}{'' if packed else '-plain'}-{digest.hexdigest()[:16]}"


def model_path(cfg: RunConfig, log=lambda m: None) -> Path:
    """The local path of --model: the built-in model, a path, or a Hub model downloaded (hub.py)."""
    if cfg.model is None:
        from .gguf import builtin_model_path

        return builtin_model_path()
    from .hub import resolve

    return resolve(cfg.model, log, cfg.quiet)


def source_name(path: Path) -> str:
    """The name a prepared folder starts with: the source's own name. In the Hugging Face cache a
    snapshot folder is named by a commit and its files link to blobs named by hashes, so there it is
    the repo's name (org--name), or the .gguf's name as linked."""
    parts = path.absolute().parts
    for i, part in enumerate(parts[:-1]):
        if part.startswith("models--") and parts[i + 1] == "snapshots":
            return path.name if path.suffix == ".gguf" else part.removeprefix("models--")
    return path.resolve().name


def locate(cfg: RunConfig, world: int, log, progress=None) -> Path:
    """Rank 0: the prepared folder (holding rank0/, rank1/, ...) for `cfg.model`, preparing it into
    the cache on first use. Everything that can refuse the run does so before work is announced."""
    path = model_path(cfg, log)
    if (path / "rank0" / MANIFEST).exists():
        check_prepared(path, cfg, world)
        return path
    if (path / MANIFEST).exists():
        raise ConfigError(f"{path} is one rank's folder: give its parent, which holds rank0/, rank1/, ...")
    if not path.exists():
        raise ConfigError(f"model path {path} does not exist: check the path")
    par = cfg.parallel(world)
    quant = resolve_quant(path, cfg.quant)
    packed = int8_chosen(cfg.matmul, cfg.dtype)
    key = cache_key(source_fingerprint(path), par, cfg.dtype, cfg.head_on, quant, packed)
    out = cache_dir(cfg, 0) / f"{source_name(path)}-{key}"
    if not (out / "rank0" / MANIFEST).exists():
        src = open_source(path)
        plan_shards(src.config, par, cfg.head_on, ffn_unit(src, quant, src.config))   # refuses a split that cannot be made
        log(f"preparing {path} for {world} rank(s) into {out}")
        prepare(src, out, par, cfg.dtype, cfg.head_on, progress=progress, quant=quant, packed=packed)
    return out


def rank_root(cfg: RunConfig, root: Path, rank: int) -> Path:
    """Where this rank keeps its copy of the prepared model found by rank 0 at `root`."""
    if root.parent == cache_dir(cfg, 0):
        return cache_dir(cfg, rank) / root.name
    return root


def check_prepared(path: Path, cfg: RunConfig, world: int) -> None:
    """A prepared folder given by hand must match this run and still match its source."""
    mf = Manifest.load(path / "rank0")
    if mf.world_size != world:
        raise ConfigError(f"{path} was prepared for {mf.world_size} ranks, not {world}: run with "
                          f"-n {mf.world_size}, or give the original model to prepare it for {world}")
    if cfg.quant not in ("auto", mf.quant):
        raise ConfigError(f"{path} was prepared with --quant {mf.quant}, not {cfg.quant}: drop --quant or "
                          f"prepare the model again with it")
    if cfg.ratio and normalized_ratio(cfg.parallel(world).parts) != mf.ratio:
        raise ConfigError(f"{path} was prepared with ratio {','.join(f'{r:g}' for r in mf.ratio)}, not "
                          f"{','.join(f'{r:g}' for r in cfg.ratio)}: drop --ratio or prepare the model again with it")
    src = Path(mf.source_path)
    if src.exists() and source_fingerprint(src) != mf.source_fingerprint:
        raise ConfigError(f"{path} was prepared from an older version of {src}: prepare it again")


@dataclass(frozen=True)
class Entry:
    folder: Path
    bytes: int
    source: str
    world_size: int
    weights: str          # the matrices' stored types: "Q4_1 (5 bits a value), Q8_0 (8.5)"
    dtype: str            # the compute dtype


def entries(folder: Path) -> list[Entry]:
    """The prepared models in a cache folder (a rank's copy holds only its own rankN/)."""
    out = []
    for d in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []:
        manifests = sorted(d.glob(f"rank*/{MANIFEST}"))
        if not manifests:
            continue
        try:
            mf = Manifest.load(manifests[0].parent)
            source, world, dtype = mf.source_path, mf.world_size, mf.dtype
            weights = types_label(matrix_types(manifests[0].parent, mf))
        except (ShardError, OSError, ValueError):
            source, world, weights, dtype = "(damaged manifest)", 0, "?", "?"
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.append(Entry(d, size, source, world, weights, dtype))
    return out


def clear(folder: Path) -> list[Entry]:
    """Remove every prepared model from a cache folder; returns what was removed."""
    gone = entries(folder)
    for e in gone:
        shutil.rmtree(e.folder)
    return gone
