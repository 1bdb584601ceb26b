"""16-bit float weights under the kernels (tpi_mpi/csrc/floats.c): fp16 or bf16 rows widened to float32
in registers and multiplied by float32 activations, so a run computes what transformers computes in
float32 on the very same 16-bit numbers.

References: torch's float64 product of the same widened weights (the kernel), and transformers in
float32 on a checkpoint saved in 16 bits (the model, at 1 to 3 ranks, resident and streamed).
"""

import numpy as np
import pytest
import torch

from checkpoints import make_checkpoint, reference_run
from conftest import run_tpi
from test_ranks_in_process import LOGITS_TOL, generate_in_threads, one_thread_each  # noqa: F401 (fixture)
from test_rowwise_kernels import assert_rows_invariant, close_f32
from tpi_mpi import quant_int8 as QI
from tpi_mpi.config import ParallelConfig, RunConfig
from tpi_mpi.generate import run_generation
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.weights import widened_vectors

pytestmark = pytest.mark.skipif(not QI.int8_available(), reason="tpi_mpi._qdot was not compiled")

DTYPES = [torch.float16, torch.bfloat16]
PROMPT = [3, 17, 42, 5, 9, 60, 11]
N_NEW = 10


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 64, 300])      # token pairs, a single last token, more than a call takes
def test_products_are_float64s_within_float32_rounding(isa, dtype, T):
    w = torch.randn(13, 96).to(dtype)                      # 13 rows: groups of 4 and a short one
    x = torch.randn(T, 96)
    close_f32(QI.matmul_int8(x, w), x.double() @ w.double().T)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16"])
def test_each_row_is_computed_as_if_alone(isa, dtype):
    w = torch.randn(21, 64).to(dtype)
    assert_rows_invariant(lambda x: QI.matmul_int8(x, w), torch.randn(7, 64))


def test_the_kernels_take_contiguous_16_bit_matrices_of_whole_32_columns():
    assert QI.takes(torch.zeros(4, 64, dtype=torch.bfloat16)) and QI.takes(torch.zeros(4, 64, dtype=torch.float16))
    assert not QI.takes(torch.zeros(4, 64))                                  # float32: torch's BLAS
    assert not QI.takes(torch.zeros(4, 48, dtype=torch.float16))             # not whole 32-column steps
    assert not QI.takes(torch.zeros(64, 4, dtype=torch.float16).t())         # not contiguous


CASES = [("llama", "bf16", 1, None), ("llama", "fp16", 2, None), ("llama", "bf16", 3, 1), ("qwen2", "bf16", 2, None),
         ("qwen2", "fp16", 3, 1), ("qwen3", "bf16", 2, 1), ("qwen3_moe", "bf16", 2, None)]


@pytest.mark.parametrize("name,dtype,n,depth", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_16_bit_checkpoint_computes_transformers_float32_numbers(tmp_path, name, dtype, n, depth):
    """A checkpoint saved in 16 bits: transformers widens it to float32 and so do the kernels, row by
    row; only the order of the float32 sums differs. Streamed blocks keep their vectors (norms,
    biases) 16-bit; at 3 ranks some slices are not whole 32 columns (torch, on the widened rows)."""
    folder = make_checkpoint(tmp_path / "ckpt", name, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dtype])
    prepared = prepare(folder, tmp_path / "p", ParallelConfig(n))
    ref_logits, ref_tokens = reference_run(folder, PROMPT, N_NEW)
    QI.use_int8(True)
    logits, tokens, _ = generate_in_threads(prepared, n, PROMPT, N_NEW, depth, resident_form=widened_vectors)
    err = np.abs(logits - ref_logits.numpy()).max() / np.abs(ref_logits.numpy()).max()
    assert err < LOGITS_TOL, err
    assert tokens == ref_tokens


def test_a_run_computes_16_bit_weights_with_float32_activations_unless_exact(tmp_path):
    """By default a bf16 checkpoint's activations are float32 (its KV cache stays bf16, half the
    memory); --matmul exact keeps torch in bf16 throughout, as before the kernels took 16-bit rows."""
    folder = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    ref_logits, _ = reference_run(folder, PROMPT, 1)
    seen = {}
    for matmul in ("auto", "exact"):
        s = Session(RunConfig(model=str(folder), window=None, quiet=True, matmul=matmul, context=64,
                              cache_dir=str(tmp_path / "cache")))
        try:
            g = run_generation(Root(s), PROMPT, SamplingConfig(0.0), 1, ignore_eos=True, keep_prompt_logits=True)
            seen[matmul] = (s.dtype, s.model.kv.dtype, g.prompt_logits)
        finally:
            s.close()
    assert seen["auto"][:2] == (torch.float32, torch.bfloat16)
    assert seen["exact"][:2] == (torch.bfloat16, torch.bfloat16)
    errors = {m: np.abs(np.asarray(v[2]) - ref_logits.numpy()).max() / np.abs(ref_logits.numpy()).max()
              for m, v in seen.items()}
    assert errors["auto"] < 5e-3 and errors["auto"] < errors["exact"], errors     # the KV cache's rounding only


def test_info_names_float32_as_a_16_bit_models_compute_dtype(tmp_path):
    folder = make_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    r = run_tpi(["info", str(folder)])
    assert r.returncode == 0, r.stderr
    assert "stored as bf16 (16 bits a value); norms as bf16; compute dtype fp32 (bf16 with --matmul exact)" in r.stdout
