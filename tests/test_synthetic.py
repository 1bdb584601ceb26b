"""Synthetic models: a rank's slice is the same as the slice of the whole tensor, and the Hugging
Face copy that `bench synthetic-hf` writes is the model that `prepare --synthetic` shards
(transformers' logits on it match ours); the GGUF copy of `bench synthetic-gguf` holds the same
weights quantized."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from conftest import run_tpi
from tpi_mpi import synthetic
from tpi_mpi.config import ParallelConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.config import RunConfig
from tpi_mpi.generate import run_generation
from tpi_mpi.startup import Session
from tpi_mpi.steps import Root
from tpi_mpi.prepare import prepare
from tpi_mpi.sampling import SamplingConfig

TINY = (64, 2, 4, 2, 96, 300, 128, 10000.0)   # dim, layers, heads, kv heads, ffn, vocab, context, theta


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(synthetic.SHAPES, "tiny", TINY)
    return "tiny"


def test_a_slice_is_made_alone_with_the_same_values(tiny):
    src = synthetic.SyntheticSource(tiny)
    whole = src.read("gate.weight", 1)
    assert whole.shape == (96, 64)
    torch.testing.assert_close(src.read("gate.weight", 1, rows=(40, 77)), whole[40:77], rtol=0, atol=0)
    down = src.read("down.weight", 0)
    torch.testing.assert_close(src.read("down.weight", 0, cols=(5, 70)), down[:, 5:70], rtol=0, atol=0)
    assert not torch.equal(src.read("up.weight", 1), whole)


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ConfigError, match="choose one of"):
        synthetic.SyntheticSource("llama9-1t")


def test_hf_copy_gives_transformers_our_logits(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours = prepare(synthetic.SyntheticSource(tiny), tmp_path / "shards", ParallelConfig(1))
    hf = synthetic.write_hf_checkpoint(tiny, tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 + 2     # embedding, 2 layers, final norm + head
    with pytest.raises(ConfigError, match="already exists"):
        synthetic.write_hf_checkpoint(tiny, hf)

    prompt = [1, 17, 250, 3, 99, 42]
    s = Session(RunConfig(model=str(ours), quiet=True, kv_dtype="fp32"))          # parity to 1e-4: an fp32 KV cache
    try:
        g = run_generation(Root(s), prompt, SamplingConfig(0.0), 8, ignore_eos=True, keep_prompt_logits=True)
    finally:
        s.close()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0].numpy()
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):]
    err = np.abs(g.prompt_logits - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err
    assert g.generated_ids == greedy.tolist()


@pytest.mark.parametrize("quant", ["q4_0", "q8_0", "f16"])
def test_gguf_copy_holds_the_synthetic_weights_quantized(tiny, tmp_path, quant):
    """bench synthetic-gguf: every matrix is the synthetic one quantized (q/k permuted the way
    llama.cpp's converter does, which our reader undoes), norms F32, a tokenizer that loads."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize, quantize

    from tpi_mpi.gguf import GGUFSource
    from tpi_mpi.gguf_tokenizer import build_tokenizer

    path = synthetic.write_gguf(tiny, tmp_path / "tiny.gguf", quant)
    assert not list(tmp_path.glob(".tiny.gguf.partial-*"))
    with pytest.raises(ConfigError, match="already exists"):
        synthetic.write_gguf(tiny, path, quant)
    src, ref = GGUFSource(path), synthetic.SyntheticSource(tiny)
    assert src.config.norm_eps == pytest.approx(ref.config.norm_eps)          # stored as float32
    assert dataclasses.replace(src.config, norm_eps=ref.config.norm_eps) == ref.config
    qtype = Q[quant.upper()]
    assert src.meta["general.file_type"] == {"q4_0": 2, "q8_0": 7, "f16": 1}[quant]
    for ours, layer in [("embed.weight", None), ("head.weight", None), ("norm.weight", None),
                        *[(t, 1) for t in synthetic.LAYER_TENSORS]]:
        w = ref.read(ours, layer).numpy()
        expect = w if w.ndim == 1 else dequantize(quantize(w, qtype), qtype)
        assert src.tensor(ours, layer).qtype == (Q.F32 if w.ndim == 1 else qtype), ours
        np.testing.assert_array_equal(src.read(ours, layer).numpy(), expect, err_msg=ours)
    tokens = src.meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(set(tokens)) == 300 and tokens[1:3] == ["<s>", "</s>"]
    tok = build_tokenizer(src.meta, path.name)
    ids = tok.encode("12 hi").ids
    assert ids[:2] == [1, tokens.index("\u258112")] and tok.decode(ids) == "12 hi"   # hi: byte tokens


def test_bench_transformers_offloads_under_a_memory_cap(monkeypatch, tmp_path):
    pytest.importorskip("accelerate")
    if not os.access("/sys/fs/cgroup/memory", os.W_OK):
        pytest.skip("needs root and the cgroup v1 memory controller")
    monkeypatch.setitem(synthetic.SHAPES, "small", (512, 8, 8, 8, 2048, 1000, 128, 10000.0))   # 17 MB a layer
    hf = synthetic.write_hf_checkpoint("small", tmp_path / "hf")
    out = tmp_path / "t.jsonl"
    # 600 MiB leave no room for weights beside the process itself: the layers stay on disk
    r = run_tpi(["bench", "transformers", "--model", str(hf), "--offload", "--memory-cap", "600MiB",
                 "--prompt-tokens", "8", "--new-tokens", "3", "--warmup", "0", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["runner"] == "transformers+accelerate offload" and rec["memory_cap"] == 600 << 20
    assert rec["modules_on_disk"] >= 8 and rec["s_per_token"] > 0 and rec["max_rss_MiB"] < 600
    assert not os.path.exists("/sys/fs/cgroup/memory/tpi_bench_transformers")
