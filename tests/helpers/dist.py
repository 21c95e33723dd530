"""Process groups on CPU (gloo): a free port, a tiny 2-layer Qwen3 policy, and a GRPOModule sharded with FSDP2."""
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_qwen3():
    """A 2-layer Qwen3 of vocabulary 64, seeded: the same weights in every process."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return Qwen3ForCausalLM(config)


def shard(module, world):
    """`module` (a GRPOModule) sharded over the `world` ranks of the initialised process group, as trainer=fsdp does."""
    from torch.distributed.device_mesh import init_device_mesh

    module._device_mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    module.configure_model()
    assert module.sharded
    return module
