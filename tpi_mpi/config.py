"""Model, parallel and run configuration: frozen dataclasses, checked once, the same way on every rank.

`ModelConfig.from_hf` is the one place that maps Hugging Face config keys onto ours. Anything in
a config.json that would change the math and that we do not implement is refused by name.
`RunConfig` holds a run's options (the command line's), checked when it is made.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError

# batch.py: with --max-batch > 1, prompt tokens per matmul and attention call (the unit of exactness,
# not of scheduling); here so that serve's options are checked without importing torch
PIECE = 32
# kv.py: positions per block of the KV pool (what the pool hands out, and what a request's reservation rounds up to)
KV_BLOCK = 16

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")
MOE_ARCHS = ("qwen3_moe", "mixtral")
ALLREDUCE_MODES = ("auto", "star", "mpi", "ring", "recdouble")
# how partial sums travel (payload.py): float32, bfloat16, or int8 blocks of 32 with a scale each
ALLREDUCE_PAYLOADS = ("fp32", "bf16", "q8")
# the algorithms that can carry a compressed payload: the hub adds decoded parts and sends one encoded
# total (ring and recdouble would round again at every hop; MPI_Allreduce sums only numbers it knows)
COMPRESSING_MODES = ("auto", "star")
DTYPE_NAMES = ("fp32", "bf16", "fp16")   # stored and compute dtypes (shard_format.DTYPES maps them to torch)
HEAD_PLACES = ("split", "rank0")         # the output head split by vocabulary, or whole on rank 0
# how weight matrices are stored: "keep" a GGUF's own types, "none" floats, or quantize floats at prepare;
# "auto" is keep for a GGUF and none otherwise
QUANT_MODES = ("auto", "keep", "none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# how quantized matrices are multiplied: int8 activations and integer dot products (llama.cpp's way,
# quant_int8.py) or the exact float path (quant.py); auto: int8 unless --dtype fp32 is asked for
MATMUL_MODES = ("auto", "int8", "exact")
KV_DTYPES = ("auto", "fp32", "bf16", "fp16")    # the KV cache's; auto: fp16 (as llama.cpp), fp32 with --dtype fp32


@dataclass(frozen=True)
class ModelConfig:
    arch: str                      # one of SUPPORTED_ARCHS
    dim: int                       # hidden_size
    n_layers: int
    n_heads: int                   # query heads
    n_kv_heads: int
    head_dim: int                  # may differ from dim // n_heads (head_dim key)
    ffn_dim: int                   # intermediate_size
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # only {"rope_type": "llama3", ...}
    max_seq_len: int = 2048        # max_position_embeddings (or a sliding window, if smaller)
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False          # RMSNorm of each query and key head before RoPE (Qwen3)
    # mixture of experts: a router picks n_routed of n_experts MLPs (of expert_ffn_dim columns) per token
    n_experts: int = 0             # 0: dense
    n_routed: int = 0
    expert_ffn_dim: int = 0
    norm_routed: bool = True       # the routed experts' weights rescaled to sum to 1 (norm_topk_prob)
    moe_layers: tuple[int, ...] = ()
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"model config: {self.n_heads} query heads do not group evenly over {self.n_kv_heads} kv heads")
        if self.n_experts and not 0 < self.n_routed <= self.n_experts:
            raise ConfigError(f"model config: {self.n_routed} experts per token of {self.n_experts}")

    def is_moe(self, layer: int) -> bool:
        return layer in self.moe_layers

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.n_heads // self.n_kv_heads

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> ModelConfig:
        d = dict(d)
        d["eos_ids"] = tuple(d.get("eos_ids", ()))
        d["moe_layers"] = tuple(d.get("moe_layers", ()))
        return cls(**d)

    @classmethod
    def from_hf(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path} not found: a Hugging Face model folder needs its config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON ({e}): re-download the model's config.json") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a JSON object: re-download the model's config.json")
        return cls.from_hf_dict(raw, source=str(path))

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ConfigError(f"{source}: required field '{key}' is missing")
            return raw[key]

        def refuse(key: str, why: str) -> None:
            raise ConfigError(f"{source}: field '{key}' {why}; tpi_mpi supports Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE and Mixtral models")

        arch = raw.get("model_type")
        if arch not in SUPPORTED_ARCHS:
            refuse("model_type", f"is {arch!r}, not one of {', '.join(SUPPORTED_ARCHS)}")
        if raw.get("hidden_act", "silu") != "silu":
            refuse("hidden_act", f"is {raw['hidden_act']!r}, only 'silu' is implemented")
        if raw.get("pretraining_tp", 1) != 1:
            refuse("pretraining_tp", f"is {raw['pretraining_tp']}, only 1 is implemented")
        if raw.get("quantization_config"):
            refuse("quantization_config", "is set: quantized safetensors are not supported (use the GGUF or an fp16/bf16 checkpoint)")
        if any(t != "full_attention" for t in raw.get("layer_types") or ()):
            refuse("layer_types", "asks for layers other than full_attention")
        if raw.get("partial_rotary_factor", 1.0) != 1.0:
            refuse("partial_rotary_factor", "is not 1.0")

        dim = int(need("hidden_size"))
        n_heads = int(need("num_attention_heads"))
        max_seq = int(raw.get("max_position_embeddings") or 2048)
        # A sliding window no shorter than the context is plain causal attention; a shorter one
        # is exact as long as the context stays inside it, so the context is capped there.
        window = raw.get("sliding_window")
        if arch in ("qwen2", "qwen3", "qwen3_moe") and not raw.get("use_sliding_window", False):
            window = None
        if window:
            max_seq = min(max_seq, int(window))

        theta, scaling = _rope(raw, source)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            arch=arch,
            dim=dim,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or n_heads),
            head_dim=int(raw.get("head_dim") or dim // n_heads),
            ffn_dim=int(need("intermediate_size")),
            vocab_size=int(need("vocab_size")),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6 if arch.startswith("qwen") else 1e-5)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=max_seq,
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if arch == "qwen2" else attention_bias,
            o_bias=False if arch == "qwen2" else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            **_experts(raw, arch, int(need("num_hidden_layers")), refuse),
            bos_id=raw.get("bos_token_id"),
            eos_ids=eos_ids,
        )


def _experts(raw: dict, arch: str, n_layers: int, refuse) -> dict:
    """The mixture-of-experts fields of a qwen3_moe or mixtral config.json (none for a dense model)."""
    if arch not in MOE_ARCHS:
        return {}
    if arch == "mixtral":
        n, ffn, layers = int(raw.get("num_local_experts", 8)), int(raw["intermediate_size"]), range(n_layers)
        norm = True                          # softmax over the top k (transformers: softmax, top k, renormalise)
    else:
        # Qwen's own configs say num_experts; transformers 5 writes num_local_experts
        n = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
        ffn, norm = int(raw.get("moe_intermediate_size", 0)), bool(raw.get("norm_topk_prob", False))
        step, dense = int(raw.get("decoder_sparse_step", 1)), set(raw.get("mlp_only_layers") or ())
        layers = [i for i in range(n_layers) if i not in dense and n > 0 and (i + 1) % step == 0]
    if raw.get("num_shared_experts") or raw.get("shared_expert_intermediate_size"):
        refuse("shared_expert_intermediate_size", "asks for shared experts, which are not implemented")
    return {"n_experts": n, "n_routed": int(raw.get("num_experts_per_tok", 2)), "expert_ffn_dim": ffn,
            "norm_routed": norm, "moe_layers": tuple(layers)}


def _rope(raw: dict, source: str) -> tuple[float, dict | None]:
    """(theta, llama3 scaling or None) from either the old keys or transformers 5's rope_parameters."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or None
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = (scaling or params).get("rope_type", (scaling or params).get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(f"{source}: field 'rope_scaling' has type {rope_type!r}; only 'llama3' is implemented")
    s = scaling or params
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in s]
    if missing:
        raise ConfigError(f"{source}: field 'rope_scaling' of type llama3 lacks {', '.join(missing)}")
    return theta, {"rope_type": "llama3", **{k: float(s[k]) for k in keys}}


