"""Random-weight models with the real shapes of well-known models, for benchmarks at scale.

`SyntheticSource` offers the same interface as a checkpoint source (see prepare.py), so
`prepare --synthetic llama2-7b` writes shards directly, with no source checkpoint and never a
whole tensor in memory: every tensor is made in chunks of 32 along the axis it is split on, each
chunk from its own seed, so any rank's slice can be made alone and always gets the same values.
The same weights also go out as a Hugging Face folder (write_hf_checkpoint, for transformers) and
as a GGUF file (write_gguf, for llama.cpp's llama-bench).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import ConfigError

SHAPES = {
    # name: (dim, layers, heads, kv_heads, ffn, vocab, context, rope_theta)
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632, 32000, 2048, 10000.0),
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 4096, 10000.0),
    "llama3-8b": (4096, 32, 32, 8, 14336, 128256, 8192, 500000.0),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, 4096, 10000.0),
    "llama2-70b": (8192, 80, 64, 8, 28672, 32000, 4096, 10000.0),
    "qwen3-30b-a3b": (2048, 48, 32, 4, 6144, 151936, 32768, 1000000.0),
    "mixtral-8x7b": (4096, 32, 32, 8, 14336, 32000, 32768, 1000000.0),
}
# mixtures of experts: every layer routes each token to n_routed of n_experts MLPs
MOE_SHAPES = {
    "qwen3-30b-a3b": dict(arch="qwen3_moe", head_dim=128, qk_norm=True, n_experts=128, n_routed=8, expert_ffn_dim=768),
    "mixtral-8x7b": dict(arch="mixtral", n_experts=8, n_routed=2, expert_ffn_dim=14336),
}
CHUNK = 32
STD = 0.02   # the usual initializer range: activations stay finite through 80 layers
COLUMN_SPLIT = ("o.weight", "down.weight")   # row-parallel tensors (an expert's down too) are sliced by columns


def synthetic_config(name: str) -> ModelConfig:
    """A shape by name; "llama2-70b:4" keeps its first 4 layers (a model's per-layer costs on a disk
    too small for all of it)."""
    shape, _, keep = name.partition(":")
    if shape not in SHAPES or keep and not (keep.isdigit() and 0 < int(keep) <= SHAPES[shape][1]):
        raise ConfigError(f"--synthetic {name!r}: choose one of {', '.join(SHAPES)}, optionally with :LAYERS "
                          f"(fewer layers than the shape has), e.g. llama2-70b:4")
    dim, layers, heads, kv, ffn, vocab, ctx, theta = SHAPES[shape]
    layers = int(keep) if keep else layers
    moe = dict(MOE_SHAPES.get(shape, {}))
    if moe:
        moe["moe_layers"] = tuple(range(layers))
    return ModelConfig(**{"arch": "llama", "head_dim": dim // heads, **moe}, dim=dim, n_layers=layers, n_heads=heads,
                       n_kv_heads=kv, ffn_dim=ffn, vocab_size=vocab, norm_eps=1e-5, rope_theta=theta, max_seq_len=ctx,
                       bos_id=1, eos_ids=(2,))


class SyntheticSource:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path = f"synthetic:{name}"
        self.config = synthetic_config(name)
        self.dtype = torch.float32

    def _shape(self, ours: str) -> tuple[int, ...]:
        m = self.config
        q, kv = m.n_heads * m.head_dim, m.n_kv_heads * m.head_dim
        if ours.startswith("experts."):                                   # experts.E.gate.weight
            ours, ffn = ours.split(".", 2)[2], m.expert_ffn_dim
        else:
            ffn = m.ffn_dim
        return {"q.weight": (q, m.dim), "k.weight": (kv, m.dim), "v.weight": (kv, m.dim), "o.weight": (m.dim, q),
                "gate.weight": (ffn, m.dim), "up.weight": (ffn, m.dim), "down.weight": (m.dim, ffn),
                "embed.weight": (m.vocab_size, m.dim), "head.weight": (m.vocab_size, m.dim),
                "router.weight": (m.n_experts, m.dim)}[ours]

    def read(self, ours: str, layer: int | None = None, rows: tuple[int, int] | None = None,
             cols: tuple[int, int] | None = None) -> torch.Tensor:
        if ours.endswith("norm.weight"):
            return torch.ones(self.config.head_dim if ours in ("q_norm.weight", "k_norm.weight") else self.config.dim)
        shape = self._shape(ours)
        axis = 1 if ours.endswith(COLUMN_SPLIT) else 0
        lo, hi = (cols if axis else rows) or (0, shape[axis])
        if (rows and axis) or (cols and not axis):
            raise ValueError(f"{ours} is split along axis {axis}")
        first, last = lo // CHUNK, (hi - 1) // CHUNK
        span = min(shape[axis], (last + 1) * CHUNK) - first * CHUNK
        full = torch.empty((span, shape[1]) if axis == 0 else (shape[0], span))
        for c in range(first, last + 1):
            g = torch.Generator().manual_seed(_seed(self.name, ours, layer, c))
            part = full.narrow(axis, (c - first) * CHUNK, min(CHUNK, span - (c - first) * CHUNK))
            if axis == 0:
                part.normal_(0.0, STD, generator=g)          # rows are contiguous: fill in place
            else:
                part.copy_(torch.empty(part.shape).normal_(0.0, STD, generator=g))
        start = lo - first * CHUNK
        return full.narrow(axis, start, hi - lo).contiguous() if (start, hi - lo) != (0, span) else full

    def fingerprint(self) -> str:
        return hashlib.sha256(f"synthetic|{self.name}|{CHUNK}|{STD}".encode()).hexdigest()

    def tokenizer_blobs(self) -> dict[str, bytes]:
        """A word-level tokenizer covering the whole vocabulary ("w17" is token 17)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers

        vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, self.config.vocab_size)}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        return {"tokenizer.json": tok.to_str().encode(),
                "tokenizer_config.json": json.dumps({"bos_token": "<s>", "eos_token": "</s>"}).encode()}


