"""prepare: per-rank folders, manifests with checksums, atomic output, bounded memory."""

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import ROOT
from tpi_mpi.config import ParallelConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.prepare import prepare


def test_every_rank_gets_a_folder_with_a_checked_manifest(checkpoints, tmp_path):
    src = checkpoints("llama")
    out = prepare(src, tmp_path / "p", ParallelConfig(3, (2, 1, 1)))
    assert sorted(p.name for p in out.iterdir()) == ["rank0", "rank1", "rank2"]
    for r in range(3):
        folder = out / f"rank{r}"
        mf = json.loads((folder / "manifest.json").read_text())
        assert mf["rank"] == r and mf["world_size"] == 3 and mf["ratio"] == [0.5, 0.25, 0.25]
        assert len(mf["source"]["fingerprint"]) == 64
        for name, info in mf["files"].items():
            data = (folder / name).read_bytes()
            assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"]
        assert {f"layer{i:03d}.{k}.safetensors" for i in range(2) for k in ("attn", "mlp")} <= set(mf["files"])
        # raw data stays on rank 0: embedding table and tokenizer files nowhere else
        assert ("embed.safetensors" in mf["files"]) == (r == 0)
        assert ("tokenizer.json" in mf["files"]) == (r == 0)
    assert not list(tmp_path.glob(".p.partial*"))


def test_slices_are_the_source_rows_and_columns(checkpoints, tmp_path):
    src = checkpoints("llama")
    ref = load_file(src / "model.safetensors")
    out = prepare(src, tmp_path / "p", ParallelConfig(2, (3, 1)))
    mf = json.loads((out / "rank1" / "manifest.json").read_text())
    s = mf["shards"][1]
    hd = mf["model"]["head_dim"]
    block = load_file(out / "rank1" / "layer001.attn.safetensors")
    q = ref["model.layers.1.self_attn.q_proj.weight"]
    o = ref["model.layers.1.self_attn.o_proj.weight"]
    k = ref["model.layers.1.self_attn.k_proj.weight"]
    torch.testing.assert_close(block["q.weight"], q[s["heads"][0] * hd: s["heads"][1] * hd], rtol=0, atol=0)
    torch.testing.assert_close(block["o.weight"], o[:, s["heads"][0] * hd: s["heads"][1] * hd], rtol=0, atol=0)
    torch.testing.assert_close(block["k.weight"], k[s["kv_heads"][0] * hd: s["kv_heads"][1] * hd], rtol=0, atol=0)
    mlp = load_file(out / "rank1" / "layer001.mlp.safetensors")
    a, b = s["ffn"]
    torch.testing.assert_close(mlp["down.weight"], ref["model.layers.1.mlp.down_proj.weight"][:, a:b], rtol=0, atol=0)


def test_existing_output_is_not_overwritten(checkpoints, tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        prepare(checkpoints("llama"), tmp_path / "p", ParallelConfig(2))


def test_dtype_conversion(checkpoints, tmp_path):
    out = prepare(checkpoints("llama"), tmp_path / "p", ParallelConfig(1), dtype="bf16")
    assert load_file(out / "rank0" / "layer000.mlp.safetensors")["up.weight"].dtype == torch.bfloat16
    assert json.loads((out / "rank0" / "manifest.json").read_text())["dtype"] == "bf16"


def _big_checkpoint(folder, layers=8, dim=1024, ffn=2816, vocab=8192):
    """A Llama-shaped fp32 checkpoint of about 0.45 GB, written one layer file at a time."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": dim, "intermediate_size": ffn, "num_attention_heads": 16,
        "num_key_value_heads": 4, "num_hidden_layers": layers, "vocab_size": vocab}))
    g = torch.Generator().manual_seed(0)
    weight_map = {}

    def save(name, tensors):
        save_file(tensors, folder / name)
        weight_map.update({k: name for k in tensors})

    save("model-embed.safetensors", {"model.embed_tokens.weight": torch.randn(vocab, dim, generator=g),
                                     "lm_head.weight": torch.randn(vocab, dim, generator=g),
                                     "model.norm.weight": torch.ones(dim)})
    for i in range(layers):
        p = f"model.layers.{i}."
        save(f"model-{i:05d}.safetensors", {
            p + "self_attn.q_proj.weight": torch.randn(dim, dim, generator=g),
            p + "self_attn.k_proj.weight": torch.randn(dim // 4, dim, generator=g),
            p + "self_attn.v_proj.weight": torch.randn(dim // 4, dim, generator=g),
            p + "self_attn.o_proj.weight": torch.randn(dim, dim, generator=g),
            p + "mlp.gate_proj.weight": torch.randn(ffn, dim, generator=g),
            p + "mlp.up_proj.weight": torch.randn(ffn, dim, generator=g),
            p + "mlp.down_proj.weight": torch.randn(dim, ffn, generator=g),
            p + "input_layernorm.weight": torch.ones(dim), p + "post_attention_layernorm.weight": torch.ones(dim)})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def test_prepare_memory_stays_far_below_the_checkpoint_size(tmp_path):
    size = _big_checkpoint(tmp_path / "big")
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked pytest across exec
    script = (
        "import re, sys\n"
        "from tpi_mpi.prepare import prepare\n"
        "from tpi_mpi.config import ParallelConfig\n"
        "base = int(open('/proc/self/statm').read().split()[1]) * 4096\n"
        "prepare(sys.argv[1], sys.argv[2], ParallelConfig(2))\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
        "print(base, int(hwm.group(1)) * 1024)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big"), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    base, peak = map(int, r.stdout.split())
    grown = peak - base
    largest_tensor = 8192 * 1024 * 4   # the embedding table
    # about one tensor and one block at a time, not the model
    assert grown < 3 * largest_tensor, (grown, size)
    assert grown < size / 4, (grown, size)
    prepared = sum(f.stat().st_size for f in (tmp_path / "out").rglob("*.safetensors"))
    assert prepared >= size * 0.99


def test_source_fingerprint_is_keyed_on_content_not_time(checkpoints, tmp_path):
    """A copy in a new place (a new environment) finds the same cache; a fine-tune with the very
    same header and size does not."""
    import os
    import shutil

    from tpi_mpi.prepare import source_fingerprint

    src = checkpoints("llama")
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    weights = copy / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert source_fingerprint(copy) == source_fingerprint(src)
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.down_proj.weight"] += 1e-3      # same names, shapes and size: new weights
    save_file(tensors, weights, metadata={"format": "pt"})
    assert weights.stat().st_size == (src / "model.safetensors").stat().st_size
    assert source_fingerprint(copy) != source_fingerprint(src)
