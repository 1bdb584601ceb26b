"""Try every bad input of issue 7 against the real command line (under mpirun) and print a Markdown
table of how each run ended (exit code, seconds, the error line): the table of docs/errors.md. The
Hub's cases (--model org/name) ask a local Hub (tests/fake_hub.py) through HF_ENDPOINT.

    python tools/bad_input_table.py            # print the table
    python tools/bad_input_table.py --write    # replace the table in docs/errors.md with it

Paths under the run's temporary folder are shown as "…/" and a cache key's digest as "…"; what still
changes from run to run is measured (the seconds, and a memory minimum that counts the process's
resident memory). tests/test_docs.py (mpi tier) checks that docs/errors.md holds this output, the
measured figures aside (`comparable`).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from conftest import mpi_env, mpirun_cmd, run_mpi  # noqa: E402
from fake_hub import FakeHub  # noqa: E402

DOC = ROOT / "docs" / "errors.md"
HEADER = ["| case | ranks | exit | seconds | traceback | what the user sees (stderr) |",
          "|---|---|---|---|---|---|"]
SECONDS = 3                                     # the column of seconds
CLOSED_PORT = "http://127.0.0.1:9"              # a Hub nothing answers at: no network
HUB_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
MEASURED_MIB = re.compile(r"it needs at least [\d.]+ MiB")     # plan_window's minimum includes the RSS


def make_cases(tmp: Path, hub: FakeHub) -> list[tuple[str, list[str], int, dict]]:
    """(case, command line, ranks, environment) for every bad input, with the files they need made in
    `tmp`, and the Hub's models on `hub` (a local Hub: this machine cannot reach the real one)."""
    model = make_checkpoint(tmp / "model", "mistral")
    cache = str(tmp / "cache")
    base = ["generate", "--model", str(model), "--cache-dir", cache, "--prompt", "hello", "--quiet"]
    notmodel = tmp / "notes.txt"
    notmodel.write_text("just text")
    nocfg = tmp / "nocfg"
    shutil.copytree(model, nocfg)
    cfg = json.loads((nocfg / "config.json").read_text())
    del cfg["hidden_size"]
    (nocfg / "config.json").write_text(json.dumps(cfg))
    arch = tmp / "arch"
    shutil.copytree(model, arch)
    (arch / "config.json").write_text(json.dumps({**cfg, "hidden_size": 64, "model_type": "gpt_neox"}))
    trunc = tmp / "trunc"
    shutil.copytree(model, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    notok = tmp / "notok"
    shutil.copytree(model, notok)
    (notok / "tokenizer.json").unlink()
    gguf_bad = tmp / "bad.gguf"
    gguf_bad.write_bytes(b"GGUF" + b"\0" * 20)
    subprocess.run([sys.executable, "-m", "tpi_mpi", "prepare", str(model), "-n", "2", "--out", str(tmp / "p2"), "--quiet"],
                   check=True, env=mpi_env())
    corrupt = tmp / "corrupt"
    shutil.copytree(tmp / "p2", corrupt)
    block = corrupt / "rank1" / "layer000.mlp.safetensors"
    b = bytearray(block.read_bytes())
    b[-2] ^= 1
    block.write_bytes(bytes(b))
    othertok = tmp / "othertok"              # the same vocabulary size, two ids swapped: another tokenizer
    shutil.copytree(model, othertok)
    tok = json.loads((othertok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["e"], vocab["t"] = vocab["t"], vocab["e"]
    (othertok / "tokenizer.json").write_text(json.dumps(tok))
    outside = tmp / "outside"
    shutil.copytree(tmp / "p2", outside)
    mf = json.loads((outside / "rank1" / "manifest.json").read_text())
    mf["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (outside / "rank1" / "manifest.json").write_text(json.dumps(mf))
    hub.add("acme/private", model, private=True)
    hub.add("acme/gated", model, gated=True)
    hub.add("acme/tiny-GGUF", {"tiny-Q4_K_M.gguf": b"GGUF", "tiny-Q8_0.gguf": b"GGUF"})
    online = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp / "hf")}
    hub_cases = [
        ("Hub: no such model", ["generate", "--model", "acme/nope", "--prompt", "x", "--quiet"], 2, online),
        ("Hub: a private model without a token", ["generate", "--model", "acme/private", "--prompt", "x", "--quiet"], 2,
         online),
        ("Hub: a gated model without a token", ["generate", "--model", "acme/gated", "--prompt", "x", "--quiet"], 2,
         online),
        ("Hub: no file for the quant", ["generate", "--model", "acme/tiny-GGUF:Q5_K_S", "--prompt", "x", "--quiet"], 2,
         online),
        ("Hub: no network", ["generate", "--model", "acme/tiny", "--prompt", "x", "--quiet"], 2,
         {**online, "HF_ENDPOINT": CLOSED_PORT}),
        ("Hub: offline, nothing cached", ["generate", "--model", "acme/tiny", "--prompt", "x", "--quiet"], 2,
         {**online, "HF_HUB_OFFLINE": "1"}),
    ]
    return [(*case, {}) for case in [
        ("model path missing", ["generate", "--model", str(tmp / "nope"), "--prompt", "x", "--quiet"], 2),
        ("a file that is no model", ["generate", "--model", str(notmodel), "--prompt", "x", "--quiet"], 2),
        ("truncated safetensors", ["generate", "--model", str(trunc), "--cache-dir", cache, "--prompt", "x", "--quiet"], 2),
        ("corrupt GGUF", ["generate", "--model", str(gguf_bad), "--cache-dir", cache, "--prompt", "x", "--quiet"], 2),
        ("config.json without hidden_size", ["generate", "--model", str(nocfg), "--prompt", "x", "--quiet"], 2),
        ("unsupported architecture", ["generate", "--model", str(arch), "--prompt", "x", "--quiet"], 2),
        ("tokenizer missing", ["generate", "--model", str(notok), "--cache-dir", cache, "--prompt", "x", "--quiet"], 2),
        ("more ranks than query heads", base, 5),
        ("--ratio of the wrong length", base + ["--ratio", "1,1,1"], 2),
        ("--ratio with a zero part", base + ["--ratio", "1,0"], 2),
        ("--ratio with a negative part", base + ["--ratio", "1,-2"], 2),
        ("shards prepared for another world size", ["generate", "--model", str(tmp / "p2"), "--prompt", "x", "--quiet"], 3),
        ("shards prepared with another ratio", ["generate", "--model", str(tmp / "p2"), "--ratio", "3,1", "--prompt", "x", "--quiet"], 2),
        ("a shard whose checksum disagrees", ["generate", "--model", str(corrupt), "--prompt", "x", "--quiet"], 2),
        ("a manifest naming a file outside its folder", ["generate", "--model", str(outside), "--prompt", "x", "--quiet"], 2),
        ("empty prompt", base[:-3] + ["--prompt", "", "--quiet"], 2),
        ("prompt longer than the context", base[:-3] + ["--prompt", "word " * 400, "--quiet"], 2),
        ("--max-new-tokens 0", base + ["--max-new-tokens", "0"], 2),
        ("temperature < 0", base + ["--temperature", "-0.5"], 2),
        ("top-p outside (0, 1]", base + ["--top-p", "0"], 2),
        ("window < 1", base + ["--window", "0"], 2),
        ("memory budget below the minimum", base + ["--memory-budget", "50MB"], 2),
        ("a compressed payload with --allreduce mpi", base + ["--allreduce", "mpi", "--allreduce-payload", "q8"], 2),
        ("a draft model with another tokenizer", base + ["--draft", str(othertok)], 2),
    ]] + hub_cases


def run(args: list[str], n: int, tmp: Path, hub_env: dict) -> tuple[int, float, str, bool]:
    """(exit code, seconds, the line that explains, whether a traceback was printed) of one run."""
    cmd = mpirun_cmd(n) + [sys.executable, "-m", "tpi_mpi", *args]
    env = {k: v for k, v in mpi_env().items() if k not in HUB_VARIABLES} | hub_env    # no token of this machine
    t0 = time.monotonic()
    # run_mpi: once more when Open MPI's launcher failed before any rank started (exit 213), as the tests do
    r = run_mpi(cmd, capture_output=True, text=True, timeout=300, env=env, stdin=subprocess.DEVNULL)
    lines = [line for line in r.stderr.splitlines() if line.startswith("tpi_mpi:") and "error" in line] or \
        [line for line in r.stderr.splitlines() if "error" in line.lower() and not line.startswith("-")]
    shown = lines[0] if lines else (r.stderr.strip().splitlines() or [""])[-1]
    shown = re.sub(r"-[0-9a-f]{16}/", "-…/", shown.strip().replace(f"{tmp}/", "…/"))   # cache_key's digest
    if hub_env.get("HF_ENDPOINT", CLOSED_PORT) != CLOSED_PORT:                          # the local Hub's port
        shown = shown.replace(hub_env["HF_ENDPOINT"], "http://127.0.0.1:…")
    return r.returncode, time.monotonic() - t0, shown, "Traceback" in r.stderr


def table() -> list[str]:
    """The Markdown table, one line per case (header first)."""
    tmp = Path(tempfile.mkdtemp())
    try:
        rows = list(HEADER)
        with FakeHub() as hub:
            cases = make_cases(tmp, hub)
            for name, args, n, hub_env in cases:
                code, took, line, tb = run(args, n, tmp, hub_env)
                quoted = f"`` {line} ``" if "`" in line else f"`{line}`"      # a code span around backticks
                rows.append(f"| {name} | {n} | {code} | {took:.1f} | {'yes' if tb else 'no'} | {quoted} |")
                print(rows[-1], file=sys.stderr, flush=True)
        return rows
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def comparable(row: str) -> list[str]:
    """A table line's cells with the measured figures replaced by what they are."""
    cells = MEASURED_MIB.sub("it needs at least (MiB)", row).split(" | ")
    if len(cells) > SECONDS and re.fullmatch(r"\d+\.\d", cells[SECONDS]):
        cells[SECONDS] = "(seconds)"
    return cells


def doc_table(text: str) -> tuple[int, int]:
    """[start, stop) of the table's lines in docs/errors.md's text (split into lines)."""
    lines = text.splitlines()
    start = lines.index(HEADER[0])
    stop = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return start, stop


def main() -> None:
    rows = table()
    if sys.argv[1:] == ["--write"]:
        lines = DOC.read_text().splitlines()
        start, stop = doc_table(DOC.read_text())
        DOC.write_text("\n".join(lines[:start] + rows + lines[stop:]) + "\n")
    else:
        print("\n".join(rows))


if __name__ == "__main__":
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    main()