LAYER_TENSORS = ("q.weight", "k.weight", "v.weight", "o.weight", "gate.weight", "up.weight", "down.weight",
                 "attn_norm.weight", "mlp_norm.weight")


def hf_config(m: ModelConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": m.dim,
            "intermediate_size": m.ffn_dim, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.n_kv_heads, "head_dim": m.head_dim, "vocab_size": m.vocab_size,
            "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta, "max_position_embeddings": m.max_seq_len,
            "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": m.bos_id,
            "eos_token_id": m.eos_ids[0], "torch_dtype": "float32"}


def write_hf_checkpoint(name: str, out: str | Path, progress=None) -> Path:
    """The synthetic model `name` as a Hugging Face folder (config.json, one safetensors file per
    layer and an index, tokenizer), holding the very weights `prepare --synthetic` writes: the
    reference for `bench transformers`. `name` may also be a Llama-family .gguf file, written out
    dequantized to float32 (the float checkpoint `bench quality` quantizes). Written in a staging
    folder, renamed when complete."""
    from safetensors.torch import save_file

    from .prepare import _remove_abandoned, hf_name, open_source

    src = open_source(name) if str(name).endswith(".gguf") else SyntheticSource(name)
    m, out = src.config, Path(out)
    if m.arch != "llama":
        raise ConfigError(f"{name}: a {m.arch} model; synthetic-hf writes Llama-family dense models only")
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    files = [[("embed.weight", None)], *([(t, i) for t in LAYER_TENSORS] for i in range(m.n_layers)),
             [("norm.weight", None), ("head.weight", None)]]
    bar = progress(total=len(files), desc="synthetic checkpoint", unit="file") if progress else None
    try:
        weight_map = {}
        for k, tensors in enumerate(files):
            file = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
            save_file({hf_name(t, i): src.read(t, i) for t, i in tensors}, staging / file)
            weight_map |= {hf_name(t, i): file for t, i in tensors}
            bar and bar.update()
        bar and bar.close()
        (staging / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        for file, data in src.tokenizer_blobs().items():
            (staging / file).write_bytes(data)
        (staging / "config.json").write_text(json.dumps(hf_config(m), indent=1))   # last: marks it complete
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


# ---- the same model as a GGUF file, as llama.cpp's converter and quantizer would write it ------------

GGUF_QUANTS = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}


def gguf_vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece vocabulary of n tokens that both llama.cpp and tpi_mpi load: <unk> <s> </s>, the
    256 byte tokens, "▁" and the digits, then "▁0", "▁1", ... (each the merge of a shorter one and a
    digit, so numbers are single tokens and any other text falls back to bytes)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + list("0123456789")
    if n < len(tokens) + 1:
        raise ConfigError(f"a GGUF vocabulary needs more than {len(tokens)} tokens, not {n}")
    tokens += [f"\u2581{i}" for i in range(n - len(tokens))]
    scores = [0.0] * 259 + [-float(i) for i in range(n - 259)]
    types = [2, 3, 3] + [6] * 256 + [1] * (n - 259)         # unknown, control, byte, normal
    return tokens, scores, types


