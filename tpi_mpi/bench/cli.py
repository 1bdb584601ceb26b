"""`python -m tpi_mpi bench ...`: the benchmarks' commands (attached to the main command line)."""

from __future__ import annotations

import os

import click

from ..config import ALLREDUCE_MODES, DTYPE_NAMES, parse_size
from ..errors import ConfigError
from ..options import progress_bar, run_config, run_options


@click.group()
def bench() -> None:
    """Benchmarks: print a table row and append a JSON line (--out)."""


@bench.command("generate")
@run_options
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--warmup", type=int, default=4, show_default=True)
@click.option("--compare", help="Allreduce algorithms to compare in this one job, e.g. star,recdouble,auto: "
              "--rounds rounds of one generation each, in random order; one row (median round) each.")
@click.option("--rounds", type=int, default=6, show_default=True, help="Rounds for --compare.")
@click.option("--batch", help="Batch sizes, e.g. 1,4,8: that many prompts decoded together, one row each "
              "(tokens/s against the batch size).")
@click.option("--out", help="Append the JSON record to this file.")
def bench_generate(prompt_tokens, new_tokens, warmup, compare, rounds, batch, out, **kw) -> None:
    """Prefill and decode timings of tpi_mpi (run under mpirun)."""
    from .generate import bench_batch, compare_allreduce
    from .generate import bench_generate as run

    if new_tokens < 2:
        raise ConfigError("--new-tokens must be at least 2 to time a decode step")
    if batch is not None:
        try:
            sizes = [int(b) for b in batch.split(",") if b.strip()]
        except ValueError:
            sizes = []
        if not sizes or min(sizes) < 1 or compare:
            raise ConfigError(f"--batch {batch!r}: give batch sizes like 1,4,8 (and no --compare)")
        bench_batch(run_config(kw, max(sizes)), sizes, prompt_tokens, new_tokens, warmup, out)
        return
    if compare is None:
        run(run_config(kw), prompt_tokens, new_tokens, warmup, out)
        return
    algorithms = list(dict.fromkeys(a.strip() for a in compare.split(",") if a.strip()))
    bad = [a for a in algorithms if a not in ALLREDUCE_MODES]
    if bad or not algorithms:
        raise ConfigError(f"--compare {compare!r}: list algorithms from {','.join(ALLREDUCE_MODES)}")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds}: must be at least 1")
    compare_allreduce(run_config({**kw, "allreduce": algorithms[0]}), algorithms, rounds, prompt_tokens, new_tokens,
                      warmup, out)


@bench.command("memory")
@click.option("--model", "-m", required=True, help="A prepared folder (python -m tpi_mpi prepare ...).")
@click.option("--ranks", "-n", type=int, required=True, help="The folder's world size.")
@click.option("--windows", default="1,2,4,all", show_default=True)
@click.option("--memory-cap", help="Per-rank cgroup memory limit (page cache included), e.g. 2GiB.")
@click.option("--prompt-tokens", type=int, default=32, show_default=True)
@click.option("--new-tokens", type=int, default=8, show_default=True)
@click.option("--disk-rate", help="Give each rank a disk of its own this fast: its reads are limited to this "
              "many bytes per second (cgroup blkio), e.g. 200MB.")
@click.option("--hf", help="The same model as a Hugging Face folder (for a synthetic model: bench synthetic-hf): "
              "also run transformers fully loaded and transformers + accelerate disk offload under the same limits.")
@click.option("--batch", help="Batch sizes, e.g. 1,8: run bench generate --batch per window instead (tokens/s "
              "against the batch size on these devices).")
@click.option("--out", help="Append the JSON records to this file.")
def bench_memory(model, ranks, windows, memory_cap, disk_rate, prompt_tokens, new_tokens, hf, batch, out) -> None:
    """Windows 1, 2, 4 and all: TTFT, s/token, peak RSS, bytes read per token, read time hidden.
    Runs mpirun itself (do not launch it under mpirun)."""
    from .memory import bench_memory as run
    from .memory import bench_memory_batch

    if batch:
        bench_memory_batch(model, ranks, windows.split(","), parse_size(memory_cap) if memory_cap else None, batch,
                           prompt_tokens, new_tokens, out, parse_size(disk_rate) if disk_rate else None)
        return
    run(model, ranks, windows.split(","), parse_size(memory_cap) if memory_cap else None, prompt_tokens,
        new_tokens, out, hf, parse_size(disk_rate) if disk_rate else None)


