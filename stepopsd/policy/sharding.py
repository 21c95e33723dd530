"""FSDP2 sharding of the trained policy (`trainer=fsdp`: Lightning's ModelParallelStrategy, torch's
`fully_shard`), used by `GRPOModule.configure_model`.

Every decoder layer is one sharding unit and the rest of the policy (embeddings, final norm, tied LM head)
the root unit; each rank holds 1/world of every weight, gradient and AdamW state. The shards are float32
(the optimizer's master weights); under bf16-mixed they are gathered and computed in bf16 and gradients are
reduced in float32 (`MixedPrecisionPolicy`, as verl's FSDP workers). `gathered` gives HF `generate` the full
weights for a whole rollout, `full_state_dict` gives rank 0 a `save_pretrained`-able copy. The frozen KL
reference and teacher snapshot are never sharded (whole bf16 replicas).

Simplification: data-parallel sharding only (no tensor parallelism, no hybrid shard-within-node).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

_FSDP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ShardingConfig:
    """`trainer=fsdp` (conf/trainer/fsdp.yaml, key `trainer.fsdp`): how `configure_model` shards the policy with
    FSDP2 (`fully_shard`) under Lightning's ModelParallelStrategy. Every decoder layer is one sharding unit, the
    rest of the policy (embeddings, final norm, LM head) the root unit."""

    layer_class: str | None = None  # class name of the decoder layer; None: the model's _no_split_modules
    reshard_after_forward: bool = True  # free a layer's gathered weights after its forward (gather again in backward)
    param_dtype: str = "auto"  # dtype weights are gathered and computed in; auto: bfloat16 under bf16-mixed, else float32
    reduce_dtype: str = "float32"  # dtype of the gradient reduce-scatter

    def __post_init__(self):
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            if value not in _FSDP_DTYPES and not (key == "param_dtype" and value == "auto"):
                raise ValueError(f"trainer.fsdp.{key}={value}: choose from {', '.join(_FSDP_DTYPES)}"
                                 + (" or auto" if key == "param_dtype" else ""))

    def mp_policy(self, precision: str):
        """FSDP2's MixedPrecisionPolicy for the trainer's precision. The shards (the optimizer's weights) stay
        float32 in every case; under bf16-mixed the gathered weights are bf16 (as verl's FSDP workers) and the
        gradients are reduced in float32, under 32-true everything is float32."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param = self.param_dtype if self.param_dtype != "auto" else ("bfloat16" if "bf16" in precision else "float32")
        if param == "float32" and self.reduce_dtype == "float32":
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=_FSDP_DTYPES[param], reduce_dtype=_FSDP_DTYPES[self.reduce_dtype])


def decoder_layers(policy: torch.nn.Module, layer_class: str | None = None) -> list[torch.nn.Module]:
    """The policy's decoder layers, found by class name (`layer_class`, or HF's `_no_split_modules`:
    Qwen3DecoderLayer, Qwen2DecoderLayer)."""
    names = {layer_class} if layer_class else set(getattr(policy, "_no_split_modules", None) or ())
    layers = [m for m in policy.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"no {' / '.join(sorted(names)) or 'decoder layer'} modules in {type(policy).__name__} to "
                         "shard: set trainer.fsdp.layer_class to its decoder-layer class name")
    return layers


def is_sharded(policy: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(policy, FSDPModule)


def shard_policy(policy: torch.nn.Module, mesh, cfg: ShardingConfig, precision: str) -> None:
    """`fully_shard` each decoder layer, then the policy root, over the mesh's data-parallel dimension."""
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError("trainer=fsdp shards over data parallel ranks only: set tensor_parallel_size=1")
    dp = mesh["data_parallel"] if "data_parallel" in names else mesh
    mp = cfg.mp_policy(precision)
    for layer in decoder_layers(policy, cfg.layer_class):
        fully_shard(layer, mesh=dp, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
    fully_shard(policy, mesh=dp, mp_policy=mp)


@contextlib.contextmanager
def gathered(root, cfg: ShardingConfig):
    """The sharded policy's full weights for the block: every rank gathers every unit once on entry (a
    collective: all ranks enter together, even one with nothing to roll out); the forward passes inside run
    without any communication, so ranks may run different numbers of them; on exit the units go back to their
    shards and FSDP forgets those no-grad forwards (its backward prefetch follows the order of forwards). The
    gathered weights are what the training forward uses (the same `param_dtype`), so rollout and trainer
    log-probs agree."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    # FSDP initialises its root at the first forward; a rank may have none inside the block (no validation
    # task), and reset_iter_state needs it (torch 2.13 has no public call for this one)
    root._get_fsdp_state()._lazy_init()
    root.set_reshard_after_forward(False)
    try:
        for unit in units:
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        root.reset_iter_state()
        for unit in units:  # the root keeps its gathered weights between forward and backward (FSDP's default)
            unit.set_reshard_after_forward(cfg.reshard_after_forward and unit is not root, recurse=False)


def full_state_dict(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The sharded policy's full state dict on CPU, on global rank 0 (empty on the others; a collective, every
    rank calls it). A tied weight (lm_head = embed_tokens) is kept once, as `save_pretrained` does."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    unique = {name for name, _ in policy.named_parameters()}
    every = {name for name, _ in policy.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in state.items() if k in unique or k not in every}