def permute_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Hugging Face's q/k row order -> llama.cpp's (the converter's permute; gguf.py's unpermute_heads undoes it)."""
    n = w.shape[0] // head_dim
    return w.reshape(n, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(name: str, out: str | Path, quant: str = "q4_0", progress=None) -> Path:
    """The synthetic model `name` (prepare --synthetic NAME: the same weights) as a llama GGUF file
    with every matrix in `quant` (token_embd and output too; norms in F32) and a SentencePiece
    vocabulary (gguf_vocab): a file llama.cpp's llama-bench and tpi_mpi both load. One tensor in
    memory at a time (the header first, then each tensor's blocks); written beside `out` and renamed
    when complete."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from .gguf_config import GLOBAL_NAMES, LAYER_NAMES
    from .quant import row_bytes
    from .quantize import quantize

    if quant not in GGUF_QUANTS:
        raise ConfigError(f"--quant {quant!r}: choose one of {', '.join(GGUF_QUANTS)}")
    src, out, qtype = SyntheticSource(name), Path(out), GGUF_QUANTS[quant]
    m = src.config
    if m.arch != "llama" or m.n_experts:
        raise ConfigError(f"{name}: synthetic-gguf writes dense Llama shapes only")
    if out.exists():
        raise ConfigError(f"{out} already exists: remove it or choose another --out")
    tensors = [("embed.weight", None)] + [(t, i) for i in range(m.n_layers) for t in LAYER_TENSORS] \
        + [("norm.weight", None), ("head.weight", None)]

    def gguf_name(ours: str, layer: int | None) -> str:
        if layer is None:
            return GLOBAL_NAMES[ours]
        proj, kind = ours.split(".")
        return f"blk.{layer}.{LAYER_NAMES[proj]}.{kind}"

    def encode(ours: str, layer: int | None) -> np.ndarray:
        w = src.read(ours, layer)
        if w.dim() == 1 or qtype == "F32":
            return w.float().numpy()
        if ours in ("q.weight", "k.weight"):
            w = permute_heads(w, m.head_dim)
        return w.half().numpy() if qtype == "F16" else quantize(w, qtype).numpy()

    out.parent.mkdir(parents=True, exist_ok=True)
    for old in out.parent.glob(f".{out.name}.partial-*"):             # left by a killed run
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            old.unlink(missing_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    w = gguf.GGUFWriter(staging, "llama")
    w.add_name(f"synthetic {name}")
    w.add_file_type(int(getattr(gguf.LlamaFileType, "ALL_F32" if qtype == "F32" else f"MOSTLY_{qtype}")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(m.n_layers)
    w.add_context_length(m.max_seq_len)
    w.add_embedding_length(m.dim)
    w.add_feed_forward_length(m.ffn_dim)
    w.add_head_count(m.n_heads)
    w.add_head_count_kv(m.n_kv_heads)
    w.add_rope_dimension_count(m.head_dim)
    w.add_layer_norm_rms_eps(m.norm_eps)
    w.add_rope_freq_base(m.rope_theta)
    w.add_vocab_size(m.vocab_size)
    tokens, scores, types = gguf_vocab(m.vocab_size)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(m.bos_id)
    w.add_eos_token_id(m.eos_ids[0])
    w.add_add_bos_token(True)
    for ours, layer in tensors:                                      # shapes and types only, no data yet
        shape = src._shape(ours) if not ours.endswith("norm.weight") else (m.dim,)
        if len(shape) == 1 or qtype == "F32":
            w.add_tensor_info(gguf_name(ours, layer), shape, np.dtype(np.float32), 4 * math.prod(shape))
        elif qtype == "F16":
            w.add_tensor_info(gguf_name(ours, layer), shape, np.dtype(np.float16), 2 * math.prod(shape))
        else:
            byte_shape = (shape[0], row_bytes(qtype, shape[1]))
            w.add_tensor_info(gguf_name(ours, layer), byte_shape, np.dtype(np.uint8), math.prod(byte_shape),
                              raw_dtype=Q[qtype])
    bar = progress(total=len(tensors), desc=f"synthetic {quant} gguf", unit="tensor") if progress else None
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for ours, layer in tensors:
            w.write_tensor_data(encode(ours, layer))
            bar and bar.update()
        w.close()
        bar and bar.close()
        staging.rename(out)
    finally:
        staging.unlink(missing_ok=True)
    return out
