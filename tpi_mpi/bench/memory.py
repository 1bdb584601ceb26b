"""`bench memory` (each rank a small device: memory and disk reads capped by cgroups) and `bench
transformers`, the same model through transformers in one process (the reference a user would
compare against; transformers is a bench-only import here).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .generate import GENERATE_COLUMNS, append_json, git_commit, print_row, synthetic_prompt
from ..config import format_size
from ..errors import ConfigError
from ..startup import peak_rss_mib
from ..weights import available_memory


def bench_transformers(model: str, threads: int, prompt_tokens: int, new_tokens: int, warmup: int,
                       dtype: str, out: str | None, offload: bool = False, cap: int | None = None,
                       disk_rate: int | None = None) -> None:
    """The same measurement with transformers in one process, KV cache on, greedy. `offload`: as
    transformers + accelerate run a model larger than memory, the layers that do not fit read from
    the checkpoint on disk at every forward pass. `cap`, `disk_rate`: see device_limits."""
    if (cap or disk_rate) and "TPI_BENCH_LIMITED" not in os.environ:
        with device_limits(["tpi_bench_transformers"], cap, disk_rate, model) as controllers:
            cmd = ["sh", "-c", join_script(controllers, "tpi_bench_transformers"), "sh", sys.executable, "-m",
                   "tpi_mpi", *sys.argv[1:]]
            r = subprocess.run(cmd, env=os.environ | {"TPI_BENCH_LIMITED": "1"})
            if r.returncode:
                why = "killed for memory (the cgroup's limit)" if r.returncode in (-9, 137) else f"exit {r.returncode}"
                raise ConfigError(f"bench transformers in its cgroup failed: {why}")
        return
    try:
        import transformers
    except ImportError:
        raise ConfigError("bench transformers needs transformers: pip install 'tpi_mpi[bench]'") from None
    import tempfile
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)   # transformers renaming its cache argument
    torch.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    path = Path(model)
    kw = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    in_memory = None
    if offload:
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ConfigError("bench transformers --offload needs accelerate: pip install 'tpi_mpi[bench]'") from None
        # what may hold weights: the cap less this process so far, two decoder layers (one being
        # read while one computes) and room for activations and the KV cache
        layer = decoder_layer_bytes(path, torch_dtype)
        in_memory = max(0, (cap or available_memory()) - int(peak_rss_mib() * 2**20) - 2 * layer - (256 << 20))
        # only used for weights that are not safetensors already; removed when this process ends
        offload_dir = tempfile.TemporaryDirectory(prefix="tpi-offload-")
        kw.update(device_map="auto", max_memory={"cpu": in_memory}, offload_folder=offload_dir.name)
    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(path.parent if "gguf_file" in kw else path,
                                                          dtype=torch_dtype, **kw).eval()
    load_s = time.perf_counter() - t0
    prompt = synthetic_prompt(m.config.vocab_size, prompt_tokens)

    @torch.inference_mode()
    def run(ids: list[int], n: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        out = m(torch.tensor([ids]), use_cache=True)
        token = out.logits[0, -1].argmax()
        ttft = time.perf_counter() - t0
        past, steps = out.past_key_values, []
        for _ in range(n - 1):
            t = time.perf_counter()
            out = m(token.view(1, 1), past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax()
            steps.append(time.perf_counter() - t)
        return ttft, steps

    if warmup:
        run(prompt[:8], warmup)
    ttft, steps = run(prompt, new_tokens)
    places = list(getattr(m, "hf_device_map", {}).values())
    record = {
        "runner": "transformers+accelerate offload" if offload else "transformers", "model": model, "dtype": dtype,
        "ranks": 1, "threads": threads, "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "load_s": load_s,
        "ttft_s": ttft, "prefill_tok_s": prompt_tokens / ttft, "s_per_token": float(np.mean(steps)),
        "tokens_per_s": 1 / float(np.mean(steps)), "max_rss_MiB": peak_rss_mib(), "memory_cap": cap,
        "disk_rate": disk_rate, "offload_in_memory_bytes": in_memory, "modules_on_disk": places.count("disk") if offload else 0,
        "modules": len(places) if offload else None,
        "transformers": transformers.__version__, "host": platform.node(), "cpus": os.cpu_count(),
        "commit": git_commit(), "time": time.strftime("%FT%T"),
    }
    print_row(GENERATE_COLUMNS, record)
    append_json(out, record)


def decoder_layer_bytes(path: Path, dtype: torch.dtype) -> int:
    """One decoder layer's weights, from a Hugging Face config.json (0 for other formats)."""
    try:
        c = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    dim, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim = c.get("head_dim") or dim // heads
    kv = c.get("num_key_value_heads", heads)
    params = dim * head_dim * (2 * heads + 2 * kv) + 3 * dim * c["intermediate_size"]
    return params * torch.finfo(dtype).bits // 8


