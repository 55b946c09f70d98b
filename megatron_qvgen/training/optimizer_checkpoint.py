"""megatron's optimizers in our dist checkpoints: a format that reloads at any layout, and the two gaps of
megatron's torch-Adam fallback (used whenever neither Transformer Engine nor apex is installed: on CPU, and on
GPU images without them) that otherwise make a distributed-optimizer checkpoint impossible to load.

Measured with megatron-core 0.16.1; the code paths are unchanged in 0.19.0:
- the default format of ``DistributedOptimizer.sharded_state_dict`` ('fully_sharded_model_space') cannot even
  be saved: its ShardedTensors carry a flattened_range, which dist_checkpointing rejects. We write
  'fully_reshardable': each main param and moment whole, in the model's own layout (gathered over DP while
  saving), so it reloads at another TP, PP and DP size.
- ``DistributedOptimizer.state_dict`` (called while building the load request) reads the step count from the
  inner torch Adam's per-parameter state, which torch only creates at the first step: on a freshly built
  optimizer it fails (``assert len(steps) == 1``). :func:`allocate_adam_state` creates that state first.
- its param-state loaders copy every tensor of a parameter's state, torch Adam's ``step`` included, from the
  checkpoint's param state, which never holds a step (megatron keeps it in the param groups): KeyError 'step'.
  :func:`load_optimizer_state` sets the step aside while megatron's own loader runs, then puts it back, one
  tensor per parameter (megatron sets one shared step tensor for all of them: torch's Adam, which advances
  each parameter's step in place, would then count every step once per parameter).
With TE / apex (no per-parameter step) both work-arounds do nothing.
"""
from __future__ import annotations

from typing import Dict

import torch

from megatron_qvgen.training.main_params import sub_optimizers

CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_sharded_state(optimizer, model_sharded_state: Dict, is_loading: bool = False) -> Dict:
    """The optimizer's part of a dist checkpoint (to save, or the request to load), reloadable at any layout.
    Non-distributed optimizers ignore the format setting."""
    if is_loading:
        allocate_adam_state(optimizer)
    return optimizer.sharded_state_dict(model_sharded_state, is_loading=is_loading, metadata=dict(CHECKPOINT_METADATA))


def load_optimizer_state(optimizer, state_dict: Dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for what :func:`optimizer_sharded_state` requested."""
    subs = sub_optimizers(optimizer)
    if len(subs) == 1:
        _load_one(subs[0], state_dict)
        return
    if len(state_dict) != len(subs):
        raise RuntimeError(f"the checkpoint holds {len(state_dict)} optimizer states, this run has {len(subs)} optimizers")
    for sub, (_, sub_state) in zip(subs, sorted(state_dict.items())):
        _load_one(sub, sub_state)
    optimizer._synchronize_steps()


def _load_one(sub, state_dict: Dict) -> None:
    if not (hasattr(sub, "model_param_gbuf_map") and "param_state" in state_dict):
        sub.load_state_dict(state_dict)
        return
    state_dict = dict(state_dict)
    param_state = state_dict.pop("param_state")
    kind = state_dict.pop("param_state_sharding_type")
    loader = getattr(sub, f"load_parameter_state_from_{_LOADERS.get(kind, kind)}", None)
    if loader is None:
        raise RuntimeError(f"distributed-optimizer state of unknown format '{kind}' in the checkpoint")
    sub.load_state_dict(state_dict)               # param groups, step count, grad scaler
    inner_state = sub.optimizer.state
    steps = {p: s.pop("step") for p, s in inner_state.items() if "step" in s}
    try:
        loader(param_state)                       # main params and moments
    finally:
        for p, step in steps.items():
            inner_state[p]["step"] = step.clone()   # megatron hands every parameter the SAME step tensor,
                                                     # which torch's Adam would then advance once per parameter


_LOADERS = {"fully_sharded_model_space": "fs_model_space", "dp_zero_gather_scatter": "dp_zero"}


def allocate_adam_state(optimizer) -> int:
    """Give every parameter of a distributed optimizer's torch Adam/AdamW the state its first step would
    create (step 0, zero moments), where it has none yet; returns how many were allocated.

    megatron's distributed optimizer reads its inner state (``state_dict``, hence every checkpoint load)
    assuming TE / apex FusedAdam, which keep the step count in the param groups. Its torch fallback (used
    whenever neither is installed, on CPU and on GPU images alike) creates the state lazily, so on a freshly
    built optimizer ``state_dict`` finds no step and the load fails. Zero moments at step 0 are exactly
    what torch's first step would start from, and the load overwrites them anyway."""
    allocated = 0
    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        if not hasattr(sub, "model_param_gbuf_map") or not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if inner.state.get(p):
                    continue
                on_device = group.get("capturable") or group.get("fused")
                state = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                inner.state[p] = state
                allocated += 1
    return allocated