@bench.command("comm")
@click.option("--sizes", help="Message sizes: TOKENSxHIDDEN float32 values or bytes (8, 1MiB), comma separated "
              "[default: 1x576 up to 2048x8192, about x4 a step].")
@click.option("--model", "-m", help="Also this model's sizes: one decode token and --prefill-tokens "
              "(prepared folder, Hugging Face folder or .gguf).")
@click.option("--prefill-tokens", type=int, default=128, show_default=True)
@click.option("--algorithms", default="star,mpi,ring,recdouble,auto", show_default=True)
@click.option("--pingpong-only", is_flag=True, help="Only the ping-pong latencies.")
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed samples per point, at most.")
@click.option("--min-repeats", type=int, default=5, show_default=True, help="Timed samples per point, at least.")
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--budget", type=float, default=2.0, show_default=True,
              help="Seconds of timed samples per point (within --min-repeats and --repeats).")
@click.option("--idle-seconds", type=float, default=0.5, show_default=True,
              help="Rank 0 computes this long while the others wait, for their idle CPU; 0 = skip.")
@click.option("--hub", type=int, default=0, show_default=True, help="The star allreduce's hub rank.")
@click.option("--link-model", help="Simulate a link, e.g. 2ms,300mbit (see generate --help).")
@click.option("--comm-timeout", type=float, default=60.0, show_default=True)
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--out", help="Append one JSON line per measurement to this file.")
def bench_comm(**kw) -> None:
    """Ping-pong latency and every allreduce algorithm per message size (run under mpirun)."""
    from .comm import bench_comm as run

    run(**kw)


@bench.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="A tpi_mpi serve on this machine.")
@click.option("--requests", type=int, default=16, show_default=True, help="Per level of concurrency (at most 1000).")
@click.option("--clients", default="1,4,8", show_default=True,
              help="Levels of concurrency (client threads); speedup is against level 1.")
@click.option("--max-tokens", type=int, default=32, show_default=True,
              help="Tokens per request (greedy, ignore_eos: exactly this many).")
@click.option("--long-prompt", type=int, default=0, show_default=True,
              help="Also probe a short request's time to first token behind a prompt of about this many tokens "
              "(0: no probe).")
@click.option("--probe-only", is_flag=True, help="Only the --long-prompt probe, no load levels.")
@click.option("--distinct", type=int, default=0, help="Instead of the levels: N different prompts, each alone, then "
              "all at once; whether every answer equals its solo one.")
@click.option("--prompt-tokens", type=int, default=300, show_default=True, help="With --distinct: about this many "
              "tokens per prompt.")
@click.option("--probe-delay", type=float, default=0.3, show_default=True,
              help="Seconds between the long request and the short one.")
@click.option("--probe-repeats", type=int, default=3, show_default=True)
@click.option("--probe-tokens", type=int, default=1, show_default=True, help="max_tokens of the probe's requests.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per request.")
@click.option("--api-key", envvar="TPI_MPI_API_KEY")
@click.option("--out", help="Append the JSON records to this file.")
def bench_serve(url, requests, clients, max_tokens, long_prompt, probe_only, distinct, prompt_tokens, probe_delay,
                probe_repeats, probe_tokens, timeout, api_key, out) -> None:
    """Load a running server (localhost only) with streamed chat completions: per level of concurrency
    requests/min, completion tokens/s, p50/p95 latency and time to first token, speedup."""
    from .serve import bench_serve as run

    if distinct:
        from .serve import server_fields
        from .serve_client import Server
        from .serve_solo import bench_distinct

        if distinct < 1 or prompt_tokens < 1 or max_tokens < 1:
            raise ConfigError("--distinct, --prompt-tokens and --max-tokens must be at least 1")
        server = Server(url, api_key, timeout)
        bench_distinct(server, server_fields(server)[1], distinct, prompt_tokens, max_tokens, out)
        return
    try:
        levels = () if probe_only else tuple(int(c) for c in clients.split(",") if c.strip())
    except ValueError:
        raise ConfigError(f"--clients {clients!r}: comma separated numbers, e.g. 1,4,8") from None
    if probe_only and not long_prompt:
        raise ConfigError("--probe-only needs --long-prompt N")
    run(url, requests, levels, max_tokens, api_key=api_key, out=out, timeout=timeout, long_prompt=long_prompt,
        probe_delay=probe_delay, probe_repeats=probe_repeats, probe_tokens=probe_tokens)