CGROUP_ROOT = "/sys/fs/cgroup"


@contextmanager
def device_limits(names: list[str], cap: int | None = None, disk_rate: int | None = None,
                  folder: str | Path = "."):
    """Per name, cgroup v1 groups that make the processes joining them a small device: memory
    limited to `cap` bytes (page cache counts there too, so a run that streams weights is not served
    from memory), and reads from the disk holding `folder` limited to `disk_rate` bytes/s (a device
    with a disk of its own that fast). Removed afterwards. Yields the controllers to join."""
    limits = [("memory", "memory.limit_in_bytes", str(cap))] if cap else []
    if disk_rate:
        limits.append(("blkio", "blkio.throttle.read_bps_device", f"{disk_of(folder)} {disk_rate}"))
    made = []
    try:
        for name in names:
            for controller, file, value in limits:
                group = f"{CGROUP_ROOT}/{controller}/{name}"
                try:
                    os.makedirs(group, exist_ok=True)
                    made.append(group)
                    Path(group, file).write_text(value)
                except OSError as e:
                    raise ConfigError(f"--memory-cap and --disk-rate need root and the cgroup v1 {controller} "
                                      f"controller at {CGROUP_ROOT}/{controller} ({e.strerror}): run as root "
                                      f"or leave them out") from None
        yield [controller for controller, _, _ in limits]
    finally:
        for group in reversed(made):
            try:
                os.rmdir(group)
            except OSError:
                pass


def join_script(controllers: list[str], name: str) -> str:
    """A shell script that moves itself into the groups `name` (may name a shell variable) and
    then runs its arguments."""
    return "".join(f"echo $$ > {CGROUP_ROOT}/{c}/{name}/cgroup.procs && " for c in controllers) + 'exec "$@"'


def disk_of(folder: str | Path) -> str:
    """major:minor of the whole disk that holds `folder` (read limits apply to disks, not partitions)."""
    dev = os.stat(folder).st_dev
    key = f"{os.major(dev)}:{os.minor(dev)}"
    node = Path("/sys/dev/block", key)
    if not node.exists():
        raise ConfigError(f"--disk-rate: {folder} is not on a block device ({key}): put the model on a local disk")
    node = node.resolve()
    return (node.parent / "dev").read_text().strip() if (node / "partition").exists() else key


