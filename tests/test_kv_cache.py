"""The KV cache in half precision by default (--kv-dtype), and what a run reserves for it."""

import numpy as np
import pytest
import torch

from checkpoints import write_tokenizer
from tpi_mpi.config import ParallelConfig, RunConfig, kv_dtype_name
from tpi_mpi.errors import ConfigError
from tpi_mpi.generate import positions_needed, run_generation
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.text import TextCodec

PROMPT = [1, 17, 250, 3, 99, 42, 7, 7, 31]


def test_the_kv_dtype_follows_the_options():
    assert kv_dtype_name("auto", "auto", "fp32") == "fp16"       # a GGUF or fp32 checkpoint: half the memory
    assert kv_dtype_name("auto", "auto", "bf16") == "bf16"       # a bf16 model keeps its own half precision
    assert kv_dtype_name("auto", "fp16", "fp32") == "fp16"
    assert kv_dtype_name("auto", "fp32", "bf16") == "fp32"       # --dtype fp32: the exact numbers, KV too
    assert kv_dtype_name("bf16", "fp32", "fp32") == "bf16"       # asked for: as asked
    with pytest.raises(ConfigError, match="--kv-dtype 'fp8': use one of auto, fp32, bf16, fp16"):
        RunConfig(kv_dtype="fp8")


@pytest.fixture(scope="module")
def prepared(checkpoints, tmp_path_factory):
    return prepare(checkpoints("llama"), tmp_path_factory.mktemp("kv") / "p", ParallelConfig(1), "fp32")


def run(folder, kv_dtype):
    s = Session(RunConfig(model=str(folder), window=None, quiet=True, kv_dtype=kv_dtype, context=128))
    try:
        g = run_generation(Root(s), PROMPT, SamplingConfig(0.0), 6, ignore_eos=True, keep_prompt_logits=True)
        return g, s.model.kv.dtype, s.model.kv_bytes(), s.model_config, s.shard.shards[0]
    finally:
        s.close()


def test_a_half_precision_cache_holds_half_the_bytes_and_moves_the_logits_little(prepared):
    exact, exact_dtype, exact_bytes, m, shard = run(prepared, "fp32")
    half, half_dtype, half_bytes, _, _ = run(prepared, "auto")
    assert (exact_dtype, half_dtype) == (torch.float32, torch.float16)
    # the pool of a generate run: keys and values of every layer, this rank's kv heads, its 128 positions
    assert exact_bytes == 2 * m.n_layers * shard.n_kv_heads * m.head_dim * 128 * 4 == 2 * half_bytes
    err = np.abs(half.prompt_logits - exact.prompt_logits).max() / np.abs(exact.prompt_logits).max()
    assert 0 < err < 5e-3, err                   # rounding to fp16: visible, small


@pytest.mark.parametrize("text", ["The capital of France is", "ünïcödé ✓ 漢字 and emoji 🎉🎉", "a" * 300,
                                  "  spaces   and\ttabs\n\nnewlines  ", "x"])
def test_generate_reserves_at_least_what_the_prompt_takes(tmp_path, text):
    """positions_needed bounds the tokens before the tokenizer is loaded: checked against real ones."""
    write_tokenizer(tmp_path)
    codec = TextCodec(tmp_path)
    assert len(codec.encode(text)) + 5 <= positions_needed(text, 5)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert len(codec.encode_chat(messages)) + 5 <= positions_needed(text, 5, chat=True, system="Be brief.")


def test_the_default_prompt_reserves_a_small_part_of_context():
    # the run: a 24-character prompt and 4 new tokens reserved 4096 positions
    assert positions_needed("The capital of France is", 4) == 2 * 24 + 8 + 4
