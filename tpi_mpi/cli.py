"""Command line: builds configs from options and calls prepare / generate / serve, nothing more.
The benchmarks' commands are in bench/cli.py."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from .config import DTYPE_NAMES, HEAD_PLACES, QUANT_MODES, ParallelConfig, format_size, parse_ratio, parse_size
from .errors import ConfigError
from .options import DEFAULT_PROMPT, QUANT_HELP, progress_bar, run_config, run_options
from .sampling import SamplingConfig


def save_npy(path: str, array: np.ndarray) -> None:
    """Write a .npy file atomically (no half-written file if interrupted)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def sampling_options(f):
    """Sampling options of the commands that generate text (serve applies the same defaults)."""
    d = SamplingConfig.DEFAULT
    for option in reversed([
        click.option("--temperature", type=float, default=d.temperature, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=d.top_k, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=d.top_p, show_default=True, help="1 = off."),
        click.option("--seed", type=int, help="Seed for sampling."),
    ]):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
             invoke_without_command=True)
@click.option("--debug", is_flag=True, expose_value=False, help="Show full tracebacks on errors (read by the entry point).")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Tensor-parallel LLM inference across small devices. Launch under mpirun, e.g.

    mpirun -n 4 python -m tpi_mpi generate --model MODEL_DIR --prompt "Hello"

    With no command: the built-in SmolLM2-135M-Instruct answers a question, which it prints first.
    It answers greedily (temperature 0) over the star allreduce, which adds in rank order: the same
    answer every run on the same number of ranks.
    """
    if ctx.invoked_subcommand is None:        # auto's pick of allreduce, timed, would change the sums' order
        ctx.invoke(generate, prompt=DEFAULT_PROMPT, chat=True, echo=True, temperature=0.0, allreduce="star")


def _source(src: str | None, synthetic: str | None):
    if src and synthetic:
        raise ConfigError("give either a model SRC or --synthetic NAME, not both")
    if synthetic:
        from .synthetic import SyntheticSource

        return SyntheticSource(synthetic)
    if src is None:
        return None
    from .hub import resolve        # a Hub model (org/name[:QUANT]) is downloaded first

    return resolve(src, lambda m: click.echo(f"tpi_mpi: {m}", err=True))


@cli.command()
@click.argument("src", required=False)
@click.option("--synthetic", help="Instead of SRC: random weights with the shapes of "
              "tinyllama-1.1b, llama2-7b, llama3-8b, llama2-13b or llama2-70b (for benchmarks).")
@click.option("--world-size", "-n", type=int, required=True, help="Number of ranks to split for.")
@click.option("--ratio", help="Share of each rank, e.g. 3,1,1,1 (default: even).")
@click.option("--out", required=True, help="Folder to create (holds rank0/, rank1/, ...).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPE_NAMES]), default="auto", show_default=True,
              help="Stored and compute dtype; auto keeps the checkpoint's.")
@click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True,
              help="Output head split over ranks by vocabulary, or whole on rank 0.")
@click.option("--quant", type=click.Choice(QUANT_MODES), default="auto", show_default=True, help=QUANT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(src, synthetic, world_size, ratio, out, dtype, head_on, quant, quiet) -> None:
    """Split a Hugging Face model folder, .gguf file or Hub model (org/name[:QUANT]) SRC into one shard folder per rank."""
    from .prepare import prepare as prepare_model

    source = _source(src, synthetic)
    if source is None:
        raise ConfigError("give either a model SRC or --synthetic NAME")
    par = ParallelConfig(world_size, parse_ratio(ratio))
    path = prepare_model(source, out, par, dtype, head_on, progress=progress_bar(quiet), quant=quant)
    click.echo(f"prepared {synthetic or src} for {world_size} rank(s) in {path}", err=True)


@cli.command()
@click.argument("src", required=False)
@click.option("--synthetic", help="Instead of SRC: one of the synthetic shapes (see prepare).")
@click.option("--world-size", "-n", type=int, default=1, show_default=True)
@click.option("--ratio", help="Share of each rank, e.g. 3,1,1,1 (default: even).")
@click.option("--dtype", type=click.Choice(["auto", *DTYPE_NAMES]), default="auto", show_default=True)
@click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True)
@click.option("--quant", type=click.Choice(QUANT_MODES), default="auto", show_default=True, help=QUANT_HELP)
@click.option("--context", type=int, default=4096, show_default=True, help="Tokens of KV cache to plan for.")
@click.option("--memory-budget", help="Per rank, e.g. 1.5GiB: what serve's KV pool holds under it.")
@click.option("--max-batch", type=int, default=8, show_default=True, help="serve's requests at once.")
@click.option("--request", type=int, default=0, help="Tokens of one request, prompt + answer [default: --context].")
def info(src, synthetic, world_size, ratio, dtype, head_on, quant, context, memory_budget, max_batch, request) -> None:
    """Architecture, size, and what each rank needs: bytes held, bytes read per token when streamed,
    the minimum memory budget for each --quant, and how many requests serve's KV pool holds (SRC: a
    model folder, .gguf file, prepared folder or Hub model org/name[:QUANT] [default: the built-in model])."""
    from .sizing import Sizing, report

    source = _source(src, synthetic) or _builtin()
    budget = parse_size(memory_budget) if memory_budget else None
    for line in report(Sizing(source, world_size, ratio, dtype, head_on, quant, context), budget, max_batch, request):
        click.echo(line)


def _builtin() -> Path:
    from .gguf import builtin_model_path

    return builtin_model_path()


@cli.command()
@run_options
@click.option("--prompt", "-p", help="The prompt text.")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", help="System prompt for --chat [default: the template's own].")
@click.option("--echo", is_flag=True, help="Print the prompt before the answer (with --chat: '> ' and the prompt on a line).")
@click.option("--max-new-tokens", type=int, default=256, show_default=True)
@sampling_options
@click.option("--ignore-eos", is_flag=True, help="Keep generating past the end-of-sequence token.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with ids, text and timings at the end.")
@click.option("--dump-logits", help="Save the float32 logits the first new token is sampled from (.npy).")
@click.option("--dump-prompt-logits", help="Save float32 logits at every prompt position (.npy, prompt_len x vocab).")
def generate(prompt, chat, system, echo, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos, as_json,
             dump_logits, dump_prompt_logits, **kw) -> None:
    """Generate text from a prompt (every rank runs this; rank 0 prints)."""
    from .generate import positions_needed, run_generation
    from .startup import Session
    from .steps import Root, run_steps

    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if prompt is None or not prompt.strip():
        raise ConfigError("the prompt is empty: give some text with --prompt")

    def work(root: Root):
        codec = root.session.codec
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + \
                       [{"role": "user", "content": prompt}]
            ids = codec.encode_chat(messages)
        else:
            ids = codec.encode(prompt)
        stream = None if as_json else (lambda t: print(t, end="", flush=True))
        if echo and stream:
            stream(f"> {prompt}\n" if chat else prompt)
        return run_generation(root, ids, sampling, max_new_tokens, ignore_eos, stream,
                              keep_prompt_logits=bool(dump_prompt_logits))

    cfg = run_config(kw)                  # the KV cache reserved: what this prompt and answer can use
    cfg = dataclasses.replace(cfg, context=min(cfg.context, positions_needed(prompt, max_new_tokens, chat, system)))
    with Session(cfg) as s:
        g = run_steps(s, work)
        stats = s.gather_stats()
    if s.rank != 0:
        return
    if dump_logits:
        save_npy(dump_logits, g.first_logits)
    if dump_prompt_logits:
        save_npy(dump_prompt_logits, g.prompt_logits)
    if as_json:
        print(json.dumps({
            "prompt_ids": g.prompt_ids, "generated_ids": g.generated_ids, "text": g.text,
            "ttft_s": g.ttft_s, "s_per_token": g.s_per_token, "tokens_per_s": g.tokens_per_s,
            "peak_rss_mib": stats["peak_rss_mib"], "world_size": s.comm.size, "allreduce": s.comm.describe(),
            "window": s.windows[0], "windows": s.windows, "decode_steps": g.steps, "draft": g.draft,
        }))
    else:
        print(flush=True)
        s.log(stats_line(g, stats))


def stats_line(g, stats: dict) -> str:
    """TTFT, speed, memory, and where rank 0's time in the model went."""
    busy = stats["forward_s"][0] or 1e-9
    comm, wait = stats["comm_s"][0], stats["wait_s"][0]
    compute = max(busy - comm - wait, 0.0)
    drafted = (f" in {g.steps + 1} steps ({g.draft['accepted']} of {g.draft['proposed']} drafted accepted)"
               if g.draft else "")
    return (f"{len(g.prompt_ids)} prompt + {len(g.generated_ids)} new tokens{drafted} | TTFT {g.ttft_s:.3f} s | "
            f"{g.tokens_per_s:.2f} tok/s | time in model: compute {100 * compute / busy:.0f}%, "
            f"communication {100 * comm / busy:.0f}%, waiting for weights {100 * wait / busy:.0f}% | "
            f"peak RSS per rank (MiB) {', '.join(f'{r:.0f}' for r in stats['peak_rss_mib'])}")


