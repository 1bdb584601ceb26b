"""Quantized shards: a GGUF's matrices kept in their own types (--quant keep) or floats quantized at
prepare (q8_0, q4_0, q4_1), computed at N ranks in one process against transformers running the
very numbers the file holds (gguf's own dequantization), in float32.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from checkpoints import greedy_reference, write_tokenizer
from test_gguf import DIM, EXPERTS, FFN, HEADS, KV_HEADS, ROUTED, VOCAB, write_tiny as write_gguf
from test_ranks_in_process import LOGITS_TOL, generate_in_threads, one_thread_each  # noqa: F401 (an autouse fixture)
from tpi_mpi import quant_int8 as QI
from tpi_mpi.config import ParallelConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.prepare import hf_name, prepare
from tpi_mpi.shard_format import Manifest

PROMPT = [3, 17, 42, 5, 9, 60, 11]
N_NEW = 12


def write_tiny(path, arch="llama", qtype=Q.F32) -> dict:
    """test_gguf's one-layer GGUF, with a tokenizer.json beside it (its vocabulary has no merges;
    the runs here feed token ids)."""
    write_tokenizer(path.parent)
    return write_gguf(path, arch, qtype)


def transformers_on(hf: dict[str, np.ndarray], arch: str = "llama", folder=None):
    """A one-layer transformers model of `arch` (llama, qwen3, or the mixtures of experts qwen3moe and
    mixtral, loaded from a folder written in `folder` so transformers maps the experts itself)
    holding exactly `hf` (our names -> float32 values)."""
    import transformers

    kinds = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
             "qwen3moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                          dict(num_experts=EXPERTS, num_experts_per_tok=ROUTED, moe_intermediate_size=FFN,
                               norm_topk_prob=True)),
             "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                         dict(num_local_experts=EXPERTS, num_experts_per_tok=ROUTED))}
    config_cls, model_cls, moe = kinds[arch]
    config = config_cls(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=1,
                        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=DIM // HEADS, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False, **moe)
    if moe:
        from safetensors.torch import save_file

        hf_arch = {"qwen3moe": "qwen3_moe"}.get(arch, arch)
        state = {hf_name(ours, None if ours in ("embed.weight", "norm.weight", "head.weight") else 0, hf_arch):
                 torch.from_numpy(np.ascontiguousarray(v)) for ours, v in hf.items()}
        config.save_pretrained(folder)
        save_file(state, folder / "model.safetensors")
        return model_cls.from_pretrained(folder, dtype=torch.float32).eval()
    model = model_cls(config).eval()
    state = {hf_name(ours, None if ours in ("embed.weight", "norm.weight", "head.weight") else 0): torch.from_numpy(v)
             for ours, v in hf.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return model


def reference(hf: dict[str, np.ndarray], arch: str = "llama", folder=None) -> tuple[np.ndarray, list[int]]:
    """transformers' logits at every prompt position and its greedy continuation."""
    logits, tokens = greedy_reference(transformers_on(hf, arch, folder), PROMPT, N_NEW)
    return logits.numpy(), tokens


def check(prepared, n: int, hf: dict, depth: int | None = None, arch: str = "llama", folder=None) -> None:
    ref_logits, ref_tokens = reference(hf, arch, folder)
    ours, tokens, _ = generate_in_threads(prepared, n, PROMPT, N_NEW, depth)
    err = np.abs(ours - ref_logits).max() / np.abs(ref_logits).max()
    assert err < LOGITS_TOL, err
    assert tokens == ref_tokens


KEPT = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("qtype", KEPT, ids=[q.name for q in KEPT])
def test_kept_gguf_types_compute_the_files_own_numbers(tmp_path, qtype, n):
    hf = write_tiny(tmp_path / "tiny.gguf", "llama", qtype)
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(n), "fp32")   # auto: keep
    mf = Manifest.load(prepared / "rank0")
    kept = {t for info in mf.files.values() for t in info.get("quant", {}).values()}
    assert mf.quant == "keep" and kept == {qtype.name}
    check(prepared, n, hf)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_qwen3_gguf_computes_the_files_own_numbers(tmp_path, n):
    """A Qwen3 GGUF (q/k norms as attn_q_norm/attn_k_norm, rows not permuted), kept as Q8_0."""
    hf = write_tiny(tmp_path / "tiny.gguf", "qwen3", Q.Q8_0)
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(n), "fp32")
    assert Manifest.load(prepared / "rank0").model.qk_norm
    check(prepared, n, hf, arch="qwen3")


@pytest.mark.parametrize("arch,qtype,n", [("qwen3moe", Q.Q8_0, 1), ("qwen3moe", Q.Q4_K, 2), ("mixtral", Q.Q4_0, 3)])
def test_moe_gguf_computes_the_files_own_numbers(tmp_path, arch, qtype, n):
    """Mixture-of-experts GGUFs: the experts stacked in one tensor per kind (ffn_*_exps), the router
    ffn_gate_inp; Mixtral as llama.cpp writes it (arch llama, q/k rows permuted)."""
    hf = write_tiny(tmp_path / "tiny.gguf", arch, qtype)
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(n), "fp32")
    mf = Manifest.load(prepared / "rank0")
    assert mf.model.n_experts == EXPERTS and mf.model.moe_layers == (0,)
    assert mf.files["layer000.expert003.safetensors"]["quant"]["down.weight"] == qtype.name
    (tmp_path / "hf").mkdir()
    check(prepared, n, hf, arch=arch, folder=tmp_path / "hf")


