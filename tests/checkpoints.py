"""Small random Hugging Face checkpoints made with transformers, the independent reference."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tensor parallelism splits every layer across devices, so one token needs every rank at once.",
    "Edge devices have a few gigabytes of memory and slow links; latency dominates the allreduce.",
    "Once upon a time there was a small cluster of laptops that answered questions together.",
] * 20
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return tok.to_str()


def write_tokenizer(folder: Path) -> int:
    """tokenizer.json + tokenizer_config.json; returns the vocabulary size."""
    (folder / "tokenizer.json").write_text(_tokenizer_json())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML}))
    return json.loads(_tokenizer_json())["model"]["vocab"].__len__()


ARCHS = {
    # Llama with GQA (8 query heads over 2 kv heads) and Llama 3.1 rope scaling
    "llama": dict(arch="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=160, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Qwen2: q/k/v biases, tied embeddings
    "qwen2": dict(arch="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, tie_word_embeddings=True),
    # head_dim different from hidden / heads, tied embeddings, no GQA grouping of 1
    "llama_hd": dict(arch="llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                     head_dim=16, intermediate_size=96, tie_word_embeddings=True),
    "mistral": dict(arch="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=1,
                    intermediate_size=128, sliding_window=4096),
    # Qwen3: q/k heads RMS-normed before RoPE, head_dim (32) larger than hidden / heads (16), tied embeddings
    "qwen3": dict(arch="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  intermediate_size=128, tie_word_embeddings=True, rope_theta=1000000.0),
    # Qwen3-MoE: 2 of 6 experts of 64 columns per token, renormalised; layer 1 a dense MLP (mlp_only_layers)
    "qwen3_moe": dict(arch="qwen3_moe", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      intermediate_size=96, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    # Mixtral: 2 of 4 experts of 96 columns (not a multiple of 64: uneven splits at 3 ranks)
    "mixtral": dict(arch="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, num_local_experts=4, num_experts_per_tok=2),
}


def make_checkpoint(folder: Path, name: str = "llama", layers: int = 2, seed: int = 0,
                    dtype: torch.dtype = torch.float32, max_shard_size: str | None = None,
                    context: int = 256) -> Path:
    """Save a random model of kind `name` (see ARCHS) with its tokenizer into `folder`."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(folder)
    spec = dict(ARCHS[name])
    arch = spec.pop("arch")
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig, "qwen3": transformers.Qwen3Config,
                  "qwen3_moe": transformers.Qwen3MoeConfig, "mixtral": transformers.MixtralConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
                 "qwen3_moe": transformers.Qwen3MoeForCausalLM, "mixtral": transformers.MixtralForCausalLM}[arch]
    config = config_cls(vocab_size=vocab, num_hidden_layers=layers, max_position_embeddings=context,
                        bos_token_id=0, eos_token_id=3, initializer_range=0.15, **spec)
    torch.manual_seed(seed)
    model = model_cls(config).to(dtype).eval()
    with torch.no_grad():   # norms are ones at init; random ones exercise them
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.2 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_reference(folder: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model.eval()


def reference_run(folder: Path, prompt_ids: list[int], n_new: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' logits at every prompt position and its greedy continuation (EOS ignored)."""
    return greedy_reference(load_reference(folder), prompt_ids, n_new)


def greedy_reference(model, prompt_ids: list[int], n_new: int) -> tuple[torch.Tensor, list[int]]:
    """A transformers model's logits at every prompt position and its greedy continuation."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        prompt_logits = model(ids).logits[0].float()
        out = []
        for _ in range(n_new):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return prompt_logits, out
