"""End to end: `mpirun -n N python -m tpi_mpi generate` against transformers on the same weights."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer

from checkpoints import reference_run
from conftest import run_tpi

PROMPT = "Edge devices split the quick brown fox"
N_NEW = 32
CASES = [
    # (checkpoint, ranks, allreduce, ratio, extra checkpoint options)
    ("llama", 1, "star", None, {}),
    ("llama", 2, "star", None, {}),
    ("llama", 3, "mpi", None, {}),           # 3 ranks over 2 kv heads: kv heads replicated
    ("llama", 4, "star", "3,1,2,2", {}),     # uneven ratio
    ("llama", 2, "mpi", None, {"max_shard_size": "100KB"}),   # sharded checkpoint with index
    ("qwen2", 2, "mpi", None, {}),           # q/k/v biases, tied embeddings
    ("qwen2", 3, "star", "2,1,1", {}),
    ("llama_hd", 2, "star", None, {}),       # head_dim 16 != 48 / 6
    ("llama_hd", 4, "mpi", None, {}),        # 6 heads over 4 ranks, 4 > 3 kv heads
    ("mistral", 2, "star", None, {}),        # 4 query heads share 1 kv head
    ("llama", 3, "ring", None, {}),
    ("llama_hd", 3, "recdouble", "1,2,1", {}),
    ("qwen2", 4, "auto", None, {}),
]


@pytest.mark.parametrize("name,n,allreduce,ratio,opts",
                         [pytest.param(*c, marks=pytest.mark.mpi if c[1] > 1 else ()) for c in CASES],
                         ids=[f"{c[0]}-n{c[1]}-{c[2]}" + (f"-r{c[3]}" if c[3] else "") + ("-sharded" if c[4] else "")
                              for c in CASES])
def test_logits_and_greedy_tokens_match_transformers(checkpoints, tmp_path, name, n, allreduce, ratio, opts):
    folder = checkpoints(name, **opts)
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--temperature", "0",
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json", "--quiet", "--allreduce", allreduce,
            "--cache-dir", str(tmp_path / "cache"), "--dump-prompt-logits", str(tmp_path / "prompt.npy"),
            "--dump-logits", str(tmp_path / "first.npy"), "--kv-dtype", "fp32"]   # parity to 1e-4: an fp32 KV cache
    if ratio:
        args += ["--ratio", ratio]
    r = run_tpi(args, n)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    prompt_ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(PROMPT).ids
    ref_logits, ref_tokens = reference_run(folder, prompt_ids, N_NEW)
    ours = np.load(tmp_path / "prompt.npy")
    ref = ref_logits.numpy()
    assert out["prompt_ids"] == prompt_ids
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4
    np.testing.assert_array_equal(np.load(tmp_path / "first.npy"), ours[-1])
    assert out["generated_ids"] == ref_tokens
    assert out["world_size"] == n and len(out["peak_rss_mib"]) == n
    assert out["allreduce"].startswith(allreduce if n > 1 else "none")