@bench.command("failover")
@click.option("--ranks", "-n", type=int, default=3, show_default=True, help="The server's ranks (serve --ranks).")
@click.option("--model", "-m", help="Served model [default: the built-in SmolLM2-135M-Instruct].")
@click.option("--cache-dir", help="The server's shard cache [default: ~/.cache/tpi_mpi].")
@click.option("--requests", type=int, default=30, show_default=True, help="Requests of the soak.")
@click.option("--clients", type=int, default=4, show_default=True, help="Client threads of the soak.")
@click.option("--max-batch", type=int, default=4, show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True,
              help="Tokens per answer (greedy, ignore_eos: exactly this many).")
@click.option("--kills", type=int, default=10, show_default=True, help="Worker ranks killed during the soak.")
@click.option("--stop-share", type=float, default=0.0, show_default=True,
              help="Share of the kills that are SIGSTOP (a frozen rank, found after --comm-timeout), not SIGKILL.")
@click.option("--comm-timeout", type=float, default=10.0, show_default=True)
@click.option("--kill-gap", type=float, help="Mean seconds from a recovery to the next kill [default: the soak's "
              "length without kills, estimated from the reference requests, over kills + 1].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the kills' moments, ranks and signals.")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Seconds for the server to start, a request, and a recovery.")
@click.option("--out", default="bench-results/failover.jsonl", show_default=True,
              help="Append the JSON record to this file ('' : none).")
def bench_failover(**kw) -> None:
    """Start a supervised server (serve --ranks, a hostfile of this host), take every prompt's greedy text
    alone, then stream --requests answers while worker ranks are killed at random moments: every answer
    must come whole and equal its reference. Per kill: recovery and the longest pause a client saw;
    then the time for every process to end after SIGINT (do not launch under mpirun)."""
    from .failover import bench_failover as run

    run(**kw)


@bench.command("transformers")
@click.option("--model", "-m", required=True, help="Hugging Face folder or .gguf file.")
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="fp32", show_default=True)
@click.option("--prompt-tokens", type=int, default=64, show_default=True)
@click.option("--new-tokens", type=int, default=32, show_default=True)
@click.option("--warmup", type=int, default=4, show_default=True)
@click.option("--offload", is_flag=True, help="transformers + accelerate: the layers that do not fit in memory "
              "(--memory-cap, or what is available) are read from disk at every forward pass.")
@click.option("--memory-cap", help="Run in a cgroup with this memory limit (page cache included), e.g. 2GiB.")
@click.option("--disk-rate", help="Limit reads from the model's disk to this many bytes per second, e.g. 200MB.")
@click.option("--out", help="Append the JSON record to this file.")
def bench_transformers(model, threads, dtype, prompt_tokens, new_tokens, warmup, offload, memory_cap, disk_rate,
                       out) -> None:
    """The same timings with transformers in a single process (the baseline)."""
    from .memory import bench_transformers as run

    run(model, threads, prompt_tokens, new_tokens, warmup, dtype, out, offload,
        parse_size(memory_cap) if memory_cap else None, parse_size(disk_rate) if disk_rate else None)


@bench.command("llama")
@click.option("--model", "-m", required=True, help="A .gguf file (bench synthetic-gguf writes a 7B-shaped one).")
@click.option("--llama-bench", "binary", help="llama.cpp's llama-bench (or its folder) [default: the one on PATH].")
@click.option("--threads", default="2,1", show_default=True, help="Thread counts, a llama-bench run each.")
@click.option("--pin", is_flag=True, help="Run -t T under taskset -c 0-(T-1): one core for -t 1.")
@click.option("--n-gen", type=int, default=16, show_default=True,
              help="Decode test: tokens from an empty context (0: none).")
@click.option("--n-prompt", type=int, default=128, show_default=True, help="Prefill test: prompt tokens (0: none).")
@click.option("--repeats", type=int, default=3, show_default=True, help="Runs per test (after llama-bench's warm-up).")
@click.option("--out", default="bench-results/llama.jsonl", show_default=True,
              help="Append one JSON line per thread count to this file ('' : none).")
