"""A Hugging Face Hub on 127.0.0.1, as far as huggingface_hub's downloads use it, reached through
HF_ENDPOINT: the tests cannot reach the real one.

What huggingface_hub (2.x) asks, read from its file_download.py, _snapshot_download.py, hf_api.py and
utils/_http.py:
- GET /api/models/{repo}/revision/{rev}: the model's info, JSON with `id`, `sha` (the commit) and
  `siblings` ([{"rfilename"}]);
- GET /api/models/{repo}/tree/{rev}?recursive=...: the files, [{"type": "file", "path", "size", "oid"}]
  (one page: no Link header);
- HEAD and GET /{repo}/resolve/{rev}/{file}: the file, with the headers huggingface_hub requires:
  X-Repo-Commit (else "does not seem to be served by a Hugging Face Hub endpoint") and ETag (else "won't
  be able to reliably ensure reproducibility"); Content-Length is the size; a GET with `Range: bytes=N-`
  gets 206 and the rest (how huggingface_hub resumes a download cut off);
- errors as X-Error-Code headers: RepoNotFound (404; 401 for a private repo without its token),
  GatedRepo (401 on a gated repo's files without a token), RevisionNotFound, EntryNotFound.

Every request is logged (method, path, Range) in `requests`; `cut_after[file] = n` sends only the first n
bytes of that file's next GET, then drops the connection.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

TOKEN = "hf_fake_token_for_tests"


@dataclass
class Repo:
    files: dict[str, bytes]
    gated: bool = False
    private: bool = False
    sha: str = ""

    def __post_init__(self) -> None:
        h = hashlib.sha1()
        for name in sorted(self.files):
            h.update(name.encode() + hashlib.sha256(self.files[name]).digest())
        self.sha = h.hexdigest()


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)

    def add(self, repo: str, source: Path | dict[str, bytes], **kw) -> Repo:
        """A repo of the files in folder `source` (or a dict of name -> bytes)."""
        if isinstance(source, Path):
            files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
        else:
            files = dict(source)
        self.repos[repo] = Repo(files, **kw)
        return self.repos[repo]

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:      # quiet: the tests read `requests`
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def gets(self, file: str) -> list[str | None]:
        """The Range header of every GET of `file` (None: the whole file)."""
        return [rng for method, path, rng in self.requests if method == "GET" and path.endswith("/" + file)
                and "/resolve/" in path]

    # -- answering --------------------------------------------------------------------------------------

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo_id = "/".join(parts[:2])
        repo = self.repos.get(repo_id)
        authorized = h.headers.get("Authorization") == f"Bearer {TOKEN}"
        if repo is None or (repo.private and not authorized):
            return self.error(h, 401 if repo else 404, "RepoNotFound", "Repository not found")
        rest = parts[2:]
        if api:
            kind, rev = (rest + ["revision", "main"])[:2] if rest else ("revision", "main")
            if rev not in ("main", repo.sha):
                return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}")
            if kind == "tree":
                data = [{"type": "file", "path": n, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                        for n, b in sorted(repo.files.items())]
            else:
                data = {"id": repo_id, "modelId": repo_id, "sha": repo.sha, "private": repo.private,
                        "gated": "auto" if repo.gated else False, "tags": [],
                        "siblings": [{"rfilename": n} for n in sorted(repo.files)]}
            return self.send(h, 200, json.dumps(data).encode(), {"Content-Type": "application/json"}, body)
        if len(rest) < 3 or rest[0] != "resolve":
            return self.error(h, 404, None, "Not found")
        rev, name = rest[1], "/".join(rest[2:])
        if rev not in ("main", repo.sha):
            return self.error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", repo)
        if repo.gated and not authorized:
            return self.error(h, 401, "GatedRepo", f"Access to model {repo_id} is restricted.", repo)
        if name not in repo.files:
            return self.error(h, 404, "EntryNotFound", "Entry not found", repo)
        self.send_file(h, repo, name, body)

    def send_file(self, h, repo: Repo, name: str, body: bool) -> None:
        data = repo.files[name]
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        rng = h.headers.get("Range")
        if body and rng and rng.startswith("bytes="):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            return self.send(h, 206, data[start:], headers, body)
        cut = self.cut_after.pop(name, None) if body else None
        if cut is None:
            return self.send(h, 200, data, headers, body)
        h.send_response(200)               # the whole length promised, part of it sent, then the line drops
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data[:cut])
        h.wfile.flush()
        h.close_connection = True
        h.connection.shutdown(2)

    def error(self, h, status: int, code: str | None, message: str, repo: Repo | None = None) -> None:
        headers = {"X-Error-Message": message, "Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if repo is not None:
            headers["X-Repo-Commit"] = repo.sha
        self.send(h, status, json.dumps({"error": message}).encode(), headers, h.command != "HEAD")

    @staticmethod
    def send(h, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            h.send_header(k, v)
        h.end_headers()
        if body:
            h.wfile.write(data)