def drop_cached(files: list[Path]) -> None:
    """Asks the kernel to forget the cached pages of `files`, so the next run reads them from disk
    (pages cached outside a run's cgroup would otherwise serve it for free)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def model_files(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file())


def disk_read_bandwidth(folder: Path, limit: int = 2 << 30) -> float:
    """Bytes per second of a cold sequential read of up to `limit` bytes of the model's block
    files (their pages dropped from the cache first)."""
    files = sorted(folder.glob("rank*/layer*.safetensors"))
    chosen, total = [], 0
    for f in files:
        if total >= limit:
            break
        chosen.append(f)
        total += f.stat().st_size
    drop_cached(chosen)
    t0 = time.perf_counter()
    for f in chosen:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(16 << 20):
                pass
    drop_cached(chosen)
    return total / (time.perf_counter() - t0)


def bench_memory(model: str, ranks: int, windows: list[str], cap: int | None, prompt_tokens: int,
                 new_tokens: int, out: str | None, hf: str | None = None, disk_rate: int | None = None) -> None:
    """One `bench generate` run per window size, each rank a small device of its own: memory capped
    at `cap` bytes, reads at `disk_rate` bytes/s (see device_limits). `hf`: the same model as a
    Hugging Face folder, also run through transformers fully loaded (when it fits this machine's
    memory) and through transformers + accelerate disk offload on one such device, for the ratios."""
    bandwidth = disk_read_bandwidth(Path(model))
    print(f"disk, cold sequential read: {bandwidth / 1e9:.2f} GB/s"
          + (f"; each rank reads at most {disk_rate / 1e6:.0f} MB/s (--disk-rate)" if disk_rate else ""), flush=True)
    records = []
    with device_limits([f"tpi_bench_{r}" for r in range(ranks)], cap, disk_rate, model) as controllers:
        join = join_script(controllers, "tpi_bench_$OMPI_COMM_WORLD_RANK")
        for w in windows:
            cmd = ["mpirun", "--oversubscribe", "-n", str(ranks), "sh", "-c", join, "sh", sys.executable, "-m",
                   "tpi_mpi", "bench", "generate", "--model", model, "--window", w, "--allreduce", "star",
                   "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--warmup", "1",
                   # the KV cache this run needs, as transformers grows its own: the rest of the memory holds weights
                   "--context", str(prompt_tokens + new_tokens + 8), "--quiet"]
            drop_cached(model_files(model))
            rec = _run_for_record(cmd, f"window {w}")
            if rec is None:
                continue
            pr = rec["per_rank"]
            bound = [b + 1.25 * (depth + 1) * blk + kv + res + pin if depth != "all" else None
                     for depth, b, blk, kv, res, pin in zip(rec["windows"], pr["baseline_mib"], pr["block_mib"],
                                                           pr["kv_mib"], pr["resident_mib"], pr["pinned_mib"])]
            steps = max(new_tokens - 1, 1)
            # the time reading a token's bytes takes: each rank from its own disk at --disk-rate, or
            # all ranks from this machine's one disk
            read_s = (max(pr["disk_read_bytes"]) / steps / disk_rate if disk_rate else
                      sum(pr["disk_read_bytes"]) / steps / bandwidth)
            rec.update(runner="bench memory", memory_cap=cap, disk_rate=disk_rate, rss_bound_mib=bound,
                       disk_GB_s=bandwidth / 1e9, read_s_per_token=read_s,
                       s_per_token_over_read_time=rec["s_per_token"] / read_s if read_s else None,
                       rss_within_bound=None if None in bound else all(p <= b for p, b in zip(pr["peak_rss_mib"], bound)))
            records.append(rec)
            append_json(out, rec)
    moe = any(rec.get("routed_MB_per_token") for rec in records)
    print(f"{'window':>8} {'TTFT s':>7} {'s/token':>8} {'read MB/token':>13} {'disk MB/token':>13} {'floor s':>7} "
          f"{'hidden':>7} {'peak RSS MiB per rank':>28} {'bound MiB (rank 0)':>18} {'s/token / floor':>15}"
          + (f" {'routed+dense MB/token':>21} {'disk / that':>11}" if moe else ""))
    for rec in records:
        hidden = [h for h in rec["read_hidden"] if h is not None]
        hidden_text = f"{100 * min(hidden):.0f}%" if hidden else "-"
        rss_text = ", ".join(f"{x:.0f}" for x in rec["per_rank"]["peak_rss_mib"])
        bound = rec["rss_bound_mib"][0]
        bound_text = f"{bound:.0f}" if bound else "-"
        ratio = rec["s_per_token_over_read_time"]
        needed = rec.get("routed_MB_per_token", 0) + rec.get("dense_read_MB_per_token", 0)
        print(f"{window_label(rec):>8} {rec['ttft_s']:7.2f} {rec['s_per_token']:8.3f} {rec['read_MB_per_token']:13.1f} "
              f"{rec['disk_MB_per_token']:13.1f} {rec['read_s_per_token']:7.3f} "
              f"{hidden_text:>7} {rss_text:>28} {bound_text:>18} {(f'{ratio:.2f}' if ratio else '-'):>15}"
              + (f" {needed:21.1f} {rec['disk_MB_per_token'] / needed if needed else 0:11.2f}" if moe else ""))
    if hf and records:
        compare_with_transformers(hf, min(records, key=lambda r: r["s_per_token"]), cap, disk_rate, prompt_tokens,
                                  new_tokens, out)


def bench_memory_batch(model: str, ranks: int, windows: list[str], cap: int | None, sizes: str, prompt_tokens: int,
                       new_tokens: int, out: str | None, disk_rate: int | None = None) -> None:
    """`bench generate --batch SIZES` per window, each rank a small device as in bench_memory: what a
    batch of sequences gains when every step reads the weights once for all of them."""
    rows = []
    with device_limits([f"tpi_bench_{r}" for r in range(ranks)], cap, disk_rate, model) as controllers:
        join = join_script(controllers, "tpi_bench_$OMPI_COMM_WORLD_RANK")
        for w in windows:
            cmd = ["mpirun", "--oversubscribe", "-n", str(ranks), "sh", "-c", join, "sh", sys.executable, "-m",
                   "tpi_mpi", "bench", "generate", "--model", model, "--window", w, "--batch", sizes,
                   "--prompt-tokens", str(prompt_tokens), "--new-tokens", str(new_tokens), "--warmup", "1",
                   "--context", str(prompt_tokens + new_tokens + 8), "--quiet"]
            drop_cached(model_files(model))
            for rec in _run_for_records(cmd, f"window {w}"):
                rec.update(runner="bench memory --batch", memory_cap=cap, disk_rate=disk_rate)
                rows.append(rec)
                append_json(out, rec)
    print(f"{'window':>8} {'batch':>5} {'s/step':>7} {'tokens/s':>8} {'x batch 1':>9} {'disk MB/step':>12} "
          f"{'peak RSS MiB per rank':>28}")
    for rec in rows:
        rss = ", ".join(f"{x:.0f}" for x in rec["per_rank"]["peak_rss_mib"])
        print(f"{window_label(rec):>8} {rec['batch']:5} {rec['s_per_step']:7.3f} {rec['tokens_per_s']:8.2f} "
              f"{rec['speedup']:9.2f} {rec['disk_MB_per_step']:12.1f} {rss:>28}")


def window_label(rec: dict) -> str:
    """Rank 0's window in a bench generate record, with the blocks kept resident beside it: "2+7"."""
    resident = rec["resident_blocks"][0] if rec["window"] != "all" else 0
    return f"{rec['window']}+{resident}" if resident else str(rec["window"])


