"""Models by name from the Hugging Face Hub: `--model org/name` (safetensors) or `org/name:QUANT` (one
.gguf of a GGUF repo), as llama.cpp's `-hf org/repo:Q4_K_M` and `vllm serve org/repo`.

`resolve` turns `--model` into a local path: a path that exists is used as it is; a repo id is
downloaded with huggingface_hub into the standard Hugging Face cache (resumable, its own progress
bars, HF_TOKEN, HF_ENDPOINT and HF_HUB_OFFLINE honoured) and the path into that cache returned. Only
rank 0 calls it (cache.locate): the workers get their shards from rank 0 over MPI and never see the
Hub. huggingface_hub reads the environment when it is imported, so the endpoint, the cache folder and
offline mode are read here at call time and passed to it.

Every failure is a ConfigError of one line that names the fix.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")          # org/name, as the Hub spells them
QUANT_NAME = re.compile(r"^[\w.-]+$")
# a quant label inside a .gguf name: Q4_K_M, IQ3_XS, Q8_0, BF16, ...; the last one in the name counts
QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(I?Q\d[A-Za-z0-9_]*|BF16|F16|F32|FP16|FP32)(?![A-Za-z0-9])", re.I)
SPLIT_PART = re.compile(r"-(\d{5})-of-(\d{5})$")
# without :QUANT, as llama.cpp: Q4_K_M first; then the types tpi_mpi keeps as they are, smallest first
DEFAULT_QUANTS = ("Q4_K_M", "Q4_0", "Q4_1", "Q5_0", "Q5_K_M", "Q5_1", "Q6_K", "Q8_0", "BF16", "F16", "F32")
BESIDE_GGUF = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")   # gguf.TOKENIZER_BESIDE
NETWORK_ERRORS = {"ConnectError", "ConnectTimeout", "TimeoutException", "ConnectionError", "TimeoutError",
                  "OfflineModeIsEnabled"}
LOGIN = "set HF_TOKEN or run `hf auth login` (huggingface-cli login)"


@dataclass(frozen=True)
class HubRef:
    repo: str
    quant: str | None = None

    def __str__(self) -> str:
        return f"{self.repo}:{self.quant}" if self.quant else self.repo


def parse_ref(model: str) -> HubRef | None:
    """`model` as a Hub reference, or None when it is a path: one that exists always wins, and a
    name that cannot be a repo id (absolute, ./relative, ~, .gguf) is a path too."""
    if Path(model).expanduser().exists():
        return None
    repo, colon, quant = model.partition(":")
    if not REPO_ID.match(repo) or ".." in repo or repo.lower().endswith(".gguf"):
        return None
    if colon and not QUANT_NAME.match(quant):
        return None
    return HubRef(repo, quant or None)


def resolve(model: str, log=lambda m: None, quiet: bool = False) -> Path:
    """The local path for `--model`: itself, or the Hub model downloaded (or found in the cache)."""
    ref = parse_ref(model)
    if ref is None:
        return Path(model).expanduser()
    return download(ref, log, quiet)


def display_name(model: str | None) -> str:
    """A model's name for humans and /v1/models: the Hub reference as given, else the file or folder name."""
    return model if model and parse_ref(model) else Path(model or "").expanduser().name


# -- choosing the files ------------------------------------------------------------------------------

def quant_label(filename: str) -> str:
    """Q4_K_M from 'SmolLM2-135M-Instruct-Q4_K_M.gguf' (or from part 1 of a split file)."""
    stem = SPLIT_PART.sub("", Path(filename).name.removesuffix(".gguf"))
    found = QUANT_IN_NAME.findall(stem)
    return found[-1].upper() if found else stem


def gguf_sets(files: list[str]) -> dict[str, list[str]]:
    """The repo's GGUF models, each a file or all parts of a split one, by their first file.
    Vision projectors (mmproj-*) are not models."""
    sets: dict[str, list[str]] = {}
    for f in sorted(files):
        name = Path(f).name
        if not name.endswith(".gguf") or name.lower().startswith("mmproj"):
            continue
        stem = name.removesuffix(".gguf")
        m = SPLIT_PART.search(stem)
        first = str(Path(f).with_name(SPLIT_PART.sub(f"-00001-of-{m.group(2)}", stem) + ".gguf")) if m else f
        sets.setdefault(first, []).append(f)
    return sets