@cli.command()
@run_options
@click.option("--system", help="System prompt [default: the template's own].")
@click.option("--max-new-tokens", type=int, default=512, show_default=True, help="Per answer.")
@sampling_options
@click.option("--input", "input_file", type=click.File("r"),
              help="Read the messages from this file, one a line, instead of stdin.")
def chat(system, max_new_tokens, temperature, top_k, top_p, seed, input_file, **kw) -> None:
    """Multi-turn chat on rank 0's terminal (or piped stdin, one message a line).

    /reset starts over, /exit leaves. Open MPI 5 does not pass the end of piped input on to rank 0:
    rank 0 tells it from mpirun's own input when it runs on mpirun's host; elsewhere (a note on stderr
    says so) end piped input with /exit, or use --input FILE.
    """
    from .chat import Chat, chat_loop, check_chat_template, read_lines
    from .startup import Session
    from .steps import Root, run_steps

    sampling = SamplingConfig(temperature, top_k, top_p, seed)
    if max_new_tokens <= 0:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: must be at least 1")

    def work(root: Root) -> None:
        check_chat_template(root)
        lines = input_file or read_lines()
        chat_loop(Chat(root, sampling, max_new_tokens, system), lines,
                  interactive=input_file is None and sys.stdin.isatty())

    with Session(run_config(kw)) as s:
        run_steps(s, work)