@dataclass(frozen=True)
class ParallelConfig:
    world: int
    ratio: tuple[float, ...] = field(default=())   # empty = even

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ConfigError(f"world size must be at least 1, got {self.world}")
        if self.ratio:
            if len(self.ratio) != self.world:
                raise ConfigError(f"--ratio has {len(self.ratio)} parts for {self.world} ranks: give one part per rank")
            if any(not math.isfinite(r) or r <= 0 for r in self.ratio):
                raise ConfigError(f"--ratio parts must be positive numbers, got {','.join(map(str, self.ratio))}")

    @property
    def parts(self) -> tuple[float, ...]:
        return self.ratio or (1.0,) * self.world

    def check(self, m: ModelConfig) -> None:
        if self.world > m.n_heads:
            raise ConfigError(f"{self.world} ranks but the model has only {m.n_heads} query heads: use at most {m.n_heads} ranks")


def parse_ratio(text: str | None) -> tuple[float, ...]:
    if not text:
        return ()
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ConfigError(f"--ratio {text!r} is not a comma-separated list of numbers, e.g. 3,1,1,1") from None


def normalized_ratio(parts: Sequence[float]) -> tuple[float, ...]:
    """Ratios as fractions summing to 1, rounded so that 2,2 and 1,1 name the same split."""
    total = sum(parts)
    return tuple(round(p / total, 6) for p in parts)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1.5GiB' -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not match or match.group(2).lower() not in _UNITS:
        raise ConfigError(f"memory size {text!r}: write a number and a unit, e.g. 1.5GiB or 800MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def kv_dtype_name(kv_dtype: str, dtype: str, stored: str) -> str:
    """The KV cache's dtype: as asked, or for auto half precision (half the memory of fp32, as
    llama.cpp's f16 default; docs/memory.md measures what it changes): the model's own 16-bit dtype,
    else fp16; fp32 when --dtype fp32 asks for the file's exact numbers."""
    if kv_dtype != "auto":
        return kv_dtype
    if dtype == "fp32":
        return "fp32"
    compute = stored if dtype == "auto" else dtype
    return compute if compute in ("bf16", "fp16") else "fp16"


@dataclass(frozen=True)
class RunConfig:
    """One run's options, the same on every rank (every rank parses the same command line)."""
    model: str | None = None            # None = the built-in SmolLM2-135M-Instruct
    allreduce: str = "auto"
    allreduce_payload: str = "fp32"     # see ALLREDUCE_PAYLOADS
    hub: int = 0                        # the star allreduce's hub rank
    window: int | None | str = "auto"   # blocks in memory; None = whole shard resident; "auto" = fit memory
    memory_budget: int | None = None    # bytes per rank for "auto" (default: weights.default_budget)
    context: int = 4096                 # tokens of KV cache the budget reserves per sequence (capped at the model's)
    max_batch: int = 1                  # sequences answered together (serve --max-batch)
    kv_pool: int = 0                    # positions of the KV pool per rank; 0: what the budget leaves (budget.py)
    draft: str | None = None            # speculative decoding's proposals: "ngram", a draft model's path, None: none
    cache_dir: str | None = None
    ratio: tuple[float, ...] = ()       # empty = even
    dtype: str = "auto"                 # storage of what is not quantized; the exact path's compute dtype
    head_on: str = "split"
    quant: str = "auto"                 # see QUANT_MODES
    matmul: str = "auto"                # see MATMUL_MODES
    kv_dtype: str = "auto"              # see KV_DTYPES and kv_dtype_name
    threads: int = 0                    # 0 = cores on this host / ranks on this host
    comm_timeout: float = 60.0
    link_model: str | None = None       # "2ms,300mbit": charge each message that link's time (comm.py)
    quiet: bool = False

    def __post_init__(self) -> None:
        if self.allreduce not in ALLREDUCE_MODES:
            raise ConfigError(f"--allreduce {self.allreduce!r}: use one of {', '.join(ALLREDUCE_MODES)}")
        check_payload(self.allreduce_payload, self.allreduce)
        if self.dtype not in ("auto", *DTYPE_NAMES):
            raise ConfigError(f"--dtype {self.dtype!r}: use auto, {', '.join(DTYPE_NAMES)}")
        if self.head_on not in HEAD_PLACES:
            raise ConfigError(f"--head-on {self.head_on!r}: use one of {', '.join(HEAD_PLACES)}")
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"--quant {self.quant!r}: use one of {', '.join(QUANT_MODES)}")
        if self.matmul not in MATMUL_MODES:
            raise ConfigError(f"--matmul {self.matmul!r}: use one of {', '.join(MATMUL_MODES)}")
        if self.kv_dtype not in KV_DTYPES:
            raise ConfigError(f"--kv-dtype {self.kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
        if not (self.window in (None, "auto") or isinstance(self.window, int) and self.window >= 1):
            raise ConfigError(f"--window {self.window!r}: give a number of blocks (at least 1), 'all' or 'auto'")
        if self.memory_budget is not None and self.window != "auto":
            raise ConfigError("give --window or --memory-budget, not both")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ConfigError(f"--memory-budget {self.memory_budget}: must be positive")
        if self.context < 1:
            raise ConfigError(f"--context {self.context}: must be at least 1")
        if self.max_batch < 1:
            raise ConfigError(f"--max-batch {self.max_batch}: must be at least 1")
        if self.draft is not None and not self.draft.strip():
            raise ConfigError("--draft '': give ngram, or a draft model's folder or .gguf file")
        if self.kv_pool < 0:
            raise ConfigError(f"--kv-pool {self.kv_pool}: give tokens (at least 1), or 0 for what the budget leaves")
        if self.threads < 0:
            raise ConfigError(f"--threads {self.threads}: must be 0 (automatic) or more")
        if not self.comm_timeout > 0:
            raise ConfigError(f"--comm-timeout {self.comm_timeout:g}: must be positive")
        if self.ratio:
            ParallelConfig(len(self.ratio), self.ratio)     # positive, finite parts

    def parallel(self, world: int) -> ParallelConfig:
        return ParallelConfig(world, self.ratio)


def check_payload(payload: str, mode: str) -> None:
    """A payload the algorithm `mode` can carry (see COMPRESSING_MODES), or a ConfigError saying why not."""
    if payload not in ALLREDUCE_PAYLOADS:
        raise ConfigError(f"--allreduce-payload {payload!r}: use one of {', '.join(ALLREDUCE_PAYLOADS)}")
    if payload != "fp32" and mode not in COMPRESSING_MODES:
        raise ConfigError(f"--allreduce-payload {payload} needs --allreduce star or auto (which then picks star): "
                          f"{mode} adds float32 partial sums " +
                          ("inside MPI_Allreduce" if mode == "mpi" else "at every hop"))


def parse_window(text: str) -> int | None | str:
    """'auto', 'all' (None: the whole shard resident) or a number of blocks."""
    if text in ("all", "auto"):
        return None if text == "all" else "auto"
    try:
        w = int(text)
    except ValueError:
        raise ConfigError(f"--window {text!r}: give a number of blocks (at least 1), 'all' or 'auto'") from None
    if w < 1:
        raise ConfigError(f"--window {w}: the window must hold at least 1 block (or 'all')")
    return w
