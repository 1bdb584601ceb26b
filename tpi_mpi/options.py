"""The command-line options every command that runs the model shares, and the RunConfig they make."""

from __future__ import annotations

import click

from .config import (ALLREDUCE_MODES, ALLREDUCE_PAYLOADS, DTYPE_NAMES, HEAD_PLACES, KV_DTYPES, MATMUL_MODES, QUANT_MODES,
                     RunConfig, parse_ratio, parse_size, parse_window)
from .progress import progress_bar  # noqa: F401 (the commands' progress bars)

QUANT_HELP = ("How weight matrices are stored and streamed: keep a GGUF's own types (4-8 bits), none "
              "(floats, --dtype), or quantize floats to q8_0, q4_0, q4_1, q5_0 or q5_1 when preparing; auto: keep "
              "for a GGUF, none otherwise.")

DEFAULT_PROMPT = "In two sentences: why do several small computers working together beat one?"


def run_options(f):
    """Options shared by every command that runs the model."""
    options = [
        click.option("--model", "-m", help="Hugging Face model folder, .gguf file, prepared folder, or a model on the "
                     "Hugging Face Hub: org/name (safetensors) or org/name:QUANT (a GGUF repo's file for QUANT, e.g. "
                     "Q4_K_M), downloaded by rank 0 into the Hugging Face cache "
                     "[default: the built-in SmolLM2-135M-Instruct]."),
        click.option("--allreduce", type=click.Choice(ALLREDUCE_MODES), default="auto", show_default=True,
                     help="star: partial sums to a hub and back (2 hops); mpi: MPI_Allreduce; ring; "
                          "recdouble: recursive doubling; auto: timed at start-up per message size, then checked "
                          "on the real calls."),
        click.option("--allreduce-payload", type=click.Choice(ALLREDUCE_PAYLOADS), default="fp32", show_default=True,
                     help="How partial sums travel: fp32; bf16 (half the bytes); q8: int8 blocks of 32 values with a "
                          "scale each (28% of the bytes). Smaller payloads change the logits a little "
                          "(docs/payloads.md); only star carries them (auto then picks star)."),
        click.option("--hub", type=int, default=0, show_default=True, help="The star allreduce's hub rank."),
        click.option("--link-model", help="Simulate a link, e.g. 2ms,300mbit: each message received costs "
                     "delay + bytes/rate (slept in the comm layer; no root needed)."),
        click.option("--window", default="auto", show_default=True,
                     help="Weight blocks (one layer's attention or MLP) held in memory at once; 'all' keeps "
                          "the shard resident; 'auto' fits the memory budget: the whole shard if it fits, else "
                          "a window of up to 2 blocks and, with what is left, the first blocks kept resident."),
        click.option("--memory-budget", help="Memory per rank for --window auto, e.g. 1.5GiB "
                     "[default: its share of 90% of the free memory (or of a cgroup limit), shared among the ranks on "
                     "the host]."),
        click.option("--context", type=int, default=4096, show_default=True,
                     help="Tokens of KV cache the memory budget reserves per sequence (capped at the model's "
                          "context); serve's longest prompt + answer."),
        click.option("--cache-dir", help="Where prepared shards are cached [default: ~/.cache/tpi_mpi]."),
        click.option("--ratio", help="Share of each rank when preparing, e.g. 3,1,1,1."),
        click.option("--dtype", type=click.Choice(["auto", *DTYPE_NAMES]), default="auto", show_default=True),
        click.option("--head-on", type=click.Choice(HEAD_PLACES), default="split", show_default=True),
        click.option("--quant", type=click.Choice(QUANT_MODES), default="auto", show_default=True, help=QUANT_HELP),
        click.option("--matmul", type=click.Choice(MATMUL_MODES), default="auto", show_default=True,
                     help="Quantized matrices: int8 quantizes activations to 8 bits per 32 values and takes integer "
                          "dot products (llama.cpp's way, fast; 16-bit float matrices meet float32 activations); "
                          "exact multiplies the stored weights in float32 (the file's own numbers; 16-bit float "
                          "matrices in their own dtype); auto: int8, or exact with --dtype fp32."),
        click.option("--kv-dtype", type=click.Choice(KV_DTYPES), default="auto", show_default=True,
                     help="The KV cache's dtype; auto: half precision (the model's bf16/fp16, else fp16), fp32 "
                          "with --dtype fp32."),
        click.option("--draft", help="Decode speculatively, one step checking the tokens a draft proposes (the same "
                     "greedy answer as without): ngram (the tokens that followed the last few earlier in the prompt "
                     "or answer: pays where an answer repeats its input), or a small model with the same tokenizer "
                     "(folder, .gguf or Hub model org/name[:QUANT]), run by rank 0 alone."),
        click.option("--threads", type=int, default=0, help="Torch threads per rank [default: cores / ranks on the host]."),
        click.option("--comm-timeout", type=float, default=60.0, show_default=True,
                     help="Seconds to wait for a peer rank before giving up."),
        click.option("--quiet", is_flag=True, help="No progress or status lines on stderr."),
        # read by the entry point from the command line; accepted here too, so it may follow the command
        click.option("--debug", is_flag=True, hidden=True, expose_value=False),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def run_config(kw: dict, max_batch: int = 1) -> RunConfig:
    budget = parse_size(kw["memory_budget"]) if kw["memory_budget"] else None
    return RunConfig(model=kw["model"], allreduce=kw["allreduce"], allreduce_payload=kw.get("allreduce_payload", "fp32"),
                     hub=kw["hub"], window=parse_window(kw["window"]),
                     memory_budget=budget, context=kw["context"], max_batch=max_batch, cache_dir=kw["cache_dir"],
                     ratio=parse_ratio(kw["ratio"]), dtype=kw["dtype"], head_on=kw["head_on"], quant=kw["quant"],
                     matmul=kw["matmul"], kv_dtype=kw["kv_dtype"],
                     threads=kw["threads"], comm_timeout=kw["comm_timeout"], quiet=kw["quiet"],
                     link_model=kw["link_model"], kv_pool=kw.get("kv_pool") or 0, draft=kw["draft"])

