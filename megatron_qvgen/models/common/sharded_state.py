"""megatron dist-checkpoint descriptions (``sharded_state_dict``) of our module trees.

Keys of the returned dict are the module's LOCAL state_dict keys (so ``load_state_dict`` takes what
``dist_checkpointing.load`` returns); each ShardedTensor's ``key`` is the GLOBAL name, which is the
diffusers parameter name (blocks carry their global index), so checkpoints reshard across TP and PP.

- A module with its own ``sharded_state_dict`` (megatron's linears, the QAT linears, our TP-sharded
  norms) describes itself; everything else is walked here: a parameter tagged ``tensor_model_parallel``
  is sharded along its ``partition_dim``, any other tensor is replicated.
- Empty ``_extra_state`` entries of megatron's linears are dropped: they hold nothing, and a
  checkpoint converted from diffusers has no such entries.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import make_sharded_tensor_for_checkpoint, make_tp_sharded_tensor_for_checkpoint


def _describes_itself(module: torch.nn.Module) -> bool:
    method = getattr(type(module), "sharded_state_dict", None)
    return method is not None and method is not MegatronModule.sharded_state_dict


def module_sharded_state_dict(module: torch.nn.Module, local_prefix: str, global_prefix: str,
                              metadata: dict) -> Dict[str, object]:
    """Describe ``module``'s persistent tensors; dict keys start with ``local_prefix``, checkpoint
    keys with ``global_prefix``."""
    if _describes_itself(module):
        described = module.sharded_state_dict(prefix=global_prefix, sharded_offsets=(), metadata=metadata)
        out = {}
        for key, value in described.items():
            if isinstance(value, ShardedObject) and key.endswith("_extra_state") and value.data is None:
                continue
            out[local_prefix + key[len(global_prefix):]] = value
        return out
    out = own_sharded_tensors(module, local_prefix, global_prefix, metadata)
    for name, child in module.named_children():
        out.update(module_sharded_state_dict(child, f"{local_prefix}{name}.", f"{global_prefix}{name}.", metadata))
    return out


def own_sharded_tensors(module: torch.nn.Module, local_prefix: str, global_prefix: str,
                        metadata: dict) -> Dict[str, ShardedTensor]:
    """The module's direct parameters and persistent buffers (not its children's)."""
    out = {}
    tp_group = parallel_state.get_tensor_model_parallel_group()
    own = {}
    module._save_to_state_dict(own, "", keep_vars=True)
    for name, tensor in own.items():
        if name.endswith("_extra_state"):
            continue
        key = global_prefix + name
        if getattr(tensor, "tensor_model_parallel", False):
            out[local_prefix + name] = make_tp_sharded_tensor_for_checkpoint(
                tensor, key, tensor.partition_dim, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
        else:
            out[local_prefix + name] = make_sharded_tensor_for_checkpoint(
                tensor, key, tp_group=tp_group, dp_cp_group=metadata["dp_cp_group"])
    return out


def set_pipeline_replica(sharded: Dict[str, object], replica: int) -> None:
    """Mark copies of pipeline-replicated tensors: only replica 0 (first chunk of the first stage)
    writes them."""
    for value in sharded.values():
        if isinstance(value, (ShardedTensor, ShardedObject)):
            rid: Tuple = value.replica_id if isinstance(value.replica_id, tuple) else (value.replica_id,)
            value.replica_id = (replica,) + tuple(rid[1:])