def test_splits_fall_on_whole_blocks(tmp_path):
    """K-quant MLP columns split in units of 256; an o slice that would cut a 256-value block (64-wide
    heads at 3 ranks) is stored as floats; every kept matrix is whole blocks."""
    hf = write_tiny(tmp_path / "tiny.gguf", "llama", Q.Q4_K)
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(2), "fp32")
    for r in range(2):
        mf = Manifest.load(prepared / f"rank{r}")
        assert all((s.ffn[1] - s.ffn[0]) % 256 == 0 for s in mf.shards)
        assert mf.files["layer000.mlp.safetensors"]["quant"] == {n: "Q4_K" for n in ("gate.weight", "up.weight",
                                                                                    "down.weight")}
    three = prepare(tmp_path / "tiny.gguf", tmp_path / "p3", ParallelConfig(3), "fp32")
    quant = [Manifest.load(three / f"rank{r}").files["layer000.attn.safetensors"]["quant"] for r in range(3)]
    assert all("o.weight" not in q and q["q.weight"] == "Q4_K" for q in quant), quant
    check(three, 3, hf)


@pytest.mark.parametrize("mode", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_floats_quantized_at_prepare_match_gguf_quantization(tmp_path, mode):
    """Quantizing an F32 file at prepare gives the numbers gguf's own quantizer gives."""
    from gguf.quants import dequantize, quantize

    hf = write_tiny(tmp_path / "tiny.gguf", "llama", Q.F32)
    qt = Q[mode.upper()]
    as_quantized = {k: dequantize(quantize(v, qt), qt).reshape(v.shape) if v.ndim == 2 else v for k, v in hf.items()}
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(2), "fp32", quant=mode)
    assert Manifest.load(prepared / "rank0").quant == mode
    check(prepared, 2, as_quantized, depth=1)


def test_keep_needs_a_gguf(checkpoints, tmp_path):
    with pytest.raises(ConfigError, match="--quant keep keeps a GGUF's own types"):
        prepare(checkpoints("llama"), tmp_path / "p", ParallelConfig(1), quant="keep")


def test_quantized_shard_is_about_the_files_size(tmp_path):
    """Storage: kept blocks are the file's bytes, not floats (the head and embedding included)."""
    write_tiny(tmp_path / "tiny.gguf", "llama", Q.Q4_0)
    kept = prepare(tmp_path / "tiny.gguf", tmp_path / "k", ParallelConfig(2), "fp32")
    floats = prepare(tmp_path / "tiny.gguf", tmp_path / "f", ParallelConfig(2), "fp32", quant="none")

    def size(folder):
        return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))

    assert size(kept) < 0.25 * size(floats)
    info = json.loads((kept / "rank1" / "manifest.json").read_text())["files"]["layer000.mlp.safetensors"]
    assert info["dequantized"] == 3 * FFN // 2 * DIM * 4        # gate, up, down halves as float32


@pytest.mark.parametrize("cached", [False, True], ids=["read", "mapped"])
def test_a_streamed_window_computes_the_resident_bits(tmp_path, cached):
    """Blocks read into the window's buffers or mapped from the page cache: the very same logits as
    the resident shard, kept quantized, at 3 ranks."""
    write_tiny(tmp_path / "tiny.gguf", "llama", Q.Q4_K)
    prepared = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(3), "fp32")
    resident, tokens, _ = generate_in_threads(prepared, 3, PROMPT, N_NEW)
    streamed, streamed_tokens, _ = generate_in_threads(prepared, 3, PROMPT, N_NEW, depth=1, cached=cached)
    np.testing.assert_array_equal(streamed, resident)
    assert streamed_tokens == tokens


@pytest.mark.skipif(not QI.int8_available(), reason="tpi_mpi._qdot was not compiled")
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_int8_kernels_give_the_same_bits_on_packed_and_plain_shards(tmp_path, qtype):
    """prepare writes the 8-row types in the int8 kernels' packed layout (a run on the exact path has
    its folder stored row after row: packed=False), and a plain shard's resident blocks are regrouped
    at load. Resident or streamed, packed or plain: the same bits, at 2 ranks."""
    write_tiny(tmp_path / "tiny.gguf", "llama", qtype)
    packed = prepare(tmp_path / "tiny.gguf", tmp_path / "p", ParallelConfig(2), "fp32")
    plain = prepare(tmp_path / "tiny.gguf", tmp_path / "q", ParallelConfig(2), "fp32", packed=False)
    QI.use_int8(True)
    resident, tokens, results = generate_in_threads(plain, 2, PROMPT, N_NEW, resident_form=QI.interleaved)
    for folder in (packed, plain):
        streamed, streamed_tokens, _ = generate_in_threads(folder, 2, PROMPT, N_NEW, depth=1)
        np.testing.assert_array_equal(streamed, resident)
        assert streamed_tokens == tokens
    window = results[0][2]
    mlp = window.resident[(0, "mlp")]
    assert all(w.interleaved for w in mlp.values()) and mlp["gate.weight"].shape[0] >= 8

    def mlp_file(folder):
        return json.loads((folder / "rank0" / "manifest.json").read_text())["files"]["layer000.mlp.safetensors"]
    assert "packed" not in mlp_file(plain) and "gate.weight" in mlp_file(packed)["packed"]