def pick_gguf(repo: str, files: list[str], quant: str | None, where: str = "") -> tuple[list[str], str, str]:
    """(files to download, the model file, what was chosen) for a GGUF repo. `where`: '' or ' cached'
    (the errors then say what the cache has)."""
    sets = gguf_sets(files)
    labels = sorted({quant_label(first) for first in sets})
    if quant:
        wanted = [first for first in sets if quant_label(first) == quant.upper()] or \
                 [first for first in sets if re.search(rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9_])",
                                                       Path(first).name, re.I)]
        if not wanted and not labels:
            raise ConfigError(f"{repo} has{where} no .gguf files, so :{quant} picks none: drop :{quant} for its "
                              f"safetensors weights")
        if not wanted:
            example = next((q for q in DEFAULT_QUANTS if q in labels), labels[0])
            raise ConfigError(f"{repo} has{where} no .gguf file for {quant}: it has {', '.join(labels)} "
                              f"(e.g. --model {repo}:{example})")
        note = quant_label(wanted[0])
    else:
        by_label = {quant_label(first): first for first in sets}
        choice = next((q for q in DEFAULT_QUANTS if q in by_label), None)
        wanted = [by_label[choice] if choice else min(sets)]
        others = [q for q in labels if q != quant_label(wanted[0])]
        note = (f"{quant_label(wanted[0])}, the default" +
                (f"; the repo also has {', '.join(others)} (pick one as {repo}:QUANT)" if others else ""))
    first = wanted[0]
    folder = str(Path(first).parent)
    beside = [f for f in files if str(Path(f).parent) == folder and Path(f).name in BESIDE_GGUF]
    return sets[first] + beside, first, note


def has_safetensors(files: list[str]) -> bool:
    return "config.json" in files and any("/" not in f and f.endswith(".safetensors") for f in files)


def safetensors_files(files: list[str]) -> list[str]:
    """What HFSource reads: config.json, the tokenizer files and the top-level weights (those the
    index names, when there is one: a repo may hold a consolidated copy beside them)."""
    from .shard_format import TOKENIZER_FILES      # here: the supervisor names Hub models and loads no torch

    top = [f for f in files if "/" not in f]
    wanted = [f for f in top if f == "config.json" or f in TOKENIZER_FILES or f == "model.safetensors.index.json"]
    if "model.safetensors.index.json" not in top:
        wanted += [f for f in top if f.endswith(".safetensors")]
    return wanted


def pick(ref: HubRef, files: list[str], where: str = "") -> tuple[list[str], str | None, str]:
    """(files to download, the .gguf to open or None for the folder, what was chosen)."""
    if ref.quant or (not has_safetensors(files) and gguf_sets(files)):
        return pick_gguf(ref.repo, files, ref.quant, where)
    if has_safetensors(files):
        return safetensors_files(files), None, "safetensors weights"
    shown = ", ".join(sorted(files)[:8]) + (", ..." if len(files) > 8 else "") or "no files"
    raise ConfigError(f"{ref.repo} has{where} neither safetensors weights with a config.json nor .gguf files, which "
                      f"tpi_mpi reads (it has{where} {shown})")


# -- the Hub and its cache ---------------------------------------------------------------------------

def _true(value: str | None) -> bool:
    return (value or "").upper() in ("1", "ON", "YES", "TRUE")


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants

    return _true(os.environ.get("HF_HUB_OFFLINE")) or constants.HF_HUB_OFFLINE


