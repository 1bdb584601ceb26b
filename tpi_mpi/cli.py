"""Command line: builds configs from options and calls prepare / generate / bench, nothing more."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from .config import ParallelConfig, parse_ratio, parse_size
from .errors import ConfigError
from .prepare import DTYPES, HEAD_PLACES, prepare as prepare_model

from .comm import ALLREDUCE_MODES


def parse_window(text: str) -> int | None | str:
    if text in ("all", "auto"):
        return None if text == "all" else "auto"
    try:
        w = int(text)
    except ValueError:
        raise ConfigError(f"--window {text!r}: give a number of blocks (at least 1), 'all' or 'auto'") from None
    if w < 1:
        raise ConfigError(f"--window {w}: the window must hold at least 1 block (or 'all')")
    return w


def save_npy(path: str, array: np.ndarray) -> None:
    """Write a .npy file atomically (no half-written file if interrupted)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


DEFAULT_PROMPT = "In two sentences: why do several small computers working together beat one?"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             invoke_without_command=True)
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Tensor-parallel LLM inference across small devices. Launch under mpirun, e.g.

    mpirun -n 4 python -m tpi_mpi generate --model MODEL_DIR --prompt "Hello"

    With no command: the built-in SmolLM2-135M-Instruct answers a default chat prompt.
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(generate, prompt=DEFAULT_PROMPT, chat=True)


@cli.command()
@click.argument("src", required=False)
@click.option("--synthetic", help="Instead of SRC: random weights with the shapes of "
              "tinyllama-1.1b, llama2-7b, llama3-8b, llama2-13b or llama2-70b (for benchmarks).")
