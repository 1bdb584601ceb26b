"""Hugging Face config.json mapping and refusals."""

import json

import pytest

from tpi_mpi.config import ModelConfig, parse_ratio
from tpi_mpi.errors import ConfigError

LLAMA3 = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
    "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False, "hidden_act": "silu",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_llama31_config_maps_every_field():
    m = ModelConfig.from_hf_dict(LLAMA3)
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.head_dim, m.ffn_dim, m.vocab_size) == \
        (4096, 32, 32, 8, 128, 14336, 128256)
    assert m.eos_ids == (128001, 128008, 128009) and m.bos_id == 128000
    assert m.rope_theta == 500000.0 and m.rope_scaling["factor"] == 8.0 and m.max_seq_len == 131072
    assert not (m.qkv_bias or m.o_bias or m.mlp_bias or m.tie_embeddings)


def test_transformers5_rope_parameters_and_qwen2_biases():
    m = ModelConfig.from_hf_dict({
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
        "num_key_value_heads": 2, "num_hidden_layers": 24, "vocab_size": 151936, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "eos_token_id": 151645,
        "sliding_window": 32768, "use_sliding_window": False, "max_position_embeddings": 32768})
    assert m.qkv_bias and not m.o_bias and m.tie_embeddings
    assert m.rope_theta == 1e6 and m.rope_scaling is None and m.eos_ids == (151645,)


def test_mistral_sliding_window_caps_the_context():
    m = ModelConfig.from_hf_dict({**LLAMA3, "model_type": "mistral", "rope_scaling": None,
                                  "max_position_embeddings": 32768, "sliding_window": 4096})
    assert m.max_seq_len == 4096


@pytest.mark.parametrize("change,field", [
    ({"model_type": "gpt2"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"hidden_size": None}, "hidden_size"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
    ({"layer_types": ["sliding_attention"]}, "layer_types"),
])
def test_unsupported_fields_are_refused_by_name(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_hf_dict({**LLAMA3, **change})


def test_missing_and_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path / "config.json")


def test_round_trip_through_the_manifest():
    m = ModelConfig.from_hf_dict(LLAMA3)
    assert ModelConfig.from_json(json.loads(json.dumps(m.to_json()))) == m


def test_parse_ratio():
    assert parse_ratio("3,1,1,1") == (3.0, 1.0, 1.0, 1.0) and parse_ratio(None) == ()
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_ratio("3;1")