def hub_cache() -> Path:
    """The Hugging Face cache folder, as huggingface_hub.constants works it out (at call time)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = env.get("HF_HOME") or Path(env.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo: str) -> Path | None:
    """The snapshot folder of the main branch's last download (the cache's documented layout)."""
    folder = hub_cache() / ("models--" + repo.replace("/", "--"))
    ref = folder / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = folder / "snapshots" / ref.read_text().strip()
    return snapshot if snapshot.is_dir() else None


def cached_files(snapshot: Path) -> list[str]:
    """Files present in a snapshot (a link whose blob is gone does not count)."""
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())


def _from_cache(ref: HubRef, log, reason: str, why: str) -> Path:
    """The copy in the Hugging Face cache, used when the Hub is not asked (`reason`); else ConfigError(why)."""
    snapshot = cached_snapshot(ref.repo)
    if snapshot is None:
        raise ConfigError(why)
    files, gguf, note = pick(ref, cached_files(snapshot), " cached")
    if gguf is None and (snapshot / "model.safetensors.index.json").is_file():
        files += json.loads((snapshot / "model.safetensors.index.json").read_text())["weight_map"].values()
    if any(not (snapshot / f).is_file() for f in files):
        raise ConfigError(why)
    log(f"{ref}: {reason}: the cached copy in {snapshot} ({note})")
    return snapshot / gguf if gguf else snapshot


def download(ref: HubRef, log, quiet: bool = False) -> Path:
    """The model's files in the Hugging Face cache, downloaded as needed; the .gguf or the folder."""
    from huggingface_hub import HfApi

    if offline():
        return _from_cache(ref, log, "HF_HUB_OFFLINE=1",
                           f"{ref.repo}: no such local path, and with HF_HUB_OFFLINE=1 the Hugging Face cache "
                           f"({hub_cache()}) has no copy of it: unset HF_HUB_OFFLINE to download it, or give a local path")
    api = HfApi(endpoint=endpoint())
    try:
        info = api.model_info(ref.repo, revision="main")
        files = [s.rfilename for s in info.siblings or []]
        wanted, gguf, note = pick(ref, files)
        log(f"{ref}: {note}; downloading what the cache lacks into {hub_cache()}")
        snapshot = Path(_snapshot(ref.repo, wanted, quiet))
        if gguf is None and "model.safetensors.index.json" in wanted:     # then the shards the index names
            index = json.loads((snapshot / "model.safetensors.index.json").read_text())
            snapshot = Path(_snapshot(ref.repo, sorted(set(index["weight_map"].values())), quiet))
    except ConfigError:
        raise
    except Exception as e:   # huggingface_hub's and httpx's many kinds, each made one line
        unreachable = _unreachable(e)
        if unreachable:
            return _from_cache(ref, log, f"the Hub ({endpoint()}) cannot be reached ({unreachable})",
                               f"{ref.repo}: no such local path, the Hub ({endpoint()}) cannot be reached "
                               f"({unreachable}) and the Hugging Face cache has no copy of it: connect, or give a "
                               f"local path (HF_HUB_OFFLINE=1 uses a copy downloaded before)")
        raise _explained(ref, e) from None
    return snapshot / gguf if gguf else snapshot


def _snapshot(repo: str, files: list[str], quiet: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        return snapshot_download(repo, revision="main", allow_patterns=files, cache_dir=hub_cache(),
                                 endpoint=endpoint())
    finally:
        if quiet and not was_off:
            enable_progress_bars()


def _unreachable(e: Exception) -> str | None:
    """The network failure behind `e` (its type's name), or None when the Hub answered. By name:
    huggingface_hub's HTTP client has changed (requests, httpx, httpx2) and may again."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    chain, seen = e, 0
    while chain is not None and seen < 8:
        names = {c.__name__ for c in type(chain).__mro__}
        if names & NETWORK_ERRORS:
            return type(chain).__name__
        if isinstance(chain, LocalEntryNotFoundError) and not isinstance(chain, HfHubHTTPError):
            return "no connection"       # snapshot_download's own word for it
        chain, seen = chain.__cause__ or chain.__context__, seen + 1
    return None


def _explained(ref: HubRef, e: Exception) -> ConfigError:
    from huggingface_hub import get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    page = f"{endpoint()}/{ref.repo}"
    token = get_token() is not None
    if isinstance(e, GatedRepoError):
        if token:
            return ConfigError(f"{ref.repo} is gated and your token has no access to it yet: accept its terms at "
                               f"{page} (or check HF_TOKEN)")
        return ConfigError(f"{ref.repo} is gated: accept its terms at {page}, then {LOGIN}")
    if isinstance(e, RepositoryNotFoundError):
        if token:
            return ConfigError(f"{ref.repo}: no such local path, and the Hub ({endpoint()}) has no model by that name "
                               f"that your token can see: check the name, or the token's access")
        return ConfigError(f"{ref.repo}: no such local path, and the Hub ({endpoint()}) has no model by that name, or "
                           f"it is private: check the name; for a private model {LOGIN}")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        return ConfigError(f"the Hub ({endpoint()}) answered HTTP {e.response.status_code} for {ref.repo}: "
                           f"try again later, or give a local path")
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return ConfigError(f"downloading {ref} failed ({type(e).__name__}: {first}): run again (the files already "
                       f"downloaded are kept), or give a local path")
