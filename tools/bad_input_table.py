"""Try every bad input of issue 7 against the real command line and print a Markdown table of how
each run ended (exit code, seconds, the error line). Used to make the README's table:

    python tools/bad_input_table.py > /tmp/table.md
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoints import make_checkpoint  # noqa: E402
from conftest import mpi_env, mpirun_cmd  # noqa: E402


def run(args, n=2):
    cmd = (mpirun_cmd(n) if n > 1 else []) + [sys.executable, "-m", "tpi_mpi", *args]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=mpi_env(), stdin=subprocess.DEVNULL)
    lines = [line for line in r.stderr.splitlines() if line.startswith("tpi_mpi:") and "error" in line] or \
        [line for line in r.stderr.splitlines() if "error" in line.lower() and not line.startswith("-")]
    shown = lines[0] if lines else (r.stderr.strip().splitlines() or [""])[-1]
    return r.returncode, time.monotonic() - t0, shown, "Traceback" in r.stderr


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
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
    outside = tmp / "outside"
    shutil.copytree(tmp / "p2", outside)
    mf = json.loads((outside / "rank1" / "manifest.json").read_text())
    mf["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (outside / "rank1" / "manifest.json").write_text(json.dumps(mf))
    cases = [
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
    ]
    print("| case | ranks | exit | seconds | traceback | what the user sees (stderr) |")
    print("|---|---|---|---|---|---|")
    for name, args, n in cases:
        code, took, line, tb = run(args, n)
        print(f"| {name} | {n} | {code} | {took:.1f} | {'yes' if tb else 'no'} | `{line.strip()[:200]}` |", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    main()
