"""Weight shipping: a rank whose shard is missing or stale on its own host gets it from rank 0.

Rank 0 holds every rank's folder of a prepared model. At start-up each other rank compares its
local copy with rank 0's manifest: a file is good when its size matches and its sha256 does (the
hash is remembered in `.verified.json` next to the files, keyed by size and modification time, so
an unchanged shard is not hashed again). Missing or bad files travel over MPI in raw chunks into a
temporary name, are checked (size and sha256), fsynced and renamed into place; the manifest comes
last. On a shared filesystem every file is already good and nothing moves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .errors import ShardError
from .shard_format import CHUNK, MANIFEST, STAMP, Manifest, file_sha256

TAG_MANIFEST, TAG_WANTED, TAG_DATA = 21, 22, 23


def stale_files(folder: Path, manifest: Manifest) -> list[str]:
    """Names of the manifest's files that `folder` lacks or holds with other contents."""
    stamp_path = folder / STAMP
    try:
        stamps = json.loads(stamp_path.read_text())
    except (OSError, ValueError):
        stamps = {}
    wanted, fresh = [], {}
    for name, info in manifest.files.items():
        path = folder / name
        try:
            st = path.stat()
        except OSError:
            wanted.append(name)
            continue
        key = [st.st_size, st.st_mtime_ns]
        if st.st_size != info["size"]:
            wanted.append(name)
        elif stamps.get(name) == key + [info["sha256"]] or file_sha256(path) == info["sha256"]:
            fresh[name] = key + [info["sha256"]]
        else:
            wanted.append(name)
    if fresh and folder.exists():
        _write_stamp(folder, fresh)
    return wanted


def _write_stamp(folder: Path, stamps: dict) -> None:
    tmp = folder / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamps))
    tmp.rename(folder / STAMP)


def _send_bytes(comm, data: np.ndarray, dest: int, tag: int, what: str) -> None:
    comm.exchange([(np.array([data.size], dtype=np.int64), dest)], [], tag, what)
    comm.exchange([(data, dest)], [], tag, what)


def _recv_bytes(comm, source: int, tag: int, what: str, grace: float = 0.0) -> np.ndarray:
    n = np.zeros(1, dtype=np.int64)
    comm.exchange([], [(n, source)], tag, what, grace=grace)
    data = np.empty(int(n[0]), dtype=np.uint8)
    comm.exchange([], [(data, source)], tag, what)
    return data


def ship(comm, root: Path, my_root: Path, progress=None, log=print, wait: float = 600.0) -> None:
    """Collective: afterwards rank r holds a verified copy of rank0's `root/rank{r}` in `my_root/rank{r}`.

    Ranks are served one after the other (rank 0's link is the bottleneck anyway); a rank waits up to
    `wait` seconds more than --comm-timeout for its turn."""
    if comm.size == 1:
        return
    if comm.rank == 0:
        for r in range(1, comm.size):
            folder = root / f"rank{r}"
            manifest = (folder / MANIFEST).read_bytes()
            Manifest.from_bytes(manifest, folder / MANIFEST)        # checked before it is sent
            _send_bytes(comm, np.frombuffer(manifest, dtype=np.uint8), r, TAG_MANIFEST, f"sending rank {r} its manifest")
            wanted = json.loads(_recv_bytes(comm, r, TAG_WANTED, f"asking rank {r} what it lacks").tobytes())
            if not wanted:
                continue
            total = sum((folder / name).stat().st_size for name in wanted)
            log(f"shipping {len(wanted)} file(s), {total / 2**20:.1f} MiB, to rank {r}")
            bar = progress(total=total, desc=f"ship to rank {r}", unit="B", unit_scale=True) if progress else None
            for name in wanted:
                with open(folder / name, "rb") as f:
                    while chunk := f.read(CHUNK):
                        comm.exchange([(np.frombuffer(chunk, dtype=np.uint8), r)], [], TAG_DATA,
                                      f"shipping {name} to rank {r}")
                        bar and bar.update(len(chunk))
            bar and bar.close()
        return
    # the manifest may be a while in coming: rank 0 serves the ranks before this one first
    raw = _recv_bytes(comm, 0, TAG_MANIFEST, "waiting for the manifest from rank 0 (it ships to the ranks before "
                      "this one first)", grace=wait).tobytes()
    folder = my_root / f"rank{comm.rank}"
    manifest = Manifest.from_bytes(raw, f"rank 0's {MANIFEST} for rank {comm.rank}")
    folder.mkdir(parents=True, exist_ok=True)
    wanted = stale_files(folder, manifest)
    if wanted and (folder / MANIFEST).exists():
        (folder / MANIFEST).unlink()            # the folder is not valid until every file is
    _send_bytes(comm, np.frombuffer(json.dumps(wanted).encode(), dtype=np.uint8), 0, TAG_WANTED, "telling rank 0")
    stamps = {}
    for name in wanted:
        stamps[name] = _receive_file(comm, folder / name, manifest.files[name])
    if wanted:
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_bytes(raw)
        tmp.rename(folder / MANIFEST)
        old = json.loads((folder / STAMP).read_text()) if (folder / STAMP).exists() else {}
        _write_stamp(folder, old | stamps)


def _receive_file(comm, path: Path, info: dict) -> list:
    tmp = path.with_name(path.name + ".tmp")
    h = hashlib.sha256()
    buf = np.empty(CHUNK, dtype=np.uint8)
    with open(tmp, "wb") as f:
        left = info["size"]
        while left:
            part = buf[:min(CHUNK, left)]
            comm.exchange([], [(part, 0)], TAG_DATA, f"receiving {path.name}")
            f.write(part.tobytes())
            h.update(part)
            left -= part.size
        f.flush()
        os.fsync(f.fileno())
    if h.hexdigest() != info["sha256"]:
        tmp.unlink()
        raise ShardError(f"{path.name} arrived from rank 0 with the wrong checksum: the copy on rank 0 is corrupt; "
                         f"prepare the model again")
    tmp.rename(path)
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, info["sha256"]]
