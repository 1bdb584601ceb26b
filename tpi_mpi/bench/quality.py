"""`bench quality`: what quantizing at prepare costs in quality: perplexity on a fixed paragraph, and
how many greedy tokens agree with floats (continuing the paragraph, and answering the default chat
prompt), for each --quant on the same Hugging Face checkpoint; or, on a GGUF file, what the int8
kernels cost against the exact path (modes keep:exact,keep:int8); a mode ending in +bf16 or +q8
compares an allreduce payload instead (keep:exact,keep:exact+bf16,keep:exact+q8, at 2 ranks or more).

Each mode is one `python -m tpi_mpi generate` run (under mpirun for 2 ranks or more) with a cache
folder of this benchmark's own, computing in float32 so that only the storage differs. Perplexity
is exp of the mean negative log-likelihood of each paragraph token given the ones before it, from
the logits at every prompt position (--dump-prompt-logits).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..options import DEFAULT_PROMPT
from .generate import append_json, git_commit

PARAGRAPH = (
    "The committee met on a cold morning in early spring to discuss the new library. Most members agreed "
    "that the old building could no longer hold the collection, and that the town needed a place where "
    "children could read after school. After a long debate about the budget, they voted to build it near "
    "the river, where the land was cheap and the view was pleasant."
)


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp(mean -log p(ids[t + 1] | ids[..t])) from the logits at every position (float64 softmax)."""
    x = logits[:-1].astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def parse_mode(mode: str) -> tuple[str, str, str, str, str]:
    """'QUANT[@DTYPE][:MATMUL][/KV][+PAYLOAD]' -> (quant, dtype, matmul, kv dtype, allreduce payload):
    dtype fp32, matmul exact, kv auto (fp32 with dtype fp32) and payload fp32 unless given."""
    mode, _, payload = mode.partition("+")
    mode, _, kv = mode.partition("/")
    rest, _, matmul = mode.partition(":")
    quant, _, dtype = rest.partition("@")
    return quant, dtype or "fp32", matmul or "exact", kv or "auto", payload or "fp32"


def bench_quality(model: str, quants: list[str], ranks: int, new_tokens: int, out: str | None,
                  text: str = PARAGRAPH) -> list[dict]:
    gguf = str(model).endswith(".gguf")
    if not gguf and not (Path(model) / "config.json").exists():
        raise ConfigError(f"--model {model}: give a Hugging Face folder (quantizing at prepare starts from floats) "
                          f"or a .gguf file (modes keep:exact, keep:int8)")
    if gguf and any(parse_mode(q)[0] not in ("keep", "auto") for q in quants):
        raise ConfigError(f"--model {model}: a GGUF file keeps its own types: use modes keep:exact, keep:int8")
    if ranks < 2 and any(parse_mode(q)[4] != "fp32" for q in quants):
        raise ConfigError("an allreduce payload (+bf16, +q8) needs --ranks 2 or more: one rank sums nothing")
    work = Path(tempfile.mkdtemp(prefix="tpi-quality-"))
    env = os.environ | {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    launch = ["mpirun", "--oversubscribe", "-n", str(ranks)] if ranks > 1 else []
    records = []

    def generate(mode: str, cache: Path, *args: str) -> dict:
        q, dtype, matmul, kv, payload = parse_mode(mode)     # "none@bf16": floats computed in bf16, a yardstick
        cmd = launch + [sys.executable, "-m", "tpi_mpi", "generate", "--model", model, "--quant", q,
                        "--dtype", dtype, "--matmul", matmul, "--kv-dtype", kv, "--allreduce-payload", payload,
                        *(["--allreduce", "star"] if payload != "fp32" else []),
                        "--cache-dir", str(cache), "--temperature", "0", "--ignore-eos", "--max-new-tokens",
                        str(new_tokens), "--json", "--quiet", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise ConfigError(f"mode {mode}: generate failed: {(r.stderr.strip().splitlines() or [''])[-1]}")
        return json.loads(r.stdout)

    try:
        for i, q in enumerate(quants):
            logits, following = work / f"mode{i}.npy", work / f"mode{i}-next.npy"      # a mode may hold a "/"
            cache = work / f"cache{i}"      # a mode's own: keep:exact and keep:int8 prepare different folders
            g = generate(q, cache, "--prompt", text, "--dump-prompt-logits", str(logits), "--dump-logits", str(following))
            chat = generate(q, cache, "--prompt", DEFAULT_PROMPT, "--chat")
            first = np.sort(np.load(following))
            shard = sum(f.stat().st_size for f in cache.glob("*/rank*/*.safetensors"))
            records.append({"bench": "quality", "model": model, "quant": q, "ranks": ranks,
                            "perplexity": perplexity(np.load(logits), g["prompt_ids"]),
                            "prompt_tokens": len(g["prompt_ids"]), "generated_ids": g["generated_ids"],
                            "first_token_margin": float(first[-1] - first[-2]), "chat_ids": chat["generated_ids"],
                            "shard_bytes": shard, "commit": git_commit()})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = next((r for r in records if r["quant"] in ("none", "keep:exact")), records[0])

    def agreement(a: list[int], b: list[int]) -> int:
        """How many leading tokens agree."""
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    print(f"{'quant':>16} {'shard MB':>9} {'perplexity':>10} {'vs ' + base['quant']:>8} "
          f"{'same greedy tokens: paragraph':>30} {'chat prompt':>12}")
    for rec in records:
        rec["same_tokens_as_" + base["quant"]] = same = agreement(rec["generated_ids"], base["generated_ids"])
        rec["same_chat_tokens_as_" + base["quant"]] = same_chat = agreement(rec["chat_ids"], base["chat_ids"])
        print(f"{rec['quant']:>16} {rec['shard_bytes'] / 1e6:9.1f} {rec['perplexity']:10.3f} "
              f"{rec['perplexity'] / base['perplexity']:8.3f} {f'{same} of {new_tokens}':>30} "
              f"{f'{same_chat} of {new_tokens}':>12}", flush=True)
        append_json(out, rec)
    print(f"the paragraph's first new token: top-2 logit margin {base['first_token_margin']:.3f} ({base['quant']})")
    return records
