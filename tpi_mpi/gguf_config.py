"""A GGUF file's metadata as our ModelConfig, and the names of its tensors: what llama.cpp calls the
parts of a Llama, Mistral, Qwen2, Qwen3, Mixtral or Qwen3-MoE model, checked so that anything we would
compute wrongly is refused by name (gguf.py reads the file).
"""

from __future__ import annotations

import re

import numpy as np

from .config import ModelConfig
from .errors import ConfigError

PERMUTED_ARCHS = ("llama", "mistral")   # q/k rows interleaved by llama.cpp's converter
# our tensor name -> GGUF's (per layer: blk.N.<name>)
GLOBAL_NAMES = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "head.weight": "output.weight"}
LAYER_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
               "up": "ffn_up", "down": "ffn_down", "attn_norm": "attn_norm", "mlp_norm": "ffn_norm",
               "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "router": "ffn_gate_inp"}
# tensors that are no weight of our model: Llama 3's rope factors go into the config, and attn_rot_embd
# is a leftover of old converters that llama.cpp ignores too
IGNORED = ("rope_freqs.weight",)
IGNORED_LAYER = ("attn_rot_embd",)


def _llama3_scaling(meta: dict, arch: str, freqs: np.ndarray, theta: float, head_dim: int, source: str) -> dict:
    """llama.cpp stores Llama 3.1's rope scaling as a table of per-frequency divisors (rope_freqs.weight)
    rather than its parameters. Every Llama 3.x uses low 1, high 4, original 8192 with the factor
    that the table ends at; accept the table only if those parameters rebuild it."""
    from .model import rope_inv_freq   # the model's own formula, so what we accept is what runs
    old = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
    s = {"rope_type": "llama3", "factor": float(freqs.max()), "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": float(old)}
    base = dict(arch="llama", dim=head_dim, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=head_dim, ffn_dim=1,
                vocab_size=1, rope_theta=theta)
    want = (rope_inv_freq(ModelConfig(**base)) / rope_inv_freq(ModelConfig(**base, rope_scaling=s))).numpy()
    if freqs.shape != want.shape or not np.allclose(freqs, want, rtol=1e-4):
        raise ConfigError(f"{source}: rope_freqs.weight is not Llama 3 rope scaling (factor {s['factor']:g}, low 1, "
                          f"high 4, original {old}); tpi_mpi implements only that kind")
    return s


