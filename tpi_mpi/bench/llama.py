"""`bench llama`: llama.cpp's own `llama-bench` on a GGUF file, the baseline beside transformers.

One llama-bench run per thread count (`-o json -t T -p P -n N -r R`: a prefill test of P prompt
tokens and a decode test of N tokens from an empty context, each repeated R times after llama-bench's
own warm-up run); `pin` runs it under `taskset -c 0-(T-1)`. Figures are medians of the repeats, with
their spread. llama.cpp is never built or imported here: the binary is found on PATH or given.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from ..errors import ConfigError
from .record import append_json, host_fields, print_row

BUILD_HINT = ("build it from llama.cpp's source (cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF "
              "&& cmake --build build --target llama-bench; see docs/llama-baseline.md) and put build/bin on PATH, "
              "or give --llama-bench PATH")
COLUMNS = [("runner", 9, "{}"), ("threads", 7, "{}"), ("taskset", 7, "{}"), ("prompt_tokens", 13, "{}"),
           ("prompt_s", 8, "{:.3f}"), ("s_per_prompt_token", 18, "{:.5f}"), ("prefill_tok_s", 13, "{:.1f}"),
           ("new_tokens", 10, "{}"), ("s_per_token", 11, "{:.4f}"), ("tokens_per_s", 12, "{:.2f}"),
           ("decode_spread", 13, "{:.1%}")]
BUILD_FIELDS = ("build_number", "build_commit", "cpu_info", "backends", "model_type", "model_size",
                "model_n_params", "n_batch", "n_ubatch", "type_k", "type_v", "flash_attn")


def find_llama_bench(path: str | None) -> str:
    """The llama-bench binary: `path` if given, else the one on PATH; a ConfigError naming the fix."""
    if path:
        p = Path(path)
        if p.is_dir():
            p = p / "llama-bench"
        if not (p.is_file() and shutil.which(str(p))):
            raise ConfigError(f"--llama-bench {path}: no executable llama-bench there: {BUILD_HINT}")
        return str(p)
    found = shutil.which("llama-bench")
    if not found:
        raise ConfigError(f"llama-bench is not on PATH: {BUILD_HINT}")
    return found


def llama_bench_command(binary: str, model: str, threads: int, n_prompt: int, n_gen: int, repeats: int,
                        pin: bool = False) -> list[str]:
    """One llama-bench run: a prefill test (-p) and a decode test (-n) at `threads` threads, JSON on stdout."""
    cmd = [binary, "-m", model, "-o", "json", "-t", str(threads), "-p", str(n_prompt), "-n", str(n_gen),
           "-r", str(repeats)]
    return (["taskset", "-c", cpu_list(threads)] if pin else []) + cmd


def cpu_list(threads: int) -> str:
    return "0" if threads == 1 else f"0-{threads - 1}"


def run_llama_bench(cmd: list[str]) -> list[dict]:
    """Run llama-bench and return its JSON tests (one dict per test, samples_ns per repeat)."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise ConfigError(f"{cmd[0]} did not start: {e}") from None
    if r.returncode:
        why = [line for line in r.stderr.splitlines() if line.strip()][-1:] or [f"exit {r.returncode}"]
        raise ConfigError(f"llama-bench failed (exit {r.returncode}): {why[0].strip()}  [{' '.join(cmd)}]")
    start = r.stdout.find("[")
    try:
        tests = json.loads(r.stdout[start:]) if start >= 0 else None
    except ValueError:
        tests = None
    if not isinstance(tests, list) or not all(isinstance(t, dict) and "samples_ns" in t for t in tests):
        raise ConfigError(f"llama-bench printed no JSON list of tests (is it llama.cpp's llama-bench?): "
                          f"{r.stdout[:200]!r}")
    return tests


def figures(test: dict) -> dict:
    """A test's repeats in seconds, their median and relative spread ((max - min) / median)."""
    samples = [ns / 1e9 for ns in test["samples_ns"]]
    med = statistics.median(samples)
    return {"samples_s": samples, "median_s": med, "spread": (max(samples) - min(samples)) / med if med else None}


def threads_record(tests: list[dict], threads: int, pinned: str | None) -> dict:
    """One row: the prefill test (n_gen 0) as prompt_s and s per prompt token, the decode test
    (n_prompt 0) as s per token; the llama.cpp build and model as llama-bench reported them.
    `pinned`: taskset's CPU list (None: not pinned)."""
    record = {"runner": "llama.cpp", "threads": threads, "taskset": pinned}
    first = tests[0] if tests else {}
    record["llama_cpp"] = {k: first[k] for k in BUILD_FIELDS if k in first}
    for t in tests:
        f = figures(t)
        if t.get("n_gen", 0) == 0 and t.get("n_prompt", 0) > 0:
            n = t["n_prompt"]
            record |= {"prompt_tokens": n, "prompt_s": f["median_s"], "s_per_prompt_token": f["median_s"] / n,
                       "prefill_tok_s": n / f["median_s"], "prefill_spread": f["spread"],
                       "prefill_samples_s": f["samples_s"]}
        elif t.get("n_prompt", 0) == 0 and t.get("n_gen", 0) > 0:
            n = t["n_gen"]
            record |= {"new_tokens": n, "s_per_token": f["median_s"] / n, "tokens_per_s": n / f["median_s"],
                       "decode_spread": f["spread"], "decode_samples_s": f["samples_s"]}
    return record


def bench_llama(model: str, binary: str | None, threads: list[int], n_gen: int, n_prompt: int, repeats: int,
                pin: bool, out: str | None) -> list[dict]:
    """Run llama-bench per thread count; print a row and append a JSON line each."""
    if not Path(model).is_file():
        raise ConfigError(f"--model {model}: no such file (bench llama takes a .gguf file)")
    if not threads or min(threads) < 1 or repeats < 1 or n_gen < 0 or n_prompt < 0 or not (n_gen or n_prompt):
        raise ConfigError("bench llama: --threads counts and --repeats must be at least 1, and --n-gen or "
                          "--n-prompt above 0")
    if pin and not shutil.which("taskset"):
        raise ConfigError("--pin needs taskset (util-linux)")
    binary = find_llama_bench(binary)
    records = []
    for i, t in enumerate(threads):
        cmd = llama_bench_command(binary, model, t, n_prompt, n_gen, repeats, pin)
        host = host_fields()                                    # the load before the run, and after it
        record = {**threads_record(run_llama_bench(cmd), t, cpu_list(t) if pin else None), "model": model,
                  "repeats": repeats, "llama_bench": binary, "command": cmd, **host,
                  "load_avg_after": [round(x, 2) for x in os.getloadavg()]}
        print_row(COLUMNS, record, header=i == 0)
        append_json(out, record)
        records.append(record)
    return records
