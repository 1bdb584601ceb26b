"""Mixture-of-experts pieces on their own: config fields, routing, synthetic shapes and the byte
counts `info` shows. The models themselves are checked against transformers in
test_ranks_in_process (qwen3_moe, mixtral) and test_batched_steps."""

from __future__ import annotations

import pytest
import torch

from tpi_mpi.config import ModelConfig, ParallelConfig
from tpi_mpi.errors import ConfigError
from tpi_mpi.model import route
from tpi_mpi.parallel import plan_shards
from tpi_mpi.synthetic import SyntheticSource, synthetic_config

BASE = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 100}


def test_qwen3_moe_fields_and_which_layers_route():
    m = ModelConfig.from_hf_dict(BASE | {"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 32, "norm_topk_prob": True,
                                         "decoder_sparse_step": 2, "mlp_only_layers": [3]})
    assert (m.n_experts, m.n_routed, m.expert_ffn_dim, m.norm_routed, m.qk_norm) == (8, 2, 32, True, True)
    assert m.moe_layers == (1,)                      # every 2nd layer, but not layer 3
    # transformers 5 writes num_local_experts
    m5 = ModelConfig.from_hf_dict(BASE | {"model_type": "qwen3_moe", "num_local_experts": 8, "moe_intermediate_size": 32})
    assert m5.n_experts == 8 and m5.moe_layers == (0, 1, 2, 3) and not m5.norm_routed


def test_mixtral_routes_every_layer_with_its_intermediate_size():
    m = ModelConfig.from_hf_dict(BASE | {"model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2})
    assert (m.n_experts, m.n_routed, m.expert_ffn_dim, m.norm_routed) == (4, 2, 96, True)
    assert m.moe_layers == (0, 1, 2, 3) and not m.qk_norm


@pytest.mark.parametrize("raw,field", [
    ({"model_type": "qwen2_moe"}, "model_type"),
    ({"model_type": "qwen3_moe", "num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64},
     "shared_expert_intermediate_size"),
    ({"model_type": "mixtral", "num_local_experts": 2, "num_experts_per_tok": 3}, "3 experts per token of 2"),
])
def test_unsupported_expert_layouts_are_refused_by_name(raw, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_dict(BASE | raw)


def test_route_takes_the_top_k_of_the_softmax_and_renormalises():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]])
    weights, chosen = route(logits, 2, normalize=False)
    probs = torch.softmax(logits, -1)
    assert chosen.tolist() == [[1, 2], [2, 3]]
    torch.testing.assert_close(weights, probs.gather(1, chosen))
    weights, _ = route(logits, 2, normalize=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # Mixtral's form: softmax over the top k logits
    torch.testing.assert_close(weights, torch.softmax(logits.gather(1, chosen), -1))


def test_every_rank_holds_a_column_slice_of_every_expert():
    m = synthetic_config("qwen3-30b-a3b:2")
    assert m.arch == "qwen3_moe" and m.moe_layers == (0, 1) and m.head_dim == 128
    shards = plan_shards(m, ParallelConfig(4))
    assert [s.expert_ffn for s in shards] == [(0, 192), (192, 384), (384, 576), (576, 768)]
    src = SyntheticSource("qwen3-30b-a3b:2")
    assert src.read("experts.5.gate.weight", 0, rows=(192, 384)).shape == (192, 2048)
    assert src.read("experts.5.down.weight", 0, cols=(192, 384)).shape == (2048, 192)
    assert src.read("router.weight", 1).shape == (128, 2048)
    assert src.read("q_norm.weight", 1).shape == (128,)


def run_with_capacity(prepared, capacity: float, ids: list[int], n_new: int):
    """Greedy tokens on one rank with an expert store of `capacity` bytes: (logits per step, window)."""
    from tpi_mpi.batch import Batch, SeqStep
    from tpi_mpi.local_comm import LocalComm
    from tpi_mpi.model import Transformer
    from tpi_mpi.weights import EmbeddingTable, Shard, WeightWindow

    shard = Shard(prepared / "rank0", 0, 1)
    window = WeightWindow(shard, None, expert_capacity=capacity)
    model = Transformer(shard.model, shard.shards, 0, LocalComm(), window, torch.float32, kv_blocks=8)
    model.load_resident(shard.read("common.safetensors")[1])
    embed = EmbeddingTable(shard)
    out, pos = [], 0
    for _ in range(n_new):
        logits = model(embed[ids], Batch([SeqStep(0, pos, len(ids), runs=((0, 8),))]))
        out.append(logits[-1])
        pos += len(ids)
        ids = [int(logits[-1].argmax())]
    window.close()
    return out, window


def test_experts_are_read_only_when_routed_and_give_the_same_numbers(checkpoints, tmp_path):
    from tpi_mpi.prepare import prepare
    from tpi_mpi.shard_format import Manifest

    prepared = prepare(checkpoints("qwen3_moe"), tmp_path / "p", ParallelConfig(1), "fp32")
    mf = Manifest.load(prepared / "rank0")
    expert_bytes = mf.files["layer000.expert000.safetensors"]["size"]
    assert len(mf.expert_files()) == 6                         # layer 0 routes; layer 1 is dense
    kept, window = run_with_capacity(prepared, float("inf"), [5, 9, 13], 6)
    assert window.experts.resident and window.experts.bytes_read == 6 * expert_bytes   # all read once, at load
    reads = {}
    for capacity in (0, 3 * expert_bytes):                     # none kept; half of them kept
        streamed, window = run_with_capacity(prepared, capacity, [5, 9, 13], 6)
        assert all(torch.equal(a, b) for a, b in zip(kept, streamed))
        reads[capacity] = window.experts.bytes_read / expert_bytes
    # nothing kept: the prompt reads the union of its 3 tokens' experts (2 to 6), each of the 5
    # decode steps its 2 routed experts, and nothing else
    assert 2 + 5 * 2 <= reads[0] <= 6 + 5 * 2, reads
    assert reads[3 * expert_bytes] < reads[0], reads           # what is kept is not read again