def _run_for_record(cmd: list[str], label: str) -> dict | None:
    """Runs a bench command with `--out` a temporary file; its JSON record, or None (reported)."""
    records = _run_for_records(cmd, label)
    return records[-1] if records else None


def _run_for_records(cmd: list[str], label: str) -> list[dict]:
    """Runs a bench command with `--out` a temporary file; its JSON records (none if it failed, reported)."""
    tmp = Path(f"/tmp/tpi-bench-{os.getpid()}.jsonl")
    tmp.unlink(missing_ok=True)
    r = subprocess.run(cmd + ["--out", str(tmp)], capture_output=True, text=True, env=os.environ | {
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    if r.returncode != 0 or not tmp.exists():
        print(f"{label}: failed ({r.returncode}): {(r.stderr.strip().splitlines() or [''])[-1]}", flush=True)
        return []
    records = [json.loads(line) for line in tmp.read_text().splitlines()]
    tmp.unlink()
    return records


def compare_with_transformers(hf: str, ours: dict, cap: int | None, disk_rate: int | None, prompt_tokens: int,
                              new_tokens: int, out: str | None) -> None:
    """transformers fully loaded (if the checkpoint fits in memory) and transformers + accelerate disk
    offload on one device as our ranks had (`cap`, `disk_rate`), each against our run `ours`."""
    size = sum(f.stat().st_size for f in Path(hf).glob("*.safetensors"))
    base = [sys.executable, "-m", "tpi_mpi", "bench", "transformers", "--model", hf, "--prompt-tokens",
            str(prompt_tokens), "--new-tokens", str(new_tokens), "--warmup", "0"]
    rows = [("tpi_mpi", f"{ours['ranks']} ranks, window {window_label(ours)}", ours)]
    drop_cached(model_files(hf))
    if size < 0.8 * available_memory():
        rows.append(("transformers", "fully loaded, no cap", _run_for_record(base, "transformers")))
    else:
        print(f"transformers fully loaded: skipped, its {size / 1e9:.1f} GB do not fit in this machine's "
              f"{available_memory() / 1e9:.1f} GB available", flush=True)
    capped = (base + ["--offload"] + (["--memory-cap", str(cap)] if cap else [])
              + (["--disk-rate", str(disk_rate)] if disk_rate else []))
    drop_cached(model_files(hf))
    device = "".join([f", cap {format_size(cap)}" if cap else "", f", {disk_rate / 1e6:.0f} MB/s" if disk_rate else ""])
    rows.append(("transformers+accelerate", "disk offload" + device,
                 _run_for_record(capped, "transformers + accelerate offload")))
    print(f"{'runner':>24} {'setting':>38} {'TTFT s':>8} {'s/token':>9} {'peak RSS MiB':>12} {'s/token vs tpi_mpi':>18}")
    for runner, setting, rec in rows:
        if rec is None:
            continue
        ratio = rec["s_per_token"] / ours["s_per_token"]
        rec["vs_tpi_mpi"] = ratio
        print(f"{runner:>24} {setting:>38} {rec['ttft_s']:8.2f} {rec['s_per_token']:9.3f} {rec['max_rss_MiB']:12.0f} "
              f"{ratio:17.2f}x", flush=True)
        if runner != "tpi_mpi":
            append_json(out, {**rec, "compared_with": {"runner": "tpi_mpi", "window": ours["window"],
                                                       "s_per_token": ours["s_per_token"]}})