def config_from_gguf(meta: dict, tensors: dict, source: str, load_tensor=None) -> ModelConfig:
    """ModelConfig from GGUF metadata, through the Hugging Face mapping so every check stays in one place.
    `tensors`: name -> gguf.GGUFTensor; `load_tensor(t)` reads one as float32 (Llama 3's rope factors)."""
    arch = meta.get("general.architecture")
    if arch not in PERMUTED_ARCHS + ("qwen2", "qwen3", "qwen3moe"):
        raise ConfigError(f"{source}: general.architecture is {arch!r}; tpi_mpi reads llama (Mixtral too), mistral, "
                          f"qwen2, qwen3 and qwen3moe GGUFs")

    def get(key: str, default=None):
        v = meta.get(f"{arch}.{key}", default)
        if v is None:
            raise ConfigError(f"{source}: metadata {arch}.{key} is missing: convert the model again with llama.cpp")
        return v

    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"{source}: {key} {why}; tpi_mpi implements Llama, Mistral, Qwen2 and Qwen3 models and "
                          f"the Mixtral and Qwen3-MoE experts, as llama.cpp's converter writes them")

    experts = int(get("expert_count", 0))
    if experts and arch not in ("llama", "qwen3moe"):
        refuse(f"{arch}.expert_count", f"is {experts}: experts are read for llama (Mixtral) and qwen3moe only")
    if arch == "qwen3moe" and not experts:
        refuse(f"{arch}.expert_count", "is missing")
    dim, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):         # per layer; fine only when all agree
        if len(set(n_kv)) != 1:
            refuse(f"{arch}.attention.head_count_kv", "differs between layers")
        n_kv = n_kv[0]
    head_dim = int(get("attention.key_length", dim // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        refuse(f"{arch}.attention.value_length", "differs from key_length")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        refuse(f"{arch}.rope.dimension_count", f"is {get('rope.dimension_count')}, not {head_dim} (partial rotary)")

    theta = float(get("rope.freq_base", 10000.0))
    # llama.cpp writes linear, yarn or longrope scaling as a type; Llama 3's only as rope_freqs.weight
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear" and float(get("rope.scaling.factor", 1.0)) == 1.0:
        scaling_type = "none"
    if scaling_type != "none":
        refuse(f"{arch}.rope.scaling.type", f"is {scaling_type!r}; only Llama 3 rope scaling is implemented")
    scaling = None
    if "rope_freqs.weight" in tensors:
        scaling = _llama3_scaling(meta, arch, load_tensor(tensors["rope_freqs.weight"]), theta, head_dim, source)

    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(f"{source}: metadata tokenizer.ggml.tokens is missing: the file has no vocabulary")
    embed = tensors.get("token_embd.weight")
    if embed is None or embed.shape[0] != len(tokens):
        rows = "no" if embed is None else embed.shape[0]
        raise ConfigError(f"{source}: {len(tokens)} tokens but token_embd.weight has {rows} rows: "
                          f"the file is inconsistent, convert it again")

    def has(name: str) -> bool:
        return f"blk.0.{name}" in tensors

    mlp = ("ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight", "ffn_down_exps.weight") if experts \
        else ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")
    for name in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_norm.weight",
                 "ffn_norm.weight", *mlp):
        if not has(name):
            refuse(f"tensor blk.0.{name}", "is missing (fused or renamed tensors are not supported)")
    if arch.startswith("qwen3") and not (has("attn_q_norm.weight") and has("attn_k_norm.weight")):
        refuse("tensor blk.0.attn_q_norm.weight", "or attn_k_norm.weight is missing, and qwen3 norms q and k")
    if not arch.startswith("qwen3") and has("attn_q_norm.weight"):
        refuse("tensor blk.0.attn_q_norm.weight", f"has no place in a {arch} model")
    if arch == "qwen2" and not has("attn_q.bias"):
        refuse("tensor blk.0.attn_q.bias", "is missing, and qwen2 has q/k/v biases")
    if arch != "qwen2" and has("attn_q.bias") != has("attn_output.bias"):
        refuse("tensor blk.0.attn_q.bias", "and attn_output.bias are not both present (llama biases all four)")
    known = {f"{v}.{k}" for v in LAYER_NAMES.values() for k in ("weight", "bias")} | set(mlp)
    for name in tensors:
        if name in GLOBAL_NAMES.values() or name in IGNORED:
            continue
        m = re.match(r"blk\.\d+\.(.*)$", name)
        if not m or (m.group(1) not in known and m.group(1).split(".")[0] not in IGNORED_LAYER):
            refuse(f"tensor {name}", "has no place in the model")

    eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                             "tokenizer.ggml.eom_token_id") if k in meta]
    model_type = {"qwen3moe": "qwen3_moe", "llama": "mixtral" if experts else "llama"}.get(arch, arch)
    raw = {
        "model_type": model_type,
        "hidden_size": dim,
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "intermediate_size": int(get("feed_forward_length")),
        "vocab_size": len(tokens),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(get("context_length", 2048)),
        "sliding_window": get("attention.sliding_window", 0) or None,
        "use_sliding_window": bool(get("attention.sliding_window", 0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch != "qwen2" and has("attn_output.bias"),
        "mlp_bias": has("ffn_up.bias"),
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(eos)),
    }
    if experts:     # every layer routes (llama.cpp keeps no dense MLP beside experts in these two)
        raw |= {"num_experts": experts, "num_local_experts": experts,
                "num_experts_per_tok": int(get("expert_used_count")),
                "moe_intermediate_size": int(get("expert_feed_forward_length", get("feed_forward_length"))),
                "norm_topk_prob": bool(get("expert_weights_norm", True))}
    return ModelConfig.from_hf_dict(raw, source=source)