def bench_llama(model, binary, threads, pin, n_gen, n_prompt, repeats, out) -> None:
    """llama.cpp's llama-bench on the same GGUF file (the baseline beside transformers): per thread
    count, decode s/token and prefill s per prompt token, medians of --repeats runs (one process, no MPI)."""
    from .llama import bench_llama as run

    try:
        counts = [int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        counts = []
    if not counts:
        raise ConfigError(f"--threads {threads!r}: thread counts like 2,1")
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    run(model, binary, counts, n_gen, n_prompt, repeats, pin, out or None)


@bench.command("synthetic-hf")
@click.argument("name")
@click.option("--out", required=True, help="Folder to create.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench_synthetic_hf(name, out, quiet) -> None:
    """A synthetic model (prepare --synthetic NAME), or a .gguf file dequantized, as a Hugging Face
    folder (for bench transformers and bench quality)."""
    from ..synthetic import write_hf_checkpoint

    click.echo(f"wrote {write_hf_checkpoint(name, out, progress_bar(quiet))}", err=True)


@bench.command("synthetic-gguf")
@click.argument("name")
@click.option("--quant", type=click.Choice(["q4_0", "q4_1", "q8_0", "f16", "f32"]), default="q4_0",
              show_default=True, help="Every matrix's type, token_embd and output included (norms stay F32).")
@click.option("--out", required=True, help="The .gguf file to write.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench_synthetic_gguf(name, quant, out, quiet) -> None:
    """A synthetic model (prepare --synthetic NAME, e.g. llama2-7b) as a llama GGUF file that
    llama.cpp loads too (for bench llama beside tpi_mpi on the same file)."""
    from ..synthetic import write_gguf

    click.echo(f"wrote {write_gguf(name, out, quant, progress_bar(quiet))}", err=True)


@bench.command("quant")
@click.option("--shape", "shapes", multiple=True, default=("4096x2752", "2752x4096"), show_default=True,
              help="ROWSxCOLS of the matrix (repeatable or comma separated); default: what one rank holds of a "
              "7B model's MLP at 4 ranks, and its transpose.")
@click.option("--threads", type=int, default=2, show_default=True, help="torch (and numba) threads.")
@click.option("--repeats", type=int, default=15, show_default=True,
              help="Timed calls per op, in 3 rounds of back-to-back calls.")
@click.option("--out", help="Append one JSON line per measurement to this file.")
def bench_quant(shapes, threads, repeats, out) -> None:
    """Dequantize and matmul per GGML block type against float F.linear (one process, no MPI)."""
    from .quant import bench_quant as run
    from .quant import parse_shapes

    try:
        parsed = parse_shapes(shapes)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if threads < 1 or repeats < 1:
        raise ConfigError(f"--threads {threads} --repeats {repeats}: both must be at least 1")
    run(parsed, threads, repeats, out)


@bench.command("rows")
@click.option("--threads", type=int, default=2, show_default=True, help="torch (and numba) threads.")
@click.option("--repeats", type=int, default=30, show_default=True, help="Timed calls per op, in 3 rounds.")
@click.option("--out", help="Append one JSON line per shape to this file.")
def bench_rows(threads, repeats, out) -> None:
    """The decode kernels that keep a row's result the same alone or in a batch (serve), against
    F.linear and a call per row, for 1 and 8 rows (one process, no MPI)."""
    from .rowwise import bench_rows as run

    if threads < 1 or repeats < 1:
        raise ConfigError(f"--threads {threads} --repeats {repeats}: both must be at least 1")
    run(threads, repeats, out)


@bench.command("quality")
@click.option("--model", "-m", required=True, help="A Hugging Face folder (floats), or a .gguf file.")
@click.option("--quants", default="none,none@bf16,q8_0,q4_0,q4_1", show_default=True,
              help="--quant modes to compare, QUANT[@DTYPE][:MATMUL][/KV][+PAYLOAD] (none@bf16: computed in bf16; "
                   "keep:int8: a GGUF's own types through the int8 kernels; keep:int8/fp16: with an fp16 KV cache; "
                   "keep:exact+q8: allreduce payloads in q8, star; the first is the reference).")
@click.option("--ranks", "-n", type=int, default=2, show_default=True, help="Runs mpirun itself with this many ranks.")
@click.option("--new-tokens", type=int, default=30, show_default=True, help="Greedy tokens compared.")
@click.option("--out", help="Append the JSON records to this file.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False),
              help="Perplexity on this text file instead of the built-in paragraph (its tokens' logits are kept: "
                   "a few thousand characters).")
def bench_quality(model, quants, ranks, new_tokens, out, text) -> None:
    """Perplexity on a fixed paragraph and the greedy continuation per --quant (do not launch under mpirun)."""
    from pathlib import Path

    from .quality import PARAGRAPH, bench_quality as run

    run(model, [q.strip() for q in quants.split(",") if q.strip()], ranks, new_tokens, out,
        Path(text).read_text() if text else PARAGRAPH)