@cli.command()
@run_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0: every interface; mind --api-key).")
@click.option("--port", type=int, default=8000, show_default=True, help="0 = any free port (logged).")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Requests answered together (continuous batching), as the KV pool has room for them.")
@click.option("--kv-pool", type=int, default=0,
              help="Tokens the KV pool holds per rank, shared by all requests [default: what the memory budget "
                   "leaves beside the weights, up to --max-batch x --context].")
@click.option("--prefill-chunk", type=int, default=0,
              help="Prompt tokens per step, a multiple of 32 [default: 64 with the weights in memory, 512 when "
                   "they stream]: smaller lets a short request in sooner beside a long prompt.")
@click.option("--queue-size", type=int, default=8, show_default=True,
              help="Requests that may wait while --max-batch are answered; more get HTTP 429.")
@click.option("--api-key", envvar="TPI_MPI_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every request but the page's files (/ and /static/).")
@click.option("--max-tokens", type=int, default=512, show_default=True,
              help="Tokens per answer when a request sets no max_tokens.")
@click.option("--ranks", type=int, help="Supervise: launch the engine on this many ranks with mpirun and, when "
              "one fails, again on the ranks left, resuming the answers in flight (run without mpirun).")
@click.option("--hostfile", help="With --ranks: the devices (Open MPI hostfile, this host first); re-read at each "
              "launch, so editing it brings dropped devices back.")
@click.option("--launcher-args", default="", help="With --ranks: more mpirun options, e.g. '--mca btl_tcp_if_include eth0'.")
@click.option("--prepare-ahead", is_flag=True, help="With --ranks: prepare the model for one rank fewer in the "
              "background (lowest CPU priority), so that a lost device costs a relaunch, not a prepare; it takes a "
              "prepare's memory and disk beside the engine.")