@click.option("--world-size", "-n", type=int, required=True, help="Number of ranks to split for.")
@click.option("--ratio", help="Share of each rank, e.g. 3,1,1,1 (default: even).")
@click.option("--out", required=True, help="Folder to create (holds rank0/, rank1/, ...).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="Stored and compute dtype; auto keeps the checkpoint's.")
@click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True,
              help="Output head split over ranks by vocabulary, or whole on rank 0.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(src, synthetic, world_size, ratio, out, dtype, head_on, quiet) -> None:
    """Split a Hugging Face model folder SRC into one shard folder per rank."""
    if bool(src) == bool(synthetic):
        raise ConfigError("give either a model SRC or --synthetic NAME")
    if synthetic:
        from .synthetic import SyntheticSource

        src = SyntheticSource(synthetic)
    progress = None
    if not quiet:
        from tqdm import tqdm
        progress = lambda **kw: tqdm(file=sys.stderr, **kw)   # noqa: E731
    par = ParallelConfig(world_size, parse_ratio(ratio))
    path = prepare_model(src, out, par, dtype, head_on, progress=progress)
    click.echo(f"prepared {synthetic or src} for {world_size} rank(s) in {path}", err=True)


@cli.command()
@click.argument("src", required=False)
@click.option("--synthetic", help="Instead of SRC: one of the synthetic shapes (see prepare).")
@click.option("--world-size", "-n", type=int, default=1, show_default=True)
@click.option("--ratio", help="Share of each rank, e.g. 3,1,1,1 (default: even).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True)
@click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True)
@click.option("--context", type=int, default=4096, show_default=True, help="Tokens of KV cache to plan for.")
def info(src, synthetic, world_size, ratio, dtype, head_on, context) -> None:
    """Architecture, size, and what each rank needs: bytes held and the minimum memory budget."""
    from .config import format_size
    from .parallel import parameter_count, plan_shards, shard_bytes
    from .prepare import DTYPE_NAMES, open_source
    import torch

    from .weights import current_rss

    if bool(src) == bool(synthetic):
        raise ConfigError("give either a model SRC or --synthetic NAME")
    if synthetic:
        from .synthetic import SyntheticSource

        m, stored = SyntheticSource(synthetic).config, torch.float32
    elif (Path(src) / "rank0" / "manifest.json").exists():        # an already prepared folder
        from .config import ModelConfig

        manifest = json.loads((Path(src) / "rank0" / "manifest.json").read_text())
        m, stored = ModelConfig.from_json(manifest["model"]), DTYPES[manifest["dtype"]]
        world_size, ratio = manifest["world_size"], ",".join(map(str, manifest["ratio"]))
    else:
        source = open_source(src)
        m, stored = source.config, source.dtype
    torch_dtype = stored if dtype == "auto" else DTYPES[dtype]
    itemsize = torch_dtype.itemsize
    shards = plan_shards(m, ParallelConfig(world_size, parse_ratio(ratio)), head_on)
    ctx = min(context, m.max_seq_len)
    baseline = current_rss()    # this process after importing torch: about what a rank starts with
    n = parameter_count(m)
    click.echo(f"{m.arch}: {n / 1e9:.2f} B parameters," if n >= 1e9 else f"{m.arch}: {n / 1e6:.2f} M parameters,",
               nl=False)
    click.echo(f" {m.n_layers} layers, dim {m.dim}, "
               f"{m.n_heads} query / {m.n_kv_heads} kv heads of {m.head_dim}, ffn {m.ffn_dim}, "
               f"vocabulary {m.vocab_size}, context {m.max_seq_len}, stored as {DTYPE_NAMES[torch_dtype]}")
    click.echo(f"{'rank':>4} {'heads':>7} {'kv':>5} {'ffn cols':>11} {'shard':>11} {'largest block':>14} "
               f"{'KV cache':>10} {'min budget':>11}")
    for s in shards:
        b = shard_bytes(m, s, itemsize)
        kv = 2 * m.n_layers * s.n_kv_heads * m.head_dim * ctx * itemsize
        shard = m.n_layers * (b["attn"] + b["mlp"]) + b["common"] + b["embed"]
        block = max(b["attn"], b["mlp"])
        minimum = baseline + b["common"] + 2 * block + kv   # window 1, as plan_window counts
        click.echo(f"{s.rank:>4} {s.heads[0]:>3}-{s.heads[1]:<3} {s.n_kv_heads:>5} {s.ffn[0]:>5}-{s.ffn[1]:<5} "
                   f"{format_size(shard):>11} {format_size(block):>14} {format_size(kv):>10} {format_size(minimum):>11}")
    click.echo(f"min budget = runtime baseline ({format_size(baseline)}) + resident tensors + 2 blocks + "
               f"KV cache for {ctx} tokens: --memory-budget below it is refused")


def run_options(f):
    """Options shared by every command that runs the model."""
    options = [
        click.option("--model", "-m", help="Hugging Face model folder, .gguf file or prepared folder "
                     "[default: the built-in SmolLM2-135M-Instruct]."),
        click.option("--allreduce", type=click.Choice(ALLREDUCE_MODES), default="auto", show_default=True,
                     help="star: partial sums to a hub and back (2 hops); mpi: MPI_Allreduce; ring; "
                          "recdouble: recursive doubling; auto: timed at start-up per message size, then checked "
                          "on the real calls."),
        click.option("--hub", type=int, default=0, show_default=True, help="The star allreduce's hub rank."),
        click.option("--link-model", help="Simulate a link, e.g. 2ms,300mbit: each message received costs "
                     "delay + bytes/rate (slept in the comm layer; no root needed)."),
        click.option("--window", default="auto", show_default=True,
                     help="Weight blocks (one layer's attention or MLP) held in memory at once; 'all' keeps "
                          "the shard resident; 'auto' fits the memory budget: the whole shard if it fits, else "
                          "a window of up to 2 blocks and, with what is left, the first blocks kept resident."),
        click.option("--memory-budget", help="Memory per rank for --window auto, e.g. 1.5GiB "
                     "[default: 80% of the memory available]."),
        click.option("--context", type=int, default=4096, show_default=True,
                     help="Tokens of KV cache the memory budget reserves (capped at the model's context)."),
        click.option("--cache-dir", help="Where prepared shards are cached [default: ~/.cache/tpi_mpi]."),
        click.option("--ratio", help="Share of each rank when preparing, e.g. 3,1,1,1."),
        click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True),
        click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True),
        click.option("--threads", type=int, default=0, help="Torch threads per rank [default: cores / ranks on the host]."),
        click.option("--comm-timeout", type=float, default=60.0, show_default=True,
                     help="Seconds to wait for a peer rank before giving up."),
        click.option("--quiet", is_flag=True, help="No progress or status lines on stderr."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_config(kw: dict):
    from .generate import RunConfig

    budget = parse_size(kw["memory_budget"]) if kw["memory_budget"] else None
    return RunConfig(model=kw["model"], allreduce=kw["allreduce"], hub=kw["hub"], window=parse_window(kw["window"]),
                     memory_budget=budget, context=kw["context"],
                     cache_dir=kw["cache_dir"], ratio=kw["ratio"], dtype=kw["dtype"], head_on=kw["head_on"],
                     threads=kw["threads"], comm_timeout=kw["comm_timeout"], quiet=kw["quiet"],
                     link_model=kw["link_model"])


@cli.command()
@run_options
@click.option("--prompt", "-p", help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", help="System prompt for --chat [default: the template's own].")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=40, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="1 = off.")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and timings at the end.")
@click.option("--dump-logits", help="Save the float32 logits the first new token is sampled from (.npy).")
@click.option("--dump-prompt-logits", help="Save float32 logits at every prompt position (.npy, prompt_len x vocab).")
def generate(prompt, chat, system, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, as_json,
             dump_logits, dump_prompt_logits, **kw) -> None:
    """Generate text from a prompt (every rank runs this; rank 0 prints)."""
    from .generate import Root, Session, follow, run_generation
    from .sampling import SamplingConfig

    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if prompt is None or not prompt.strip():
        raise ConfigError("the prompt is empty: give some text with --prompt")
    cfg = run_config(kw)
    s = Session(cfg)
    try:
        if s.rank == 0:
            def work(root: Root):
                codec = s.codec
                if chat:
                    messages = ([{"role": "system", "content": system}] if system else []) + \
                               [{"role": "user", "content": prompt}]
                    ids = codec.encode_chat(messages)
                else:
                    ids = codec.encode(prompt)
                stream = None if as_json else (lambda t: print(t, end="", flush=True))
                return run_generation(root, ids, sampling, max_new_tokens, ignore_eos, stream,
                                      keep_prompt_logits=bool(dump_prompt_logits))
            g = Root(s).run(work)
        else:
            follow(s)
        stats = s.gather_stats()
    finally:
        s.close()
    if s.rank != 0:
        return
    rss = stats["peak_rss_mib"]
    if dump_logits:
        save_npy(dump_logits, g.first_logits)
    if dump_prompt_logits:
        save_npy(dump_prompt_logits, g.prompt_logits)
    tokens_per_s = 1 / g.s_per_token if g.s_per_token else 0.0
    if as_json:
        print(json.dumps({
            "prompt_ids": g.prompt_ids, "generated_ids": g.generated_ids, "text": g.text,
            "ttft_s": g.ttft_s, "s_per_token": g.s_per_token, "tokens_per_s": tokens_per_s,
            "peak_rss_mib": rss, "world_size": s.comm.size, "allreduce": s.comm.describe(),
            "window": s.windows[0], "windows": s.windows,
        }))
    else:
        print(flush=True)
        s.log(stats_line(g, stats))


def stats_line(g, stats: dict) -> str:
    """TTFT, speed, memory, and where rank 0's time in the model went."""
    busy = stats["forward_s"][0] or 1e-9
    comm, wait = stats["comm_s"][0], stats["wait_s"][0]
    compute = max(busy - comm - wait, 0.0)
    tokens_per_s = 1 / g.s_per_token if g.s_per_token else 0.0
    return (f"{len(g.prompt_ids)} prompt + {len(g.generated_ids)} new tokens | TTFT {g.ttft_s:.3f} s | "
            f"{tokens_per_s:.2f} tok/s | time in model: compute {100 * compute / busy:.0f}%, "
            f"communication {100 * comm / busy:.0f}%, waiting for weights {100 * wait / busy:.0f}% | "
            f"peak RSS per rank (MiB) {', '.join(f'{r:.0f}' for r in stats['peak_rss_mib'])}")


@cli.command()
@run_options
@click.option("--system", help="System prompt [default: the template's own].")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Per answer.")
@click.option("--temperature", type=float, default=0.8, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=int, default=40, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=0.95, show_default=True, help="1 = off.")
@click.option("--seed", type=int, help="Seed for sampling.")
@click.option("--input", "input_file", type=click.File("r"),
              help="Read the messages from this file, one a line, instead of stdin.")
def chat(system, max_new_tokens, temperature, top_k, top_p, seed, input_file, **kw) -> None:
    """Multi-turn chat on rank 0's terminal (or piped stdin, one message a line).

    /reset starts over, /exit leaves. Under Open MPI 5 a pipe's end is not passed on to rank 0:
    end piped input with /exit, or use --input FILE.
    """
    import sys

    from .chat import Chat, chat_loop, check_chat_template, read_lines
    from .generate import Root, Session, follow
    from .sampling import SamplingConfig

    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    s = Session(run_config(kw))
    try:
        if s.rank == 0:
            def work(root: Root) -> None:
                check_chat_template(root)
                lines = input_file or read_lines()
                chat_loop(Chat(root, sampling, max_new_tokens, system), lines,
                          interactive=input_file is None and sys.stdin.isatty())

            Root(s).run(work)
        else:
            follow(s)
    finally:
        s.close()


@cli.group()
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
@click.option("--out", help="Append the JSON record to this file.")
def bench_generate(prompt_tokens, new_tokens, warmup, compare, rounds, out, **kw) -> None:
    """Prefill and decode timings of tpi_mpi (run under mpirun)."""
    from .bench import bench_generate as run
    from .bench import compare_allreduce

    if new_tokens < 2:
        raise ConfigError("--new-tokens must be at least 2 to time a decode step")
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
@click.option("--out", help="Append the JSON records to this file.")
def bench_memory(model, ranks, windows, memory_cap, disk_rate, prompt_tokens, new_tokens, hf, out) -> None:
    """Windows 1, 2, 4 and all: TTFT, s/token, peak RSS, bytes read per token, read time hidden.
    Runs mpirun itself (do not launch it under mpirun)."""
    from .bench_memory import bench_memory as run

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
    from .bench_comm import bench_comm as run

    run(**kw)


@bench.command("serve")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True, help="A tpi_mpi serve on this machine.")
@click.option("--requests", type=int, default=16, show_default=True, help="Per level of concurrency (at most 1000).")
@click.option("--clients", default="1,4", show_default=True, help="Levels of concurrency.")
@click.option("--max-tokens", type=int, default=32, show_default=True)
@click.option("--api-key", envvar="TPI_MPI_API_KEY")
@click.option("--out", help="Append the JSON records to this file.")
def bench_serve(url, requests, clients, max_tokens, api_key, out) -> None:
    """Requests per minute and p50/p95 latency against a running server (localhost only)."""
    from .bench import bench_serve as run

    run(url, requests, tuple(int(c) for c in clients.split(",")), max_tokens, api_key=api_key, out=out)


@bench.command("transformers")
@click.option("--model", "-m", required=True, help="Hugging Face folder or .gguf file.")
@click.option("--threads", type=int, default=os.cpu_count(), show_default=True)
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp32", show_default=True)
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
    from .bench_memory import bench_transformers as run

    run(model, threads, prompt_tokens, new_tokens, warmup, dtype, out, offload,
        parse_size(memory_cap) if memory_cap else None, parse_size(disk_rate) if disk_rate else None)


@bench.command("synthetic-hf")
@click.argument("name")
@click.option("--out", required=True, help="Folder to create.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench_synthetic_hf(name, out, quiet) -> None:
    """A synthetic model (prepare --synthetic NAME) as a Hugging Face folder, for bench transformers."""
    from .synthetic import write_hf_checkpoint

    progress = None
    if not quiet:
        from tqdm import tqdm
        progress = lambda **kw: tqdm(file=sys.stderr, **kw)   # noqa: E731
    click.echo(f"wrote {write_hf_checkpoint(name, out, progress)}", err=True)


@cli.command()
@run_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind --api-key).")
@click.option("--port", type=int, default=8000, show_default=True, help="0 = any free port (logged).")
@click.option("--queue-size", type=int, default=8, show_default=True,
              help="Requests that may wait while one is answered; more get HTTP 429.")
@click.option("--api-key", envvar="TPI_MPI_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request.")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Tokens per answer when a request sets no max_tokens.")
def serve(host, port, queue_size, api_key, max_tokens, **kw) -> None:
    """OpenAI-compatible HTTP server on rank 0 (the other ranks follow), one request at a time.

    POST /v1/chat/completions and /v1/completions (stream too), GET /v1/models and /health.
    """
    from .generate import Root, Session, follow

    try:
        from .serve import ServeConfig, model_id, serve as serve_http
    except ImportError as e:
        raise ConfigError(f"serve needs the HTTP stack ({e.name} is missing): pip install 'tpi_mpi[serve]'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: use 0 to 65535")
    if queue_size < 1:
        raise ConfigError(f"--queue-size {queue_size}: must be at least 1")
    if max_tokens <= 0:
        raise ConfigError(f"--max-tokens {max_tokens}: must be at least 1")
    cfg = ServeConfig(host, port, queue_size, api_key or None, max_tokens, model_id(kw["model"]))
    s = Session(run_config(kw))
    try:
        if s.rank == 0:
            Root(s).run(lambda root: serve_http(root, cfg))
        else:
            follow(s)
    finally:
        s.close()