@click.option("--channel", hidden=True, help="Set by the supervisor: the socket rank 0 answers it on.")
@click.option("--prepare-for", type=int, hidden=True, help="Set by the supervisor: prepare for N ranks into the cache.")
def serve(host, port, max_batch, prefill_chunk, queue_size, api_key, max_tokens, ranks, hostfile, launcher_args,
          prepare_ahead, channel, prepare_for, **kw) -> None:
    """OpenAI-compatible HTTP server on rank 0 (the other ranks follow), many requests at a time.

    POST /v1/chat/completions and /v1/completions (stream too), GET /v1/models and /health;
    GET / is a web page (a chat and the cluster's state), /metrics Prometheus' text format.
    A request without temperature, top_p or top_k gets this tool's defaults (0.8, 0.95, 40).
    With --ranks it runs outside MPI and keeps serving when a device drops (docs/supervisor.md).
    """
    from .config import PIECE

    try:
        from .serve import ServeConfig, model_id
    except ImportError as e:
        raise ConfigError(f"serve needs the HTTP stack ({e.name} is missing): pip install 'tpi_mpi[serve]'") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: use 0 to 65535")
    if queue_size < 1:
        raise ConfigError(f"--queue-size {queue_size}: must be at least 1")
    if prefill_chunk < 0 or prefill_chunk % PIECE:
        raise ConfigError(f"--prefill-chunk {prefill_chunk}: use a positive multiple of {PIECE} (or 0, the default)")
    if max_tokens <= 0:
        raise ConfigError(f"--max-tokens {max_tokens}: must be at least 1")
    cfg = ServeConfig(host, port, queue_size, max_batch, prefill_chunk, api_key or None, max_tokens,
                      model_id(kw["model"]))
    if prepare_for:
        from . import cache

        log = (lambda m: None) if kw["quiet"] else (lambda m: print(f"tpi_mpi: in the background, {m}", file=sys.stderr))
        cache.locate(run_config(kw, max_batch), prepare_for, log)
        return
    if ranks is not None:
        from .supervisor import SupervisorConfig, supervise

        return supervise(SupervisorConfig.from_command(cfg, click.get_current_context()))
    if hostfile or launcher_args or prepare_ahead:
        raise ConfigError("--hostfile, --launcher-args and --prepare-ahead go with --ranks (the supervisor launches "
                          "mpirun)")
    if channel:
        from .supervised import serve_for_supervisor

        return serve_for_supervisor(cfg, channel, kw)
    from .serve import serve as serve_http      # the engine's modules (torch) only where an engine runs
    from .startup import Session
    from .steps import run_steps

    with Session(run_config(kw, max_batch)) as s:
        run_steps(s, lambda root: serve_http(root, cfg))


@cli.command()
@click.option("--cache-dir", help="The cache folder [default: ~/.cache/tpi_mpi].")
@click.option("--clear", is_flag=True, help="Remove every prepared model in it.")
def cache(cache_dir, clear) -> None:
    """List the prepared models in the cache (a model is prepared once per world size), or clear it."""
    from . import cache as prepared

    folder = Path(cache_dir).expanduser() if cache_dir else prepared.default_cache_dir()
    if "{rank}" in str(folder):
        raise ConfigError("--cache-dir with {rank}: give one rank's folder, e.g. ~/.cache/tpi_mpi-0")
    found = prepared.clear(folder) if clear else prepared.entries(folder)
    for e in found:
        click.echo(f"{'removed ' if clear else ''}{format_size(e.bytes):>11}  {e.world_size} rank(s)  {e.folder.name}  "
                   f"from {e.source}: weights {e.weights}, compute dtype {e.dtype}")
    total = format_size(sum(e.bytes for e in found))
    click.echo(f"{len(found)} prepared model(s), {total}, {'removed from' if clear else 'in'} {folder}", err=True)


from .bench.cli import bench  # noqa: E402  (the benchmarks' commands, kept apart)

cli.add_command(bench)
